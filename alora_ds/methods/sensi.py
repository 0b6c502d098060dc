"""ALoRA-Sensi (docs/method.md section 5): the rounds of ALoRA with AdaLoRA's smoothed
sensitivity x uncertainty as each rank's importance, observed at every step's gradient."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from alora_ds.methods.base import Adapters, Method, RoundInputs, RoundScores
from alora_ds.methods.sensitivity import SensitivityTracker


class ALoRASensi(Method):
    name = "alora-sensi"
    allocates = True

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.tracker = SensitivityTracker()

    def after_backward(self, step: int, adapters: Adapters) -> None:
        self.tracker.update(adapters.values_and_grads())

    def round_scores(self, inputs: RoundInputs) -> RoundScores:
        return RoundScores(self.tracker.rank_scores(inputs.adapters.rank_map()))

    def after_rebuild(self, pruned: Mapping[str, Sequence[int]], added: Mapping[str, int]) -> None:
        self.tracker.apply_plan(pruned, added)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.tracker.state_tensors()

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tracker.load_state_tensors(tensors)
