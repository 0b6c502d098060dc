"""SoRA (Ding et al. 2023) as a baseline: identity gates from twice the rank budget, an L1
proximal step on every gate after every optimizer step, and at the end the `rank_budget` ranks
with the largest |g| kept."""

from __future__ import annotations

import torch

from alora_ds.core.layer import GateKind
from alora_ds.methods.base import Adapters, FinalPrune, Method, prune_smallest_gates


def proximal_l1(value: torch.Tensor, threshold: float) -> torch.Tensor:
    """The L1 proximal step: g <- sign(g) max(|g| - threshold, 0), which drives gates to
    exactly zero."""
    return torch.sign(value) * (value.abs() - threshold).clamp(min=0)


class SoRA(Method):
    name = "sora"
    gate_kind = GateKind.IDENTITY
    start_factor = 2

    def after_step(self, step: int, lr: float, adapters: Adapters) -> None:
        threshold = lr * self.settings.sora_lambda
        adapters.map_gate_logits(lambda gates: proximal_l1(gates, threshold))

    def final_prune(self, adapters: Adapters, rank_budget: int) -> FinalPrune:
        return prune_smallest_gates(adapters.gate_values(), rank_budget)
