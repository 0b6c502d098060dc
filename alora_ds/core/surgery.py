"""Rank surgery: the adapters after a round, pruned ranks removed and new ranks appended.

One implementation serves every path: training (the DeepSpeed engine reads the full fp32 masters
and Adam moments into `AdapterState`s, calls `plan_states`, and installs the result), the
single-process demo and the tests (`apply_plan`, `remove_ranks`, `append_ranks` on modules,
through the same `resize`).

New ranks follow paper footnote 3: A drawn fresh (Kaiming-uniform, from a generator seeded by
(run seed, round, module name), so every process draws the same values without sending any), B
zero so the model's function does not jump, gate on, zero Adam moments. Plain torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from alora_ds.core.inject import module_generator
from alora_ds.core.layer import GatedLoRALinear, kaiming_uniform_rows

ADAM_STATE_KEYS: tuple[str, ...] = ("exp_avg", "exp_avg_sq")


@dataclass
class AdapterState:
    """One module's adapter as full fp32 tensors: values, Adam moments and the hard gates."""

    values: dict[str, torch.Tensor]  # lora_A (r, d_in), lora_B (d_out, r)[, gate_logits (r,)]
    moments: dict[str, dict[str, torch.Tensor]]  # tensor name -> exp_avg / exp_avg_sq
    gate: torch.Tensor  # (r,)

    @property
    def r(self) -> int:
        return self.gate.shape[0]


def _rank_dim(name: str) -> int:
    """The dimension that indexes ranks: A's rows, B's columns, the gate logits' only one."""
    return 1 if name == "lora_B" else 0


def resize(
    state: AdapterState, drop: Iterable[int], new_a: torch.Tensor, new_logit: float = 0.0
) -> AdapterState:
    """`state` with the ranks in `drop` removed (the others keep their exact values and moments)
    and k = new_a.shape[0] ranks appended: A = new_a (k, d_in), B zero, gate on, gate logit
    `new_logit` (the value that makes a trained gate 1), zero moments."""
    drop = {int(i) for i in drop}
    bad = sorted(i for i in drop if not 0 <= i < state.r)
    if bad:
        raise IndexError(f"rank indices {bad} out of range for a module with {state.r} ranks")
    keep = torch.tensor([i for i in range(state.r) if i not in drop], dtype=torch.long)
    k = new_a.shape[0]

    def grown(name: str, tensor: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
        dim = _rank_dim(name)
        return torch.cat([tensor.index_select(dim, keep), fresh], dim=dim)

    def zeros_like_new(name: str, tensor: torch.Tensor) -> torch.Tensor:
        shape = list(tensor.shape)
        shape[_rank_dim(name)] = k
        return torch.zeros(shape)

    fresh = {
        "lora_A": new_a,
        "lora_B": zeros_like_new("lora_B", state.values["lora_B"]),
        "gate_logits": torch.full((k,), new_logit),
    }
    values = {name: grown(name, t, fresh[name]) for name, t in state.values.items()}
    moments = {
        name: {key: grown(name, m, zeros_like_new(name, m)) for key, m in by_key.items()}
        for name, by_key in state.moments.items()
    }
    gate = torch.cat([state.gate.index_select(0, keep), torch.ones(k)])
    return AdapterState(values, moments, gate)


def plan_states(
    states: Mapping[str, AdapterState],
    pruned: Mapping[str, Sequence[int]],
    added: Mapping[str, int],
    *,
    seed: int,
    round_index: int,
    new_logit: float = 0.0,
) -> dict[str, AdapterState]:
    """Every module's state after a round: `pruned[name]` removed, `added[name]` new ranks with
    A from module_generator(seed, round_index, name)."""
    unknown = sorted((set(pruned) | set(added)) - set(states))
    if unknown:
        raise ValueError(f"the plan names modules that are not adapted: {unknown}")
    out: dict[str, AdapterState] = {}
    for name, state in states.items():
        k = added.get(name, 0)
        d_in = state.values["lora_A"].shape[1]
        new_a = kaiming_uniform_rows(k, d_in, module_generator(seed, round_index, name))
        out[name] = resize(state, pruned.get(name, ()), new_a, new_logit)
    return out


# ---- the same surgery on the modules of a plain (un-partitioned) model ----------------------


def module_state(module: GatedLoRALinear) -> AdapterState:
    """A module's adapter as an AdapterState (fp32 copies; no optimizer, so zero moments)."""
    values = {
        name: module.adapter_tensor(name).detach().float().cpu().clone()
        for name in module.trainable_names()
    }
    moments = {
        name: {key: torch.zeros_like(value) for key in ADAM_STATE_KEYS}
        for name, value in values.items()
    }
    return AdapterState(values, moments, module.lora_gate.detach().float().cpu().clone())


def load_state(
    module: GatedLoRALinear, state: AdapterState, device: torch.device, dtype: torch.dtype
) -> None:
    """Give `module` the values of `state` (new parameters, of any rank) on `device` in `dtype`."""
    logits = state.values.get("gate_logits")
    module.set_adapter_tensors(
        state.values["lora_A"].to(device, dtype),
        state.values["lora_B"].to(device, dtype),
        state.gate.to(device, dtype),
        None if logits is None else logits.to(device, dtype),
    )


def _resize_module(module: GatedLoRALinear, drop: Iterable[int], new_a: torch.Tensor) -> None:
    state = resize(module_state(module), drop, new_a, module.gate_kind.initial_logit)
    load_state(module, state, module.lora_gate.device, module.adapter_dtype)


@torch.no_grad()
def remove_ranks(module: GatedLoRALinear, indices: Iterable[int]) -> None:
    """Remove the given ranks of one module physically; the others keep their values exactly."""
    _resize_module(module, indices, torch.empty(0, module.in_features))


@torch.no_grad()
def append_ranks(module: GatedLoRALinear, k: int, generator: torch.Generator | None = None) -> None:
    """Append k new ranks to one module: A fresh from `generator`, B zero, gate on."""
    if k < 0:
        raise ValueError(f"cannot append a negative number of ranks ({k})")
    _resize_module(module, (), kaiming_uniform_rows(k, module.in_features, generator))


@torch.no_grad()
def apply_plan(
    modules: Mapping[str, GatedLoRALinear],
    pruned: Mapping[str, Sequence[int]],
    added: Mapping[str, int],
    *,
    seed: int,
    round_index: int,
) -> None:
    """A round's plan applied to the modules of a plain model, exactly as training applies it
    (plan_states); the optimizer, if any, must be rebuilt by the caller."""
    new_logit = next(iter(modules.values())).gate_kind.initial_logit if modules else 0.0
    states = plan_states(
        {name: module_state(m) for name, m in modules.items()},
        pruned,
        added,
        seed=seed,
        round_index=round_index,
        new_logit=new_logit,
    )
    for name, module in modules.items():
        load_state(module, states[name], module.lora_gate.device, module.adapter_dtype)
