"""AB-LoRA's importance scores: the direct reference scorer (`direct`) and the fast exact one
(`fast`). Plain torch over core; the distributed split is a `gather` function the caller passes.
"""

# The exact scoring paths, as `--scoring` names them.
SCORING_MODES: tuple[str, ...] = ("fast", "naive")
