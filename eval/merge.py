"""Merge a PEFT LoRA adapter into its base model and save a full checkpoint.

    python -m eval.merge --model_name_or_path BASE_DIR --adapter ADAPTER_DIR \\
        --output_dir MERGED_DIR [--dtype bfloat16] [--max_shard_size 5GB]

Each adapted weight becomes W + s * B A (s = alpha / r, per module from the adapter's
rank_pattern / alpha_pattern), computed in fp32 and cast to the output dtype once. The merged
model is saved with save_pretrained (safetensors, sharded) together with the base directory's
tokenizer files, in a temporary directory renamed into place at the end: an interrupted merge
leaves nothing behind, and an existing checkpoint at --output_dir is replaced only when the new
one is complete.

The adapter is checked against the base architecture (built on the meta device) before any weight
is loaded, so an adapter for another model fails in seconds with the module's name.
"""

from __future__ import annotations

import argparse
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from alora_ds.errors import ArgumentParser, InputError, run_cli
from alora_ds.io.files import atomic_output_dir, check_output_location, check_replaceable
from alora_ds.io.models import DTYPES, empty_causal_lm, parse_dtype
from alora_ds.io.peft_read import PeftLoraAdapter, check_adapter_fits, read_peft_adapter
from alora_ds.io.pretrained import resolve_model_alias

# Files a tokenizer may consist of (LLaMA: tokenizer.model / tokenizer.json plus the configs).
TOKENIZER_PATTERNS: tuple[str, ...] = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "chat_template*",
)
_SIZE = re.compile(r"(?P<value>\d+(\.\d+)?)\s*(?P<unit>[KMGT]i?B)?", re.IGNORECASE)
_UNITS = {
    None: 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '2GiB' / '1000000' -> bytes; anything else is an InputError."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise InputError(f"--max_shard_size {text!r} is not a size such as 5GB, 500MB or 2GiB")
    unit = match["unit"].upper() if match["unit"] else None
    size = int(float(match["value"]) * _UNITS[unit])
    if size <= 0:
        raise InputError(f"--max_shard_size {text!r} must be positive")
    return size


def first_line(exc: Exception) -> str:
    """The first line of an exception's message (its type when the message is empty)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def base_skeleton(model_name_or_path: str, trust_remote_code: bool = False) -> nn.Module:
    """The base architecture on the meta device (no weights), to check an adapter against.
    Code shipped with the model runs only with `trust_remote_code`."""
    return empty_causal_lm(model_name_or_path, trust_remote_code)


def load_base(
    model_name_or_path: str,
    dtype: torch.dtype,
    *,
    attn_implementation: str = "sdpa",
    device_map: str | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """The base model's weights (safetensors, or weights-only checkpoints: transformers never
    unpickles them); code shipped with the model runs only with `trust_remote_code`."""
    placement: dict[str, str] = {"device_map": device_map} if device_map else {}
    try:
        return AutoModelForCausalLM.from_pretrained(
            model_name_or_path,
            dtype=dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            **placement,
        )
    except OSError as exc:
        raise InputError(f"cannot load model {model_name_or_path!r}: {first_line(exc)}") from exc


def check_mergeable(adapter: PeftLoraAdapter, model: nn.Module) -> None:
    """The adapter fits the model (names and shapes), and no adapted weight is tied to another
    parameter (lm_head sharing the embedding): merging into it would change both. Works on a
    model built on the meta device."""
    check_adapter_fits(adapter, model)
    # Tied parameters are one Parameter object under several names (also on the meta device,
    # where every data_ptr is 0).
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for name in adapter.lora_A:
        shared = names[id(model.get_submodule(name).weight)]
        if len(shared) > 1:
            raise InputError(
                f"{adapter.path}: module {name} shares its weight with {', '.join(shared)}: "
                "merging would change both"
            )


@torch.no_grad()
def merge_adapter(model: nn.Module, adapter: PeftLoraAdapter) -> None:
    """Add s * B A to the weight of every module the adapter names, in place.

    The sum is taken in fp32 and rounded to the weight's dtype once.
    """
    check_mergeable(adapter, model)
    for name in adapter.lora_A:
        weight = model.get_submodule(name).weight  # (d_out, d_in)
        a = adapter.lora_A[name].to(weight.device, torch.float32)  # (r, d_in)
        b = adapter.lora_B[name].to(weight.device, torch.float32)  # (d_out, r)
        merged = weight.float() + adapter.scales[name] * (b @ a)
        weight.copy_(merged.to(weight.dtype))


def _inside(path: Path, other: Path) -> bool:
    # True when `other` is `path` or lies inside it (replacing `path` would delete `other`).
    path, other = path.resolve(), other.resolve()
    return other == path or path in other.parents


def copy_tokenizer_files(base_dir: Path, out_dir: Path) -> list[str]:
    """Copy the base directory's tokenizer files byte for byte; returns the names copied.

    Copying (rather than loading and re-saving the tokenizer) keeps them exact and needs no
    tokenizer library for formats such as sentencepiece.
    """
    copied = []
    for pattern in TOKENIZER_PATTERNS:
        for path in sorted(base_dir.glob(pattern)):
            if path.is_file():
                shutil.copy2(path, out_dir / path.name)
                copied.append(path.name)
    return copied


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m eval.merge",
        description="Merge a PEFT LoRA adapter into its base model and save a full checkpoint.",
    )
    parser.add_argument(
        "--model_name_or_path", required=True, help="base model directory (or the alias smollm2)"
    )
    parser.add_argument("--adapter", required=True, help="PEFT LoRA adapter directory")
    parser.add_argument("--output_dir", required=True, help="merged checkpoint directory")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(DTYPES),
        help="dtype of the merged weights (the merge itself is computed in fp32)",
    )
    parser.add_argument(
        "--max_shard_size", default="5GB", help="largest safetensors shard (5GB, 500MB, 2GiB)"
    )
    parser.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="run Python code shipped with the base model (off: transformers' own code)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dtype = parse_dtype(args.dtype)
    max_shard_size = parse_size(args.max_shard_size)
    out_dir = Path(args.output_dir)
    args.model_name_or_path = resolve_model_alias(args.model_name_or_path)
    base = Path(args.model_name_or_path)
    adapter_dir = Path(args.adapter)
    for label, path in (("base model", base), ("adapter", adapter_dir)):
        if path.exists() and _inside(out_dir, path):
            raise InputError(
                f"--output_dir {out_dir} would replace the {label} directory {path}: "
                "choose another output directory"
            )
    # Every check that needs no weights comes first: reading the adapter, fitting it to the
    # architecture on the meta device, and the output path.
    adapter = read_peft_adapter(adapter_dir)
    check_mergeable(adapter, base_skeleton(args.model_name_or_path, args.trust_remote_code))
    check_replaceable(out_dir, "config.json")
    # The merged checkpoint is renamed into place: its parent must be a writable directory.
    check_output_location(out_dir, "--output_dir", inside=False)

    model = load_base(args.model_name_or_path, dtype, trust_remote_code=args.trust_remote_code)
    merge_adapter(model, adapter)
    with atomic_output_dir(out_dir, marker="config.json") as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer = copy_tokenizer_files(base, tmp) if base.is_dir() else []
    ranks = sum(adapter.ranks.values())
    note = f"tokenizer files: {', '.join(tokenizer)}" if tokenizer else "no tokenizer files found"
    print(
        f"wrote the merged checkpoint to {out_dir.resolve()}: {args.model_name_or_path} with "
        f"{adapter_dir} added to its weights ({ranks} ranks in {len(adapter.lora_A)} modules, "
        f"{args.dtype}); {note}; the base model was not changed"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
