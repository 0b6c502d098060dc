"""AB-LoRA's importance scores: the direct reference scorer (`direct`), the fast exact one
(`fast`) and the screened one (`screened`: estimates everywhere, exact where they decide the
round). Plain torch over core; the collectives are functions the caller passes.

This file itself imports nothing, so the configuration can read the mode names without torch.
"""

# The scoring paths, as `--scoring` names them.
SCORING_MODES: tuple[str, ...] = ("fast", "naive", "screened")
