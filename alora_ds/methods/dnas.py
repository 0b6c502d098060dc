"""ALoRA-DNAS (docs/method.md section 5): relaxed gates g = 2 sigmoid(a) trained by bi-level
optimisation, DARTS-style. The training set is split in two halves; even steps train A and B on
D1, odd steps the gate logits on D2. At a round the gate values themselves are the scores."""

from __future__ import annotations

from alora_ds.core.layer import GateKind
from alora_ds.core.schedule import bilevel_split
from alora_ds.methods.base import Method, RoundInputs, RoundScores, StepPart

_PARTS = ("weights", "gates")  # what step 2k and step 2k + 1 train


class ALoRADNAS(Method):
    name = "alora-dnas"
    gate_kind = GateKind.RELAXED
    allocates = True

    def data_pools(self, num_examples: int) -> tuple[list[int], ...]:
        return bilevel_split(num_examples, self.settings.seed)

    def step_part(self, step: int) -> StepPart:
        pool = step % len(_PARTS)
        return StepPart(pool=pool, pool_step=step // len(_PARTS), trains=_PARTS[pool])

    def round_scores(self, inputs: RoundInputs) -> RoundScores:
        return RoundScores(inputs.adapters.gate_values())
