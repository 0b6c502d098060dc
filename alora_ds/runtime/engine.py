"""One object for a model under DeepSpeed: the engine, the model, the ds config and AdamW's
settings, with every operation the trainer and the methods need from them.

Rules every method keeps:
- Under ZeRO-3 every forward is a collective, so all processes run the same forwards in the same
  order; work is split by giving each process different gate values, never different forwards.
- Methods that gather (full fp32 values, gradients, scores, checksums) are called by every
  process in the same order.
- A rebuild (new adapter shapes after a round) re-creates the DeepSpeed engine; `Engine.ds`
  always names the current one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import deepspeed
import torch
from torch import nn

from alora_ds.core.inject import gated_modules, rank_map
from alora_ds.core.layer import GatedLoRALinear
from alora_ds.core.surgery import AdapterState, load_state, plan_states
from alora_ds.io.peft_write import ModuleAdapter, adapter_tensors_from_model
from alora_ds.runtime import zero
from alora_ds.runtime.process import DistInfo, all_gather_tensor, all_reduce_sum, sum_tensor
from alora_ds.runtime.zero import OptimizerSettings
from alora_ds.scoring.direct import (
    Batch,
    Progress,
    RankScores,
    eval_mode,
    shared_ab_lora_scores,
    supervised_loss_totals,
)
from alora_ds.scoring.fast import LlamaStack, ScoringStats, default_max_rows, fast_ablation_scores
from alora_ds.scoring.screened import ScreenedScores, screened_scores

# A trained part of every adapter, for the alternating steps of bi-level training (DNAS):
# None trains everything, "weights" only A and B, "gates" only the gate tensors.
TrainedPart = str | None


class AllocationMismatch(RuntimeError):
    """Processes disagree on the plan or on the rebuilt adapters: the run cannot go on."""


class Engine:
    """A model wrapped by DeepSpeed with torch's AdamW over its adapters."""

    def __init__(
        self,
        model: nn.Module,
        ds_config: Mapping[str, Any],
        settings: OptimizerSettings,
        info: DistInfo,
    ) -> None:
        self.model = model
        self.ds_config = dict(ds_config)
        self.settings = settings
        self.info = info
        self.ds: deepspeed.DeepSpeedEngine = zero.create_engine(model, self.ds_config, settings)

    @property
    def modules(self) -> dict[str, GatedLoRALinear]:
        """Module name -> gated module, in model order."""
        return gated_modules(self.model)

    def rank_map(self) -> dict[str, int]:
        return rank_map(self.model)

    # ---- a training step ------------------------------------------------------------------

    def set_learning_rates(self, lr: float, gates_lr: float) -> None:
        """The adapters' learning rate, and the trained gates' (their own group)."""
        zero.set_learning_rate(self.ds, lr, gates_lr=gates_lr)

    def set_trained_part(self, part: TrainedPart) -> None:
        for module in self.modules.values():
            module.train_only = part

    def loss(self, batch: Batch) -> torch.Tensor:
        """The mean loss over this micro-batch's supervised tokens (a training forward)."""
        return self.ds(**batch).loss

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        """DeepSpeed steps the optimizer at the accumulation boundary."""
        self.ds.step()

    def optimizer_step_count(self) -> int:
        return zero.optimizer_step_count(self.ds)

    # ---- what the methods read and write (collective under ZeRO) ----------------------------

    def values_and_grads(self) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """Full fp32 value and gradient of every trained adapter tensor. Only between the last
        micro-batch's backward and the step does DeepSpeed hold the step's whole gradient."""
        return zero.adapter_values_and_grads(self.ds, self.modules)

    def gate_values(self) -> dict[str, list[float]]:
        """Every live rank's effective gate value g, on every process (the trained gates are
        gathered under ZeRO-3)."""
        modules = self.modules
        logits = [m.gate_logits for m in modules.values() if m.gate_logits is not None]
        with zero.gathered(logits):
            return {
                name: m.gate_values().detach().float().cpu().tolist() if m.r else []
                for name, m in modules.items()
            }

    def set_gate_values(self, gates: Mapping[str, Sequence[float]]) -> None:
        """Overwrite the trained gates (identity kind: the values themselves) of every module:
        fp32 master and working copy alike."""
        for name, module in self.modules.items():
            if module.gate_logits is not None:
                zero.write_trained(
                    module.gate_logits, torch.tensor(gates[name], dtype=torch.float32)
                )

    def map_gate_logits(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every module's trained gate tensor a by fn(a), computed on the full fp32
        master value (a proximal step, for instance)."""
        for module in self.modules.values():
            if module.gate_logits is not None:
                zero.write_trained(module.gate_logits, fn(zero.full_value(module.gate_logits)))

    def ab_lora_scores(
        self,
        batches: Sequence[Batch],
        *,
        mode: str = "fast",
        max_rows: int = 0,
        progress: Progress | None = None,
        stats: ScoringStats | None = None,
    ) -> RankScores:
        """Exact AB-LoRA scores with the ablations shared out over the processes.

        `fast` (alora_ds.scoring.fast): prefix caching and candidate batching, each process with
        its own share of every (layer, half) group; `naive`: two full forwards per rank, process
        p taking candidates p, p + W, ... Every process ends with every score.
        """

        if mode == "fast" and LlamaStack.supports(self.model):
            return fast_ablation_scores(
                self.model,
                batches,
                max_rows=max_rows or default_max_rows(batches),
                rank=self.info.rank,
                world_size=self.info.world_size,
                gather=self._gather,
                stats=stats,
                start_of_pass=self._start_of_pass(),
                progress=progress,
            )
        return shared_ab_lora_scores(
            self.model,
            batches,
            rank=self.info.rank,
            world_size=self.info.world_size,
            gather=self._gather,
            progress=progress,
        )

    def screened_scores(
        self,
        batches: Sequence[Batch],
        n_prune: int,
        *,
        candidates: int = 0,
        estimator: str = "first-order",
        max_rows: int = 0,
        progress: Progress | None = None,
        stats: ScoringStats | None = None,
        exact_means: bool = False,
    ) -> ScreenedScores:
        """Screened AB-LoRA (alora_ds.scoring.screened): every rank estimated from the gates'
        gradients (B_val's chunks shared out over the processes, the sums all-reduced), exact
        scores where they decide a round that prunes `n_prune`; the same on every process."""
        if not LlamaStack.supports(self.model):
            raise ValueError(
                f"screened scoring needs a LLaMA-style model, got {type(self.model).__name__}"
            )
        return screened_scores(
            self.model,
            batches,
            n_prune,
            candidates=candidates,
            estimator=estimator,
            max_rows=max_rows or default_max_rows(batches),
            rank=self.info.rank,
            world_size=self.info.world_size,
            gather=self._gather,
            all_reduce=self._all_reduce,
            start_of_pass=self._start_of_pass(),
            progress=progress,
            stats=stats,
            exact_means=exact_means,
        )

    def _gather(self, local: torch.Tensor) -> list[torch.Tensor]:
        return [t.cpu() for t in all_gather_tensor(local.to(self.info.device))]

    def _all_reduce(self, local: torch.Tensor) -> torch.Tensor:
        return sum_tensor(local.to(self.info.device)).cpu()

    def _start_of_pass(self) -> Callable[[], None] | None:
        """What the scorers call before each pass through the layers. They call the decoder
        layers one by one, never the model's own forward, where ZeRO-3 resets its fetch
        bookkeeping; without the reset every pass looks like a step of one endless forward and
        the bookkeeping grows without bound."""
        offload = getattr(self.ds.optimizer, "parameter_offload", None)
        return offload.get_param_coordinator().reset_step if offload is not None else None

    @torch.no_grad()
    def dev_loss(self, batches: Sequence[Batch]) -> float:
        """Mean supervised cross-entropy over batches already split across processes. Every
        process passes the same number of batches (pad with batches whose labels are all -100):
        under ZeRO-3 the forwards are collective."""
        with eval_mode(self.model):
            total, count = supervised_loss_totals(self.model, batches)
        total, count = all_reduce_sum([total, count], self.info.device)
        return total / max(count, 1.0)

    # ---- rank surgery on a running engine ---------------------------------------------------

    def read_states(self) -> dict[str, AdapterState]:
        """Every adapter's full fp32 masters, Adam moments and gates (collective under ZeRO)."""
        return zero.read_adapter_states(self.ds, self.modules)

    def planned_states(
        self,
        pruned: Mapping[str, Sequence[int]],
        added: Mapping[str, int],
        *,
        seed: int,
        round_index: int,
    ) -> dict[str, AdapterState]:
        """The adapters after a plan, as full tensors, computed alike on every process."""
        new_logit = next(iter(self.modules.values())).gate_kind.initial_logit
        return plan_states(
            self.read_states(),
            pruned,
            added,
            seed=seed,
            round_index=round_index,
            new_logit=new_logit,
        )

    def rebuild(
        self,
        pruned: Mapping[str, Sequence[int]],
        added: Mapping[str, int],
        *,
        seed: int,
        round_index: int,
    ) -> None:
        """Apply a plan to the running engine: every process computes the same new adapters from
        the same plan (no adapter value is sent), proves that they agree (a checksum
        collective), then the engine is re-created and the exact masters and moments written
        back; surviving ranks keep their values and moments, new ranks start at zero moments."""
        step = self.optimizer_step_count()
        states = self.planned_states(pruned, added, seed=seed, round_index=round_index)
        check_agreement(self.info, round_index, {"pruned": pruned, "added": added}, states)
        self.install(states, step)

    def install(self, states: Mapping[str, AdapterState], step: int) -> None:
        """Replace every adapter (any rank) with `states` and continue Adam at `step`: the engine
        is re-created, which partitions the new adapters, then the exact fp32 masters and
        moments are written back. Every process must pass the same states."""
        zero.destroy_engine(self.ds, self.model)
        dtype = zero.model_dtype(self.ds_config)
        modules = self.modules
        for name, module in modules.items():
            load_state(module, states[name], self.info.device, dtype)
        self.ds = zero.create_engine(self.model, self.ds_config, self.settings)
        zero.write_adapter_states(self.ds, modules, states, step)

    # ---- what is written out ----------------------------------------------------------------

    def adapter_tensors(self) -> dict[str, ModuleAdapter]:
        """Full adapter tensors of every gated module, on every process (gathered under
        ZeRO-3 first, so an export can never come out empty)."""
        with zero.gathered(zero.adapter_params(self.modules)):
            return adapter_tensors_from_model(self.model)


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little", signed=True)


def check_agreement(
    info: DistInfo, round_index: int, plan: Mapping[str, Any], states: Mapping[str, AdapterState]
) -> None:
    """Prove that every process holds the same plan and the same rebuilt adapters.

    Each process hashes the plan and every module's full adapter tensors; the hashes are
    all-gathered and compared. On a mismatch every process raises the same error naming the
    first module that differs, so all of them stop: no hang, no silent divergence.
    """
    labels = ["the allocation plan"]
    digests = [_digest(json.dumps(plan, sort_keys=True).encode())]
    for name, state in states.items():
        labels.append(f"module {name}")
        payload = b"".join(
            state.values[p].contiguous().numpy().tobytes() for p in sorted(state.values)
        )
        digests.append(_digest(payload + state.gate.numpy().tobytes()))
    everyone = all_gather_tensor(torch.tensor(digests, dtype=torch.int64, device=info.device))
    table = torch.stack([t.cpu() for t in everyone])  # (world, 1 + modules)
    for column, label in enumerate(labels):
        differing = (table[:, column] != table[0, column]).nonzero().flatten().tolist()
        if differing:
            raise AllocationMismatch(
                f"after round {round_index}, process {differing[0]} disagrees with process 0 on "
                f"{label}: the processes no longer hold the same adapters"
            )
