"""Writing a gated adapter as a Hugging Face PEFT LoRA adapter that peft reproduces exactly.

PEFT computes `W x + (alpha / r) * B A drop(x)` per module; ours computes
`W x + s * B diag(g) A drop(x)`. The two agree when the gates are folded into B (B' = B diag(g),
one scale per column) and each module gets `alpha = s * r` in `alpha_pattern`, with its own rank
in `rank_pattern` (peft's alpha / r is then s, or for some (s, r) the float next to it: no
float alpha gives s exactly there). Modules left with no rank are omitted (peft refuses r = 0).

The input is plain data (`ModuleAdapter` per module), so the same writer serves a single-process
model (`adapter_tensors_from_model`) and ZeRO-3, where the caller gathers the shards first. Every
tensor is checked before anything is written: an un-gathered ZeRO-3 parameter is an empty tensor,
and an adapter written from it would load "fine" and do nothing.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from alora_ds.core.inject import gated_modules
from alora_ds.errors import InputError
from alora_ds.io.files import atomic_output_dir
from alora_ds.io.peft_read import CONFIG_NAME, SAFETENSORS_NAME

METADATA_NAME = "alora_metadata.json"
_KEY_PREFIX = "base_model.model."
_MODULE_NAME = re.compile(r"\w+(\.\w+)*")


@dataclass(frozen=True)
class ModuleAdapter:
    """One module's adapter as full (un-partitioned) tensors.

    Attributes:
        lora_A: (r, in_features).
        lora_B: (out_features, r).
        gate: (r,) effective gate values (`GatedLoRALinear.gate_values()`).
        scale: the module's fixed LoRA scale s.
        in_features: the base layer's input size, read from the base model (not from A), so a
            tensor that was not gathered or belongs to another model is caught.
        out_features: the base layer's output size, likewise.
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    gate: torch.Tensor
    scale: float
    in_features: int
    out_features: int

    @property
    def r(self) -> int:
        """Number of ranks (A's rows); 0 for an empty or malformed A."""
        return self.lora_A.shape[0] if self.lora_A.dim() == 2 else 0


@torch.no_grad()
def adapter_tensors_from_model(model: nn.Module) -> dict[str, ModuleAdapter]:
    """Module name -> ModuleAdapter for every gated module of an un-partitioned model.

    The tensors are CPU copies, so training may go on while they are written. Under ZeRO-3 the
    parameters are shards: gather them and build the `ModuleAdapter`s yourself.
    """
    return {
        name: ModuleAdapter(
            lora_A=module.adapter_tensor("lora_A").detach().to("cpu", copy=True),
            lora_B=module.adapter_tensor("lora_B").detach().to("cpu", copy=True),
            gate=module.gate_values().detach().to("cpu", copy=True),
            scale=module.scale,
            in_features=module.in_features,
            out_features=module.out_features,
        )
        for name, module in gated_modules(model).items()
    }


def pattern_key(module_name: str) -> str:
    """The rank_pattern / alpha_pattern key that selects exactly one module.

    peft matches a key with `re.match(rf"(.*\\.)?({key})$", name)`: the key is a regex (an
    unescaped dot matches any character) that may match the end of a longer name. Escaping makes
    the dots literal; the leading `^` fails whenever the optional prefix group is non-empty, so
    the key matches the whole name only (as in peft's own example `^model.decoder.layers.0...`).
    """
    return "^" + re.escape(module_name)


def _hint_matches(name: str, hint: str) -> bool:
    # Same rule as inject.find_target_modules: a plain dotted name is a suffix at a dot boundary,
    # anything else a regex over the whole name.
    if _MODULE_NAME.fullmatch(hint):
        return name == hint or name.endswith("." + hint)
    return re.fullmatch(hint, name) is not None


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def _check_module(name: str, module: ModuleAdapter) -> None:
    """Raise InputError naming the module and the shapes when its tensors do not fit together."""
    if not _MODULE_NAME.fullmatch(name):
        raise InputError(f"adapter module name {name!r} is not a dotted module name")
    if name.endswith((".base_layer", ".lora_A", ".lora_B")):
        raise InputError(
            f"adapter module name {name!r} names a part of an adapter, not the base model's module"
        )
    a, b, gate = module.lora_A, module.lora_B, module.gate
    shapes = f"lora_A {_shape(a)}, lora_B {_shape(b)}, gate {_shape(gate)}"
    if module.in_features <= 0 or module.out_features <= 0:
        raise InputError(
            f"module {name}: in_features {module.in_features} and out_features "
            f"{module.out_features} must be positive"
        )
    expected = f"expected ({{r}}, {module.in_features}), ({module.out_features}, {{r}}), ({{r}},)"
    if a.dim() != 2 or b.dim() != 2 or gate.dim() != 1:
        # An un-gathered ZeRO-3 parameter is a 1-d empty tensor: say so, it is the usual cause.
        note = " (a ZeRO-3 shard that was not gathered?)" if 0 in (a.numel(), b.numel()) else ""
        raise InputError(f"module {name}: {shapes}, {expected.format(r='r')}{note}")
    r = a.shape[0]
    if (
        a.shape[1] != module.in_features
        or b.shape != (module.out_features, r)
        or gate.shape != (r,)
    ):
        raise InputError(f"module {name}: {shapes}, {expected.format(r=r)}")
    for label, tensor in (("lora_A", a), ("lora_B", b), ("gate", gate)):
        if not tensor.is_floating_point():
            raise InputError(f"module {name}: {label} has dtype {tensor.dtype}, not a float type")
    if not (math.isfinite(module.scale) and module.scale > 0):
        raise InputError(f"module {name}: scale {module.scale!r} must be a positive finite number")


def _check_finite(name: str, label: str, tensor: torch.Tensor) -> None:
    bad = (~torch.isfinite(tensor)).sum().item()
    if bad:
        raise InputError(
            f"module {name}: {label} {_shape(tensor)} {tensor.dtype} has {bad} non-finite values"
        )


def peft_tensors(
    tensors: Mapping[str, ModuleAdapter], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The checked safetensors state dict: `base_model.model.<name>.lora_A.weight` (r, d_in) and
    `...lora_B.weight` (d_out, r) with the gates folded into B, for the modules with r > 0."""
    state: dict[str, torch.Tensor] = {}
    for name, module in tensors.items():
        _check_module(name, module)
        if module.r == 0:
            continue
        out_dtype = dtype or module.lora_A.dtype
        # Fold in fp32 (at least), then cast once: a bf16 product would round twice.
        work = torch.promote_types(out_dtype, torch.float32)
        gate = module.gate.detach().to("cpu", work)
        _check_finite(name, "gate", gate)
        a = module.lora_A.detach().to("cpu", out_dtype).contiguous()  # (r, d_in)
        b = (module.lora_B.detach().to("cpu", work) * gate).to(out_dtype).contiguous()  # (d_out, r)
        # Checked after the cast: a value that overflows fp16 only becomes inf here.
        _check_finite(name, "lora_A", a)
        _check_finite(name, "lora_B (gates folded in)", b)
        state[f"{_KEY_PREFIX}{name}.lora_A.weight"] = a.clone()
        state[f"{_KEY_PREFIX}{name}.lora_B.weight"] = b.clone()
    if not state:
        listed = f"all {len(tensors)} modules have zero ranks" if tensors else "no module was given"
        raise InputError(f"refusing to write an empty adapter: {listed}")
    return state


def peft_config(
    tensors: Mapping[str, ModuleAdapter], *, base_model_name_or_path: str | None
) -> dict[str, Any]:
    """adapter_config.json for the modules with r > 0: every module has its own exact
    rank_pattern and alpha_pattern entry, so the defaults r / lora_alpha never apply to it."""
    for name, module in tensors.items():
        _check_module(name, module)
    live = {name: module for name, module in tensors.items() if module.r > 0}
    if not live:
        raise InputError("refusing to write an empty adapter: no module has a rank")
    return lora_config(
        {name: module.r for name, module in live.items()},
        {name: module.scale for name, module in live.items()},
        base_model_name_or_path=base_model_name_or_path,
    )


def lora_config(
    ranks: Mapping[str, int],
    scales: Mapping[str, float],
    *,
    base_model_name_or_path: str | None,
    lora_dropout: float = 0.0,
    inference_mode: bool = True,
) -> dict[str, Any]:
    """A PEFT LoraConfig (as its JSON dict) that gives every module in `ranks` (all > 0) its
    own rank and scale through rank_pattern / alpha_pattern, one anchored key per module.

    inference_mode=False and a dropout make it a config to start a fresh run from
    (`LoraConfig(**config)` for `get_peft_model`); the defaults are an exported adapter's.
    """
    # peft's scaling is alpha / r in float64. With alpha = s * r it is s exactly whenever any
    # float alpha can give s; for about one (s, r) pair in nine none can (the quotients of floats
    # by r skip some floats), and s * r then gives the nearest one, 1 ulp (1e-16 relative) away.
    alphas = {name: scales[name] * r for name, r in ranks.items()}
    # The defaults are the most common rank and its alpha (ties: the larger rank): every module
    # has its own pattern entries, so only tools that ignore the patterns read them.
    counts = Counter(ranks.values())
    default_name = max(ranks, key=lambda n: (counts[ranks[n]], ranks[n]))
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": ranks[default_name],
        "lora_alpha": alphas[default_name],
        "rank_pattern": {pattern_key(n): r for n, r in ranks.items()},
        "alpha_pattern": {pattern_key(n): alpha for n, alpha in alphas.items()},
        "target_modules": list(ranks),
        "lora_dropout": lora_dropout,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": inference_mode,
    }


def write_peft_adapter(
    tensors: Mapping[str, ModuleAdapter],
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | None,
    target_names_hint: Sequence[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `tensors` to `out_dir` as a PEFT LoRA adapter; returns `out_dir`.

    Args:
        tensors: module name (the base model's, e.g. `model.layers.0.self_attn.q_proj`) ->
            full tensors. Modules with zero ranks are left out of the adapter.
        out_dir: adapter directory. It is written in a temporary directory next to it and renamed
            into place when complete; an existing adapter directory (or empty directory) there is
            replaced only then. Any other existing path is refused.
        base_model_name_or_path: recorded in adapter_config.json (peft's default base model).
        target_names_hint: the target module names used in training (`q_proj`, ...: suffixes or
            regexes as in `inject.find_target_modules`); when given, every module name must match
            one, which catches names carrying a wrapper's prefix or suffix.
        metadata: written as alora_metadata.json (rank map, scores per round) when given.
        dtype: dtype of the saved tensors; default: each module's lora_A dtype.

    Raises InputError, before writing anything, when a tensor is mis-shaped, empty or not finite,
    or when no module has a rank.
    """
    if target_names_hint is not None:
        hints = [target_names_hint] if isinstance(target_names_hint, str) else target_names_hint
        for name in tensors:
            if not any(_hint_matches(name, hint) for hint in hints):
                raise InputError(
                    f"adapter module {name!r} matches none of the target modules {list(hints)}"
                )
    state = peft_tensors(tensors, dtype)
    config = peft_config(tensors, base_model_name_or_path=base_model_name_or_path)
    return write_adapter_files(out_dir, state, config, metadata)


def write_adapter_files(
    out_dir: str | Path,
    state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checked adapter (safetensors state dict, adapter_config.json, and
    alora_metadata.json when given) to `out_dir` atomically; returns `out_dir`.

    An existing adapter directory (or empty directory) there is replaced only when the new one
    is complete; any other existing path is refused.
    """
    # Serialised up front so that a dict json cannot encode fails before any write.
    config_text = json.dumps(dict(config), indent=2)
    metadata_text = None if metadata is None else json.dumps(dict(metadata), indent=2)

    with atomic_output_dir(out_dir, marker=CONFIG_NAME) as tmp:
        save_file(dict(state), str(tmp / SAFETENSORS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(config_text + "\n", encoding="utf-8")
        if metadata_text is not None:
            (tmp / METADATA_NAME).write_text(metadata_text + "\n", encoding="utf-8")
    return Path(out_dir)
