"""Score every rank of any PEFT LoRA adapter with AB-LoRA.

    python -m alora_ds.score --model_name_or_path BASE_DIR --adapter ADAPTER_DIR \\
        --data FILE.jsonl --num_examples 32 --output scores.json

The data file holds pre-tokenized rows (`input_ids`, `labels`, -100 = not supervised). The output
is `{"S_M": float, "S_base": float, "modules": {name: {"S_without": [...], "S_only": [...],
"importance": [...]}}}` with the base model's module names and one entry per rank in index order.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from alora_ds.errors import ArgumentParser, InputError, run_cli
from alora_ds.io.examples import load_tokenized_jsonl, make_batches
from alora_ds.io.files import atomic_write_json, check_output_file
from alora_ds.io.models import DTYPES, empty_causal_lm, load_causal_lm, parse_dtype
from alora_ds.io.peft_read import check_adapter_fits, load_peft_adapter, read_peft_adapter
from alora_ds.scoring.direct import ab_lora_scores


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m alora_ds.score",
        description="AB-LoRA importance of every rank of a PEFT LoRA adapter.",
    )
    parser.add_argument("--model_name_or_path", required=True, help="base model directory")
    parser.add_argument("--adapter", required=True, help="PEFT LoRA adapter directory")
    parser.add_argument("--data", required=True, help="pre-tokenized JSON-lines validation file")
    parser.add_argument(
        "--num_examples", type=int, default=32, help="rows of --data to score on (B_val)"
    )
    parser.add_argument("--output", required=True, help="scores JSON file to write")
    parser.add_argument("--batch_size", type=int, default=8, help="rows per forward pass")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Check every input against the architecture (built on the meta device, no weights) before
    # loading a model that may take minutes.
    adapter = read_peft_adapter(args.adapter)
    examples = load_tokenized_jsonl(args.data, args.num_examples)
    if args.batch_size <= 0:
        raise InputError(f"--batch_size must be positive, got {args.batch_size}")
    check_output_file(args.output, "--output")
    skeleton = empty_causal_lm(args.model_name_or_path)
    check_adapter_fits(adapter, skeleton)
    vocab = skeleton.get_input_embeddings().num_embeddings
    for i, example in enumerate(examples):
        if max(example["input_ids"]) >= vocab:
            raise InputError(
                f"{args.data} row {i + 1}: token id {max(example['input_ids'])} is outside the "
                f"model's vocabulary of {vocab}"
            )
    del skeleton

    model = load_causal_lm(args.model_name_or_path, parse_dtype(args.dtype), args.device)
    modules = load_peft_adapter(model, args.adapter)
    batches = make_batches(examples, args.batch_size, device=args.device)

    start = time.perf_counter()
    scores = ab_lora_scores(model, batches)
    elapsed = time.perf_counter() - start
    atomic_write_json(args.output, scores.to_json())
    ranks = sum(m.r for m in modules.values())
    print(
        f"scored {ranks} ranks in {len(modules)} modules on {len(examples)} examples "
        f"in {elapsed:.1f}s; S(M) = {scores.S_M:.6f}; wrote {args.output}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
