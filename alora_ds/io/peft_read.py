"""Reading LoRA adapters saved in Hugging Face PEFT's format into gated modules.

PEFT's format: `adapter_config.json` (r, lora_alpha, target_modules, rank_pattern, alpha_pattern,
use_rslora, ...) and `adapter_model.safetensors` with keys
`base_model.model.<module name>.lora_A.weight` (r, d_in) and `...lora_B.weight` (d_out, r).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from pickle import UnpicklingError  # the error type only: nothing here unpickles

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from alora_ds.core.inject import wrap_modules
from alora_ds.core.layer import GatedLoRALinear
from alora_ds.errors import InputError
from alora_ds.io.files import read_utf8

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
_KEY_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"(?P<module>.+)\.lora_(?P<which>[AB])\.weight")


def pattern_value(patterns: Mapping[str, float], module_name: str, default: float) -> float:
    """The value peft uses for a module under `rank_pattern` / `alpha_pattern`.

    Same rule as peft: the first pattern key that matches the end of the module name (at a dot
    boundary, as a regex) wins; otherwise the default.
    """
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


@dataclass(frozen=True)
class PeftLoraAdapter:
    """A PEFT LoRA adapter as plain data: per module, A, B and the scale peft would use."""

    path: Path
    config: dict
    lora_A: dict[str, torch.Tensor]  # module name -> (r, d_in)
    lora_B: dict[str, torch.Tensor]  # module name -> (d_out, r)
    scales: dict[str, float]

    @property
    def ranks(self) -> dict[str, int]:
        return {name: a.shape[0] for name, a in self.lora_A.items()}


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object (adapter_config.json, alora_metadata.json); anything else is
    a one-line InputError naming the file."""
    try:
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc.msg})") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def read_lora_config(adapter_dir: str | Path) -> dict:
    """adapter_config.json of a PEFT LoRA adapter directory, checked only for being one (the
    directory and file exist, hold a JSON object, peft_type LORA); its fields are unchecked."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / CONFIG_NAME
    if not adapter_dir.is_dir():
        raise InputError(f"adapter directory {adapter_dir} does not exist")
    if not config_path.is_file():
        raise InputError(
            f"adapter directory {adapter_dir} has no {CONFIG_NAME}: not a PEFT adapter "
            "(a model checkpoint? pass the adapter's directory)"
        )
    config = read_json_object(config_path)
    if config.get("peft_type", "LORA") != "LORA":
        raise InputError(
            f"{config_path}: peft_type is {config['peft_type']!r}, only LORA is supported"
        )
    return config


def _read_config(adapter_dir: Path) -> dict:
    config = read_lora_config(adapter_dir)
    config_path = adapter_dir / CONFIG_NAME
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "modules_to_save": bool(config.get("modules_to_save")),
        "bias": config.get("bias", "none") != "none",
    }
    for field, present in unsupported.items():
        if present:
            raise InputError(f"{config_path}: field {field}={config[field]!r} is not supported")
    for field in ("r", "lora_alpha"):
        if not isinstance(config.get(field), (int, float)) or config[field] <= 0:
            raise InputError(f"{config_path}: field {field!r} must be a positive number")
    return config


def _read_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors. Only formats that cannot run code are read: safetensors, or a
    torch checkpoint with weights_only=True (plain tensors and containers, no arbitrary pickle)."""
    safetensors_file, bin_file = adapter_dir / SAFETENSORS_NAME, adapter_dir / BIN_NAME
    if safetensors_file.is_file():
        try:
            return load_file(str(safetensors_file))
        except (SafetensorError, OSError) as exc:
            raise InputError(
                f"{safetensors_file} is not a readable safetensors file ({_first_line(exc)})"
            ) from exc
    if bin_file.is_file():
        try:
            state = torch.load(bin_file, map_location="cpu", weights_only=True)
        except (UnpicklingError, RuntimeError, EOFError, OSError) as exc:
            raise InputError(
                f"{bin_file} is not a readable weights-only torch checkpoint "
                f"({type(exc).__name__}); save the adapter as {SAFETENSORS_NAME}"
            ) from exc
        if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise InputError(f"{bin_file}: expected a dict of tensors")
        return state
    raise InputError(f"adapter directory {adapter_dir} has no {SAFETENSORS_NAME} (or {BIN_NAME})")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_peft_adapter(adapter_dir: str | Path) -> PeftLoraAdapter:
    """Read and check a PEFT LoRA adapter directory (no model needed)."""
    adapter_dir = Path(adapter_dir)
    config = _read_config(adapter_dir)
    weights = _read_weights(adapter_dir)
    lora_a: dict[str, torch.Tensor] = {}
    lora_b: dict[str, torch.Tensor] = {}
    for key, tensor in weights.items():
        name = key.removeprefix(_KEY_PREFIX)
        match = _KEY_RE.fullmatch(name)
        if match is None:
            raise InputError(
                f"{adapter_dir}: tensor {key!r} is not a LoRA A/B weight (only plain LoRA is supported)"
            )
        (lora_a if match["which"] == "A" else lora_b)[match["module"]] = tensor
    if not lora_a:
        raise InputError(f"{adapter_dir}: the adapter holds no LoRA weight")
    for name in sorted(set(lora_a) ^ set(lora_b)):
        raise InputError(f"{adapter_dir}: module {name} has only one of lora_A / lora_B")

    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    scales: dict[str, float] = {}
    for name, a in lora_a.items():
        b = lora_b[name]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r:
            raise InputError(
                f"{adapter_dir}: module {name} has lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)}, which are not (r, d_in) and (d_out, r)"
            )
        r_config = pattern_value(rank_pattern, name, config["r"])
        if r_config != r:
            raise InputError(
                f"{adapter_dir}: module {name} holds rank {r} but the config gives r={r_config}"
            )
        alpha = pattern_value(alpha_pattern, name, config["lora_alpha"])
        scales[name] = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return PeftLoraAdapter(adapter_dir, config, lora_a, lora_b, scales)


def check_adapter_fits(adapter: PeftLoraAdapter, model: nn.Module) -> None:
    """Every module named in the adapter must exist in the model as an nn.Linear of matching
    shape; the error names the first module that does not. Works on a model built on the meta
    device, so a mismatch is found before any weight is loaded."""
    for name, a in adapter.lora_A.items():
        try:
            base = model.get_submodule(name)
        except AttributeError as exc:
            raise InputError(
                f"{adapter.path}: adapter module {name} does not exist in the base model "
                "(is the adapter for another model?)"
            ) from exc
        if not isinstance(base, nn.Linear):
            raise InputError(
                f"{adapter.path}: adapter module {name} is not an nn.Linear in the base model"
            )
        b = adapter.lora_B[name]
        if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
            raise InputError(
                f"{adapter.path}: module {name} expects a ({base.out_features} x "
                f"{base.in_features}) weight but the adapter is ({b.shape[0]} x {a.shape[1]}) "
                "(is the adapter for another model?)"
            )


def load_peft_adapter(
    model: nn.Module, adapter_dir: str | Path, *, seed: int = 0
) -> dict[str, GatedLoRALinear]:
    """Wrap a base model's modules with gated LoRA modules holding a PEFT adapter's weights.

    The result computes what `PeftModel.from_pretrained(model, adapter_dir)` computes, with every
    rank's gate on.
    """
    adapter = read_peft_adapter(adapter_dir)
    check_adapter_fits(adapter, model)
    modules = wrap_modules(model, adapter.ranks, adapter.scales, seed=seed)
    with torch.no_grad():
        for name, module in modules.items():
            module.lora_A.copy_(adapter.lora_A[name])
            module.lora_B.copy_(adapter.lora_B[name])
    return modules
