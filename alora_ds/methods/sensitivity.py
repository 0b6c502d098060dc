"""ALoRA-Sensi's importance: AdaLoRA's smoothed sensitivity times its uncertainty, per rank.

For every adapter entry w with gradient g, at every optimizer step (AdaLoRA, Zhang et al. 2023,
eq. 8-10, with its defaults beta1 = beta2 = 0.85):

    I     = |w * g|                                   sensitivity
    I_bar = beta1 * I_bar + (1 - beta1) * I           smoothed sensitivity
    U_bar = beta2 * U_bar + (1 - beta2) * |I - I_bar| uncertainty (with the updated I_bar)
    s     = I_bar * U_bar

and the importance of rank i of a module is mean_j s(A[i, j]) + mean_k s(B[k, i]): AdaLoRA's
triplet score without the singular value, which ALoRA does not have (its gate is not trained).
Pruning and adding then follow exactly the same rules as ALoRA (alora_ds.core.allocation).

Plain torch: the caller hands in full fp32 values and gradients (alora_ds.runtime gathers them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

PARTS = ("lora_A", "lora_B")


class SensitivityTracker:
    """The smoothed sensitivity and uncertainty of every A and B entry, across steps and
    rounds (rows of pruned ranks are dropped, new ranks start at zero)."""

    def __init__(self, beta1: float = 0.85, beta2: float = 0.85) -> None:
        self.beta1, self.beta2 = beta1, beta2
        self.i_bar: dict[str, torch.Tensor] = {}  # "<module>.<part>" -> like the tensor
        self.u_bar: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, values_and_grads: Mapping[str, Mapping[str, tuple]]) -> None:
        """One step: module -> part -> (full fp32 value, full fp32 gradient)."""
        for name, parts in values_and_grads.items():
            for part, (value, grad) in parts.items():
                key = f"{name}.{part}"
                current = (value.float() * grad.float()).abs()
                i_bar = self.i_bar.get(key)
                if i_bar is None or i_bar.shape != current.shape:
                    i_bar = torch.zeros_like(current)
                    self.u_bar[key] = torch.zeros_like(current)
                i_bar = self.beta1 * i_bar + (1 - self.beta1) * current
                self.u_bar[key] = (
                    self.beta2 * self.u_bar[key] + (1 - self.beta2) * (current - i_bar).abs()
                )
                self.i_bar[key] = i_bar

    def rank_scores(self, ranks: Mapping[str, int]) -> dict[str, list[float]]:
        """Importance of every live rank (module -> one score per rank, in index order); ranks
        never seen by `update` score 0."""
        scores: dict[str, list[float]] = {}
        for name, r in ranks.items():
            total = torch.zeros(r, dtype=torch.float64)
            for part, dim in (("lora_A", 1), ("lora_B", 0)):  # A (r, d_in), B (d_out, r)
                key = f"{name}.{part}"
                if key in self.i_bar and r:
                    s = (self.i_bar[key] * self.u_bar[key]).double()
                    total += s.mean(dim=dim)
            scores[name] = total.tolist()
        return scores

    def apply_plan(self, pruned: Mapping[str, Sequence[int]], added: Mapping[str, int]) -> None:
        """Follow a round's rank surgery: drop pruned ranks' rows, append zeros for new ones."""
        for store in (self.i_bar, self.u_bar):
            for key, tensor in list(store.items()):
                name, part = key.rsplit(".", 1)
                dim = 0 if part == "lora_A" else 1
                r = tensor.shape[dim]
                drop = set(pruned.get(name, ()))
                keep = torch.tensor([i for i in range(r) if i not in drop], dtype=torch.long)
                kept = tensor.index_select(dim, keep)
                shape = list(kept.shape)
                shape[dim] = added.get(name, 0)
                store[key] = torch.cat([kept, torch.zeros(shape)], dim=dim)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """For checkpoints: `sensi.i_bar.<module>.<part>` and `sensi.u_bar.<...>`."""
        out = {f"sensi.i_bar.{k}": v for k, v in self.i_bar.items()}
        out.update({f"sensi.u_bar.{k}": v for k, v in self.u_bar.items()})
        return out

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for key, value in tensors.items():
            if key.startswith("sensi.i_bar."):
                self.i_bar[key.removeprefix("sensi.i_bar.")] = value.float()
            elif key.startswith("sensi.u_bar."):
                self.u_bar[key.removeprefix("sensi.u_bar.")] = value.float()
