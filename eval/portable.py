"""Convert a PEFT LoRA adapter into its portable form: every module padded with zero ranks to
the largest rank, one `r` and one `lora_alpha` that give every module its trained scale, no
rank_pattern / alpha_pattern (alora_ds/io/peft_portable.py says why).

    python -m eval.portable --adapter runs/old/adapter --output_dir runs/old/adapter_portable

Training already writes `adapter_portable/` (and `best_adapter_portable/`) beside each adapter;
this converts any adapter we exported before that, or any plain PEFT LoRA adapter. Give the
portable one to llama.cpp (convert_lora_to_gguf.py), Ollama, LM Studio and vLLM. rsLoRA and DoRA
adapters are refused (merge them with `python -m eval.merge`). The output is written in a
temporary directory and renamed into place; bad input stops with one `error: ...` line, exit
status 2, and nothing written.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from alora_ds.errors import ArgumentParser, InputError, run_cli
from alora_ds.io.files import check_output_location, check_replaceable
from alora_ds.io.peft_portable import convert_adapter
from alora_ds.io.peft_read import CONFIG_NAME


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m eval.portable",
        description="Write the portable form of a PEFT LoRA adapter (one rank, one scale, no "
        "patterns) for vLLM, llama.cpp, Ollama and LM Studio.",
    )
    parser.add_argument("--adapter", required=True, help="PEFT LoRA adapter directory")
    parser.add_argument("--output_dir", required=True, help="portable adapter directory")
    return parser


def check_paths(adapter_dir: Path, out_dir: Path) -> None:
    """The adapter is an adapter directory (a run's output directory gets a pointer to its
    adapter), and writing `out_dir` can neither replace it nor fail half-way for a path."""
    if (
        not (adapter_dir / CONFIG_NAME).is_file()
        and (adapter_dir / "adapter" / CONFIG_NAME).is_file()
    ):
        raise InputError(
            f"--adapter {adapter_dir} is a training output directory, not an adapter: pass "
            f"{adapter_dir / 'adapter'} (or best_adapter)"
        )
    source, target = adapter_dir.resolve(), out_dir.resolve()
    if target == source or target in source.parents:
        raise InputError(
            f"--output_dir {out_dir} would replace the adapter directory {adapter_dir}: "
            "choose another output directory"
        )
    check_replaceable(out_dir, CONFIG_NAME)
    check_output_location(out_dir, "--output_dir", inside=False)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    adapter_dir, out_dir = Path(args.adapter), Path(args.output_dir)
    check_paths(adapter_dir, out_dir)
    portable = convert_adapter(adapter_dir, out_dir)
    r, alpha = portable.config["r"], portable.config["lora_alpha"]
    ranks = portable.ranks.values()
    folded = (
        f"; scale ratio folded into lora_B of {len(portable.folded)}" if portable.folded else ""
    )
    print(
        f"wrote {out_dir}: {len(portable.ranks)} modules padded to r={r} (their own ranks "
        f"{min(ranks)}..{max(ranks)}), lora_alpha={alpha:.6g} (scale {alpha / r:.6g}){folded}; "
        f"vLLM needs --max-lora-rank >= {r}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
