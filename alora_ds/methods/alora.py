"""ALoRA with AB-LoRA scores (docs/method.md sections 3-4): the paper's method.

At every round B_val (|B_val| development examples, drawn with a generator seeded by (seed,
round), the same on every process) is scored by ablation: IS(r) = S(M) - S(M \\ r) + S(M_r).
The ablations are shared out over the processes by the engine; the scores are exact whichever
scoring path runs (`fast` by default, `naive` the direct reference).
"""

from __future__ import annotations

from alora_ds.core.schedule import draw_validation_indices
from alora_ds.io.examples import make_batches
from alora_ds.methods.base import Method, RoundInputs, RoundScores


class ALoRA(Method):
    name = "alora"
    allocates = True

    def round_scores(self, inputs: RoundInputs) -> RoundScores:
        settings = self.settings
        dev = inputs.dev_examples
        indices = draw_validation_indices(
            len(dev), settings.val_examples, seed=settings.seed, round_index=inputs.round_index
        )
        batches = make_batches(
            [dev[i] for i in indices], settings.scoring_batch_size, inputs.pad_id, inputs.device
        )
        with inputs.progress(sum(inputs.adapters.rank_map().values())) as progress:
            scores = inputs.adapters.ab_lora_scores(
                batches,
                mode=settings.scoring,
                max_rows=settings.scoring_max_rows,
                progress=progress,
            )
        return RoundScores(scores.importance, scores.S_M)
