"""The portable export: one rank and one scale for every module, so that an adapter with a
different rank in every module means the same thing to every engine that serves LoRA adapters.

The PEFT-native export (peft_write.py) gives each module its rank in `rank_pattern` and its
scale in `alpha_pattern`. Only peft reads those. The serving engines read the global `r` and
`lora_alpha` alone:

- vLLM (vllm/lora/peft_helper.py): one scale `lora_alpha / r` for every module, each module's
  rank taken from its tensors, and only the global `r` checked against `--max-lora-rank`.
- llama.cpp, and so Ollama and LM Studio (convert_lora_to_gguf.py keeps only `lora_alpha`;
  llama-adapter.h `get_scale`): `alpha / rank` with the rank of each module's own lora_b, so
  every module whose rank differs from the global `r` is applied at the wrong scale.

Here every module is padded with zero ranks to R, the largest rank (zero rows of A and zero
columns of B add nothing: B' A' = B A), and `lora_alpha = s * R` with no patterns, so that
`lora_alpha / r` and `alpha / rank` are both s for every module, under every rule. A module
whose scale differs from the common one (s_m != s) has the ratio s_m / s folded into its B in
fp32, rounded once. What each module really holds is recorded in alora_metadata.json
(`portable`: its own rank and any folded ratio).

The padding costs R / r_m times a module's size on disk; vLLM pads every module to
`--max-lora-rank` in memory anyway, and llama.cpp's matmuls with zero ranks are cheap.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alora_ds.errors import InputError
from alora_ds.io.peft_read import (
    CONFIG_NAME,
    read_json_object,
    read_lora_config,
    read_peft_adapter,
)
from alora_ds.io.peft_write import (
    METADATA_NAME,
    ModuleAdapter,
    lora_config,
    peft_tensors,
    write_adapter_files,
)

PORTABLE_SUFFIX = "_portable"
_KEY_PREFIX = "base_model.model."


def portable_dir(native_dir: str | Path) -> Path:
    """Where training writes the portable twin of an adapter directory: adapter/ ->
    adapter_portable/, best_adapter/ -> best_adapter_portable/."""
    native_dir = Path(native_dir)
    return native_dir.with_name(native_dir.name + PORTABLE_SUFFIX)


@dataclass(frozen=True)
class PortableAdapter:
    """A portable adapter as plain data, ready to write."""

    state: dict[str, torch.Tensor]  # peft's keys; every lora_A (R, d_in), every lora_B (d_out, R)
    config: dict[str, Any]  # adapter_config.json: r = R, lora_alpha = s * R, no patterns
    ranks: dict[str, int]  # module -> the ranks it really holds (the rest are zero)
    folded: dict[str, float]  # module -> s_m / s folded into its B, where that is not 1

    def metadata(self, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """alora_metadata.json: `base` (the native export's metadata) plus what the padding
        and folding did."""
        return {
            **(base or {}),
            "portable": {
                "r": self.config["r"],
                "lora_alpha": self.config["lora_alpha"],
                "ranks": self.ranks,
                "folded_scale": self.folded,
            },
        }


def _common_scale(scales: Mapping[str, float]) -> float:
    # The most common scale (ties: the larger) leaves the most modules' B untouched. In our
    # runs every module has the same scale (lora_alpha / r_init), so nothing is folded.
    counts = Counter(scales.values())
    return max(counts, key=lambda s: (counts[s], s))


def make_portable(
    lora_a: Mapping[str, torch.Tensor],
    lora_b: Mapping[str, torch.Tensor],
    scales: Mapping[str, float],
    *,
    base_model_name_or_path: str | None,
    task_type: str = "CAUSAL_LM",
) -> PortableAdapter:
    """Pad every module to the largest rank and fold every scale into one `lora_alpha`.

    Args:
        lora_a: module name -> (r_m, d_in); every r_m > 0.
        lora_b: module name -> (d_out, r_m), gates (if any) already folded in.
        scales: module name -> the scale peft applies to it (alpha_m / r_m).
        base_model_name_or_path, task_type: recorded in adapter_config.json.
    """
    if not lora_a:
        raise InputError("refusing to write an empty adapter: no module has a rank")
    rank = max(a.shape[0] for a in lora_a.values())  # R
    common = _common_scale(scales)
    state: dict[str, torch.Tensor] = {}
    folded: dict[str, float] = {}
    for name, a in lora_a.items():
        b = lora_b[name]
        r = a.shape[0]
        factor = scales[name] / common
        # alpha_m / r_m read back from a native export can be s +- 1 ulp (see peft_write's
        # note on alpha = s * r): that is the same scale, not one to fold.
        if not math.isclose(factor, 1.0, rel_tol=1e-12):
            folded[name] = factor
            b = (b.to(torch.promote_types(b.dtype, torch.float32)) * factor).to(b.dtype)
            if not torch.isfinite(b).all():
                raise InputError(
                    f"module {name}: folding its scale ratio {factor:.6g} into lora_B "
                    f"overflows {b.dtype}"
                )
        a_pad = torch.zeros((rank, a.shape[1]), dtype=a.dtype)  # (R, d_in)
        b_pad = torch.zeros((b.shape[0], rank), dtype=b.dtype)  # (d_out, R)
        a_pad[:r] = a
        b_pad[:, :r] = b
        state[f"{_KEY_PREFIX}{name}.lora_A.weight"] = a_pad
        state[f"{_KEY_PREFIX}{name}.lora_B.weight"] = b_pad
    ranks = {name: a.shape[0] for name, a in lora_a.items()}
    # lora_config writes one pattern entry per module; with a single rank and scale the
    # defaults say it all, and the patterns go.
    config = lora_config(
        dict.fromkeys(ranks, rank),
        dict.fromkeys(ranks, common),
        base_model_name_or_path=base_model_name_or_path,
    )
    config.update(task_type=task_type, rank_pattern={}, alpha_pattern={})
    return PortableAdapter(state, config, ranks, folded)


def write_portable_adapter(
    tensors: Mapping[str, ModuleAdapter],
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """The portable twin of `write_peft_adapter` (same input, same checks, same atomic write):
    training writes both. Modules with zero ranks are left out, as there."""
    state = peft_tensors(tensors)  # checked, gates folded into B
    live = [name for name, module in tensors.items() if module.r > 0]
    portable = make_portable(
        {name: state[f"{_KEY_PREFIX}{name}.lora_A.weight"] for name in live},
        {name: state[f"{_KEY_PREFIX}{name}.lora_B.weight"] for name in live},
        {name: tensors[name].scale for name in live},
        base_model_name_or_path=base_model_name_or_path,
    )
    return write_adapter_files(
        out_dir, portable.state, portable.config, portable.metadata(metadata)
    )


def check_convertible(adapter_dir: str | Path) -> dict:
    """adapter_config.json of an adapter that a portable export can represent: plain LoRA.
    rsLoRA's alpha / sqrt(r) and DoRA's magnitude vectors have no form that llama.cpp applies."""
    config = read_lora_config(adapter_dir)
    config_path = Path(adapter_dir) / CONFIG_NAME
    if config.get("use_rslora"):
        raise InputError(
            f"{config_path}: use_rslora is set; a portable adapter needs the plain alpha / r "
            "scale (llama.cpp has no rsLoRA): merge the adapter into the base with "
            "python -m eval.merge instead"
        )
    if config.get("use_dora"):
        raise InputError(
            f"{config_path}: use_dora is set; DoRA's magnitude vectors have no portable LoRA "
            "form: merge the adapter into the base with python -m eval.merge instead"
        )
    return config


def convert_adapter(adapter_dir: str | Path, out_dir: str | Path) -> PortableAdapter:
    """Write the portable form of a PEFT LoRA adapter directory (ours or any plain LoRA one)
    to `out_dir`; everything is read and checked before anything is written."""
    config = check_convertible(adapter_dir)
    adapter = read_peft_adapter(adapter_dir)
    portable = make_portable(
        adapter.lora_A,
        adapter.lora_B,
        adapter.scales,
        base_model_name_or_path=config.get("base_model_name_or_path"),
        task_type=config.get("task_type") or "CAUSAL_LM",
    )
    metadata_file = Path(adapter_dir) / METADATA_NAME
    base_metadata = read_json_object(metadata_file) if metadata_file.is_file() else None
    write_adapter_files(out_dir, portable.state, portable.config, portable.metadata(base_metadata))
    return portable
