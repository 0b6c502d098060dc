"""AdaLoRA (Zhang et al. 2023) as a baseline in our trainer, with peft's own rank allocator.

Our gated layer with identity gates is exactly AdaLoRA's SVD form: delta W = B diag(g) A, the
gate g playing AdaLoRA's singular values E. peft's `RankAllocator` decides, after every optimizer
step, which triplets (A row, g, B column) keep their gate: its cubic budget schedule from
`init_r` to `target_r` per module between `tinit` and `total_step - tfinal`, and its masking by
the summed importance of each triplet. The importance itself (smoothed sensitivity times
uncertainty, AdaLoRA eq. 8-10) is alora_ds.methods.sensitivity's, the same formula as peft's
`update_ipt`, which reads `p.grad` and so cannot see ZeRO's partitioned gradients; we hand the
allocator its statistics and a view of the triplets in peft's layout instead of a peft model.

Differences from peft's AdaLoraModel, said once: the scale stays alpha / r_init (peft divides by
the live rank count), and the orthogonality regulariser (orth_reg_weight) is left out: under
ZeRO-3 the factors are partitioned outside the forward, where peft computes it.

Plain torch: the caller gathers the values and gradients (alora_ds.runtime).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from peft import AdaLoraConfig
from peft.tuners.adalora.layer import RankAllocator

from alora_ds.core.layer import GateKind
from alora_ds.core.schedule import Schedule
from alora_ds.errors import InputError
from alora_ds.methods.base import Adapters, FinalPrune, Method, prune_smallest_gates
from alora_ds.methods.sensitivity import SensitivityTracker

_ADAPTER = "default"
# Our tensor names -> AdaLoRA's.
_PEFT_NAMES = {"lora_A": "lora_A", "lora_B": "lora_B", "gate_logits": "lora_E"}


class _Triplets:
    """What RankAllocator reads from a model: named tensors in AdaLoRA's layout."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.tensors.items())


class AdaLoraSchedule:
    """AdaLoRA's importance and budget schedule over modules that start at `init_r` ranks."""

    def __init__(
        self,
        modules: list[str],
        *,
        init_r: int,
        target_r: int,
        total_step: int,
        tinit: int,
        tfinal: int,
        delta_t: int = 1,
        beta1: float = 0.85,
        beta2: float = 0.85,
    ) -> None:
        self.modules = list(modules)
        self.init_r = init_r
        self.tracker = SensitivityTracker(beta1, beta2)
        self.config = AdaLoraConfig(
            init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal, deltaT=delta_t,
            beta1=beta1, beta2=beta2, total_step=total_step, target_modules=["unused"],
        )  # fmt: skip
        placeholders = {
            f"{name}.lora_A.{_ADAPTER}": torch.empty(init_r, 0) for name in self.modules
        }
        self.allocator = RankAllocator(_Triplets(placeholders), self.config, _ADAPTER)

    def observe(self, step: int, values_and_grads: Mapping[str, Mapping[str, tuple]]) -> None:
        """The step's full values and gradients of A, B and g (before the optimizer step).
        As in peft, the statistics stop at total_step - tfinal."""
        if step < self.config.total_step - self.config.tfinal:
            self.tracker.update(values_and_grads)

    def mask(self, step: int, gates: Mapping[str, list[float]]) -> dict[str, list[float]] | None:
        """After optimizer step `step`: the gates with AdaLoRA's masking applied, or None when
        the schedule masks nothing at this step."""
        budget, mask_now = self.allocator.budget_schedule(step)
        if not mask_now:
            return None
        view: dict[str, torch.Tensor] = {}
        for name in self.modules:
            for ours, theirs in _PEFT_NAMES.items():
                key = f"{name}.{theirs}.{_ADAPTER}"
                i_bar = self.tracker.i_bar.get(f"{name}.{ours}")
                u_bar = self.tracker.u_bar.get(f"{name}.{ours}")
                if i_bar is None:  # not observed yet: no importance
                    shape = {"lora_A": (self.init_r, 1), "lora_B": (1, self.init_r)}.get(
                        ours, (self.init_r,)
                    )
                    i_bar = u_bar = torch.zeros(shape)
                if ours == "gate_logits":
                    i_bar, u_bar = i_bar.view(-1, 1), u_bar.view(-1, 1)
                self.allocator.exp_avg_ipt[key] = i_bar
                self.allocator.exp_avg_unc[key] = u_bar
                value = torch.tensor(gates[name]).view(-1, 1) if ours == "gate_logits" else i_bar
                view[key] = value.clone()
        self.allocator.mask_to_budget(_Triplets(view), budget)
        return {name: view[f"{name}.lora_E.{_ADAPTER}"].view(-1).tolist() for name in self.modules}


class AdaLoRA(Method):
    """AdaLoRA at the budget: starts at twice it, masks gates after every step over ALoRA's
    round window (from K1 to the last round's step), is pruned to the budget at the end."""

    name = "adalora"
    gate_kind = GateKind.IDENTITY
    start_factor = 2

    def check(self) -> None:
        if self.settings.num_rounds < 1:
            raise InputError(
                "--method adalora prunes between K1 and the last round: --num_rounds >= 1"
            )

    def schedule_rounds(self) -> int:
        # The schedule places the round boundaries that bound AdaLoRA's window; no round runs.
        return self.settings.num_rounds

    def setup(self, module_names: Sequence[str], r_init: int, schedule: Schedule) -> None:
        self.schedule = AdaLoraSchedule(
            list(module_names),
            init_r=r_init,
            target_r=r_init // 2,
            total_step=schedule.total_steps,
            tinit=schedule.round_after[0],
            tfinal=schedule.total_steps - schedule.last_round_step,
        )

    def after_backward(self, step: int, adapters: Adapters) -> None:
        self.schedule.observe(step, adapters.values_and_grads())

    def after_step(self, step: int, lr: float, adapters: Adapters) -> None:
        # peft's update_and_allocate moment: after the optimizer step.
        masked = self.schedule.mask(step, adapters.gate_values())
        if masked is not None:
            adapters.set_gate_values(masked)

    def final_prune(self, adapters: Adapters, rank_budget: int) -> FinalPrune:
        return prune_smallest_gates(adapters.gate_values(), rank_budget)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.schedule.tracker.state_tensors()

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.schedule.tracker.load_state_tensors(tensors)
