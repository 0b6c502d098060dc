"""Put gated LoRA modules into a Hugging Face model (docs/method.md section 2).

The wrapped module takes the place of the linear layer it wraps, so its name in
`model.named_modules()` is the base model's name (e.g. `model.layers.0.self_attn.q_proj`): the
rank map, the scores and the exported adapter all use those names.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from alora_ds.core import LLAMA_TARGET_MODULES
from alora_ds.core.layer import ADAPTER_PARAM_NAMES, GATE_PARAM_NAMES, GatedLoRALinear, GateKind
from alora_ds.errors import InputError

_PLAIN_NAME = re.compile(r"[\w.]+")


def _matches(name: str, target: str) -> bool:
    # A plain dotted name matches the last components of a module name ("q_proj" and
    # "self_attn.q_proj" match "model.layers.0.self_attn.q_proj"); anything else is a regular
    # expression that must match the whole name.
    if _PLAIN_NAME.fullmatch(target):
        return name == target or name.endswith("." + target)
    return re.fullmatch(target, name) is not None


def find_target_modules(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Names of the nn.Linear modules selected by `targets`, in model order.

    Each target is a module name suffix (`q_proj`, `self_attn.q_proj`) or a regular expression
    matched against the full name (`model\\.layers\\.[0-3]\\..*proj`). Every target must select at
    least one linear layer, so a typo is an error rather than a silently smaller adapter.
    """
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise InputError("target_modules is empty: name at least one module (e.g. q_proj)")
    linears = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".base_layer" not in f".{name}"
    ]
    selected: set[str] = set()
    for target in targets:
        try:
            hits = {name for name in linears if _matches(name, target)}
        except re.error as exc:
            raise InputError(
                f"target module pattern {target!r} is not a valid regex: {exc}"
            ) from exc
        if not hits:
            sample = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in linears})[:12])
            raise InputError(
                f"target module {target!r} matches no nn.Linear in the model "
                f"(linear layer names end in: {sample})"
            )
        selected |= hits
    return [name for name in linears if name in selected]


def initial_rank(rank_budget: int, num_modules: int) -> int:
    """r_init = R_target / number of adapted modules; the budget must divide evenly."""
    if num_modules <= 0:
        raise InputError("no module to adapt: the target modules selected nothing")
    if rank_budget < num_modules:
        raise InputError(
            f"rank_budget {rank_budget} is smaller than the number of adapted modules "
            f"({num_modules}): every module needs at least one rank at the start"
        )
    if rank_budget % num_modules:
        lower = rank_budget // num_modules * num_modules
        raise InputError(
            f"rank_budget {rank_budget} does not divide evenly over {num_modules} adapted modules "
            f"(use a multiple of {num_modules}, e.g. {lower} or {lower + num_modules})"
        )
    return rank_budget // num_modules


def module_generator(seed: int, round_index: int, module_name: str) -> torch.Generator:
    """A CPU generator seeded by (run seed, round, module name).

    Every process derives the same generator for the same module and round, so new ranks get the
    same values everywhere without sending any tensor (docs/method.md section 6). sha256 rather than
    Python's hash(), which is salted per process.
    """
    digest = hashlib.sha256(f"{seed}/{round_index}/{module_name}".encode()).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return generator


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def wrap_modules(
    model: nn.Module,
    ranks: Mapping[str, int],
    scales: Mapping[str, float],
    *,
    dropout: float = 0.0,
    seed: int = 0,
    gate_kind: GateKind = GateKind.HARD,
    dtype: torch.dtype | None = None,
) -> dict[str, GatedLoRALinear]:
    """Replace each named nn.Linear with a GatedLoRALinear of the given rank and scale.

    A is drawn from `module_generator(seed, 0, name)`; B starts at zero, so the wrapped model
    computes exactly what the base model computes.
    """
    wrapped: dict[str, GatedLoRALinear] = {}
    for name, r in ranks.items():
        try:
            base = model.get_submodule(name)
        except AttributeError as exc:
            raise InputError(f"module {name!r} does not exist in the model") from exc
        if not isinstance(base, nn.Linear):
            raise InputError(f"module {name!r} is a {type(base).__name__}, not an nn.Linear")
        module = GatedLoRALinear(
            base,
            r,
            alpha=scales[name] * max(r, 1),
            scale=scales[name],
            dropout=dropout,
            dtype=dtype,
            generator=module_generator(seed, 0, name),
            gate_kind=gate_kind,
        )
        _set_submodule(model, name, module)
        wrapped[name] = module
    mark_only_adapters_trainable(model, train_gates=GateKind(gate_kind).trained)
    return wrapped


def inject_gated_lora(
    model: nn.Module,
    rank_budget: int,
    *,
    target_modules: Sequence[str] = LLAMA_TARGET_MODULES,
    lora_alpha: float = 16.0,
    dropout: float = 0.0,
    seed: int = 0,
    gate_kind: GateKind = GateKind.HARD,
    dtype: torch.dtype | None = None,
) -> dict[str, GatedLoRALinear]:
    """Wrap the target modules with a rank budget spread evenly (the budget-compliant start).

    Returns module name -> GatedLoRALinear. Every module gets r_init = budget / modules and the
    scale alpha / r_init, which it keeps when its rank changes later.
    """
    names = find_target_modules(model, target_modules)
    r_init = initial_rank(rank_budget, len(names))
    scale = lora_alpha / r_init
    return wrap_modules(
        model,
        {name: r_init for name in names},
        {name: scale for name in names},
        dropout=dropout,
        seed=seed,
        gate_kind=gate_kind,
        dtype=dtype,
    )


def gated_modules(model: nn.Module) -> dict[str, GatedLoRALinear]:
    """Module name -> GatedLoRALinear, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, GatedLoRALinear)}


def rank_map(model: nn.Module) -> dict[str, int]:
    """Module name -> number of live ranks: the allocation state as plain data."""
    return {name: module.r for name, module in gated_modules(model).items()}


def mark_only_adapters_trainable(model: nn.Module, *, train_gates: bool = False) -> list[str]:
    """Freeze everything except A and B (and the gate logits when `train_gates`).

    Returns the names of the trainable parameters; asserts that each one is an adapter tensor, so
    a stray trainable base weight cannot slip through.
    """
    trainable_leaf = set(ADAPTER_PARAM_NAMES) | (set(GATE_PARAM_NAMES) if train_gates else set())
    names = []
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        param.requires_grad_(leaf in trainable_leaf)
        if param.requires_grad:
            names.append(name)
    assert all(n.rsplit(".", 1)[-1] in trainable_leaf for n in names)
    return names


@dataclass(frozen=True)
class ParamCount:
    trainable: int
    total: int

    def __str__(self) -> str:
        share = 100.0 * self.trainable / max(self.total, 1)
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || {share:.4f}%"


def _numel(param: torch.Tensor) -> int:
    # Under ZeRO-3 a partitioned parameter is empty locally; ds_numel is its full size.
    numel = int(getattr(param, "ds_numel", param.numel()))
    if hasattr(param, "quant_state"):  # bitsandbytes 4-bit: two weights per byte of storage
        numel *= 2 * param.element_size()
    return numel


def count_parameters(model: nn.Module) -> ParamCount:
    """Trainable and total parameter counts (full sizes, also under ZeRO-3)."""
    params = list(model.parameters())
    return ParamCount(
        trainable=sum(_numel(p) for p in params if p.requires_grad),
        total=sum(_numel(p) for p in params),
    )
