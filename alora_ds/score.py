"""Score every rank of any PEFT LoRA adapter with AB-LoRA.

    python -m alora_ds.score --model_name_or_path BASE_DIR --adapter ADAPTER_DIR \\
        (--data ROWS.jsonl | --task sst2 --data TASK_FILE) --num_examples 32 \\
        [--scoring fast|naive|screened] --output scores.json

`--data` alone holds pre-tokenized rows (`input_ids`, `labels`, -100 = not supervised); with
`--task` it is a task file in the training format (json, jsonl, csv or parquet), tokenized with
the model's tokenizer (or `--tokenizer`) as training does. The output is `{"S_M": float,
"S_base": float, "modules": {name: {"S_without": [...], "S_only": [...], "importance":
[...]}}}` with the base model's module names and one entry per rank in index order. With
`--scoring screened` only the ranks that decide a round pruning `--prune_per_round` ranks are
scored exactly: each module then gives its `importance` list, which of them are `exact`, and
every rank's `estimate`, and a `screening` entry says how many were scored exactly.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from alora_ds.core.allocation import resolve_prune_count
from alora_ds.errors import ArgumentParser, InputError, run_cli
from alora_ds.io.examples import Example, load_tokenized_jsonl, make_batches
from alora_ds.io.files import atomic_write_json, check_output_file
from alora_ds.io.models import DTYPES, empty_causal_lm, load_causal_lm, load_tokenizer, parse_dtype
from alora_ds.io.peft_read import check_adapter_fits, load_peft_adapter, read_peft_adapter
from alora_ds.io.pretrained import resolve_model_alias
from alora_ds.io.splits import PRETOKENIZED, build_split, check_task
from alora_ds.scoring import SCORING_MODES
from alora_ds.scoring.direct import ab_lora_scores
from alora_ds.scoring.fast import LlamaStack, fast_ablation_scores
from alora_ds.scoring.screened import screened_scores


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m alora_ds.score",
        description="AB-LoRA importance of every rank of a PEFT LoRA adapter.",
    )
    parser.add_argument(
        "--model_name_or_path", required=True, help="base model directory (or the alias smollm2)"
    )
    parser.add_argument("--adapter", required=True, help="PEFT LoRA adapter directory")
    parser.add_argument(
        "--data", required=True, help="validation file: pre-tokenized rows, or a --task file"
    )
    parser.add_argument(
        "--task", default=PRETOKENIZED,
        help="the task the --data file holds (sst2, rte, ...; as in training); default "
        "pretokenized rows",
    )  # fmt: skip
    parser.add_argument("--tokenizer", help="tokenizer for --task files (default: the model's)")
    parser.add_argument("--max_seq_length", type=int, default=512, help="as in training")
    parser.add_argument(
        "--num_examples", type=int, default=32, help="rows of --data to score on (B_val)"
    )
    parser.add_argument("--output", required=True, help="scores JSON file to write")
    parser.add_argument("--batch_size", type=int, default=8, help="rows per forward pass")
    parser.add_argument(
        "--scoring", default="fast", choices=SCORING_MODES,
        help="fast (exact, prefix caching; default), naive (two full forwards per rank: the "
        "reference) or screened (estimates, exact only where a round's cut is decided)",
    )  # fmt: skip
    parser.add_argument(
        "--prune_per_round", type=float, default=7,
        help="screened: the round's n_A (a count, or a fraction of the live ranks)",
    )  # fmt: skip
    parser.add_argument(
        "--screen_candidates", type=int, default=0,
        help="screened: ranks scored exactly first (0: n_A)",
    )  # fmt: skip
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device"
    )
    return parser


def read_examples(args: argparse.Namespace, vocab: int) -> list[Example]:
    """The first --num_examples rows of --data as tokenized examples, checked."""
    if args.num_examples <= 0:
        raise InputError(f"--num_examples must be positive, got {args.num_examples}")
    if args.task == PRETOKENIZED:
        examples = load_tokenized_jsonl(args.data, args.num_examples)
    else:
        check_task(args.task)
        tokenizer = load_tokenizer(resolve_model_alias(args.tokenizer or args.model_name_or_path))
        examples, _ = build_split(
            args.task, args.data, "validation", tokenizer, args.max_seq_length
        )
        if args.num_examples > len(examples):
            raise InputError(
                f"--num_examples {args.num_examples} is larger than the {len(examples)} "
                f"examples of {args.data}"
            )
        examples = examples[: args.num_examples]
    for i, example in enumerate(examples):
        if max(example["input_ids"]) >= vocab:
            raise InputError(
                f"{args.data} row {i + 1}: token id {max(example['input_ids'])} is outside the "
                f"model's vocabulary of {vocab}"
            )
    return examples


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.model_name_or_path = resolve_model_alias(args.model_name_or_path)
    # Check every input against the architecture (built on the meta device, no weights) before
    # loading a model that may take minutes.
    adapter = read_peft_adapter(args.adapter)
    if args.batch_size <= 0:
        raise InputError(f"--batch_size must be positive, got {args.batch_size}")
    check_output_file(args.output, "--output")
    skeleton = empty_causal_lm(args.model_name_or_path)
    check_adapter_fits(adapter, skeleton)
    examples = read_examples(args, skeleton.get_input_embeddings().num_embeddings)
    if args.scoring != "naive" and not LlamaStack.supports(skeleton):
        raise InputError(
            f"--scoring {args.scoring} needs a LLaMA-style model ({type(skeleton).__name__} is "
            "not): use --scoring naive"
        )
    del skeleton

    model = load_causal_lm(args.model_name_or_path, parse_dtype(args.dtype), args.device)
    modules = load_peft_adapter(model, args.adapter)
    batches = make_batches(examples, args.batch_size, device=args.device)
    ranks = sum(m.r for m in modules.values())
    start = time.perf_counter()
    if args.scoring == "screened":
        n_prune = resolve_prune_count(args.prune_per_round, ranks)
        screened = screened_scores(model, batches, n_prune, candidates=args.screen_candidates)
        output, s_m = screened.to_json(), screened.S_M
        how = f"{screened.record['exact_ranks']} of them exactly"
    else:
        score = fast_ablation_scores if args.scoring == "fast" else ab_lora_scores
        scores = score(model, batches)
        output, s_m, how = scores.to_json(), scores.S_M, args.scoring
    elapsed = time.perf_counter() - start
    atomic_write_json(args.output, output)
    print(
        f"scored {ranks} ranks in {len(modules)} modules on {len(examples)} examples "
        f"({how}) in {elapsed:.1f}s; S(M) = {s_m:.6f}; wrote {args.output}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
