"""Score a model (a base plus an optional PEFT LoRA adapter) on a task's test file.

    python -m eval.score --model_name_or_path BASE_DIR --adapter ADAPTER_DIR --task sst2 \\
        --data test.jsonl --output_dir OUT [--decoding beam --num_beams 5] [--batch_size 8]

Prompts are built as in training (alora_ds.io.tasks: format_example + tokenize_prompt, BOS and
left truncation included); responses are generated in batches with left padding and stop at EOS
or after the task's max_new_tokens. Beam search with 5 beams is the default, as in the paper;
`--decoding greedy` and `--decoding sample` are the alternatives. OUT receives, atomically:

- predictions.jsonl: one row per data row, in file order: id, prompt, prediction, references,
  finish ("eos" or "length"); E2E rows also carry `mr`, which eval.metrics groups them by.
- metrics.json: eval.metrics.compute_metrics of those rows, plus `counts`, `decoding` and
  `run` (paths, processes, timing). `python -m eval.metrics --task T --predictions
  OUT/predictions.jsonl` recomputes the same numbers.

Data parallel over N processes, on CPU (gloo) as on GPUs:

    torchrun --nproc_per_node 2 -m eval.score ...
    deepspeed --num_gpus 2 --module eval.score ...

Each process loads its own copy of the model and generates a share of the batches; rank 0
gathers the predictions and writes the same files a single process writes. Batches are formed
the same way whatever the number of processes (prompts sorted by length, then cut into batches;
batch k goes to process k mod N, and sampling is seeded per batch), so the predictions do not
depend on N.

The adapter is merged into the base weights (eval.merge.merge_adapter: W + s B A in fp32, rounded
once) rather than run through PeftModel: beam search runs the model once per beam and token, and
merged weights cost nothing extra there; and scoring BASE + ADAPTER then gives exactly the
predictions of scoring the checkpoint `python -m eval.merge` writes.

Every input is checked before a weight is loaded; bad input stops with one `error: ...` line,
exit status 2, and nothing written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm
from transformers import AutoTokenizer, GenerationConfig

from alora_ds.errors import EXIT_INPUT_ERROR, ArgumentParser, InputError, run_cli
from alora_ds.io.files import atomic_write_json, atomic_write_text, check_output_location
from alora_ds.io.models import DTYPES, parse_dtype, resolve_attn_implementation
from alora_ds.io.peft_read import PeftLoraAdapter, read_peft_adapter
from alora_ds.io.pretrained import resolve_model_alias
from alora_ds.io.tasks import format_example, get_task, load_task_rows, references, tokenize_prompt
from alora_ds.runtime.eval_group import (
    Processes,
    gather_on_main,
    join_process_group,
    launched_processes,
    leave_process_group,
)
from eval.merge import base_skeleton, check_mergeable, first_line, load_base, merge_adapter
from eval.metrics import INSTRUCTION_TASKS, LABELS, compute_metrics
from eval.metrics import TASKS as SCORED_TASKS

DECODINGS: tuple[str, ...] = ("beam", "greedy", "sample")
DEFAULT_NUM_BEAMS = 5
PREDICTIONS_NAME = "predictions.jsonl"
METRICS_NAME = "metrics.json"


# ----------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class Decoding:
    """How responses are generated; recorded in metrics.json as given here."""

    mode: str
    """beam, greedy or sample."""
    num_beams: int
    """Beams for beam search; 1 for greedy and sampling."""
    max_new_tokens: int
    """Generation stops after this many new tokens unless EOS comes first."""
    temperature: float | None = None
    """Sampling only: softmax temperature."""
    top_p: float | None = None
    """Sampling only: nucleus mass (1.0 keeps the whole distribution)."""
    seed: int = 42
    """Batch k is generated right after torch.manual_seed(seed + k)."""

    def generation_config(self, eos_ids: Sequence[int], pad_id: int) -> GenerationConfig:
        """A complete GenerationConfig. Every field that changes the search is set here, since
        generate() fills the fields left unset from the checkpoint's generation_config.json
        (a chat model's may bring temperature 0.6 or a repetition penalty)."""
        fields: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "eos_token_id": list(eos_ids),
            "pad_token_id": pad_id,
            "num_beams": self.num_beams,
            "do_sample": self.mode == "sample",
            "repetition_penalty": 1.0,
            "no_repeat_ngram_size": 0,
        }
        if self.mode == "beam":
            fields["length_penalty"] = 1.0
        if self.mode == "sample":
            # top_k 0 turns off the default top-k of 50: only temperature and top_p apply.
            fields.update(temperature=self.temperature, top_p=self.top_p, top_k=0)
        return GenerationConfig(**fields)


def make_decoding(
    mode: str,
    num_beams: int | None,
    temperature: float | None,
    top_p: float | None,
    max_new_tokens: int,
    seed: int,
) -> Decoding:
    """Check the decoding flags against each other; the error names the flag that does not fit."""
    if mode not in DECODINGS:
        raise InputError(f"unknown --decoding {mode!r}; choose from {', '.join(DECODINGS)}")
    if max_new_tokens < 1:
        raise InputError(f"--max_new_tokens must be positive, got {max_new_tokens}")
    if mode == "beam":
        beams = DEFAULT_NUM_BEAMS if num_beams is None else num_beams
        if beams < 1:
            raise InputError(f"--num_beams must be at least 1, got {beams}")
    elif num_beams not in (None, 1):
        raise InputError(f"--num_beams {num_beams} needs --decoding beam (got {mode})")
    else:
        beams = 1
    if mode != "sample":
        for flag, value in (("--temperature", temperature), ("--top_p", top_p)):
            if value is not None:
                raise InputError(f"{flag} applies to --decoding sample only (got {mode})")
        return Decoding(mode, beams, max_new_tokens, seed=seed)
    temperature = 1.0 if temperature is None else temperature
    top_p = 1.0 if top_p is None else top_p
    if temperature <= 0:
        raise InputError(f"--temperature must be positive, got {temperature}")
    if not 0 < top_p <= 1:
        raise InputError(f"--top_p must be in (0, 1], got {top_p}")
    return Decoding(mode, 1, max_new_tokens, temperature, top_p, seed)


# ----------------------------------------------------------------------------- model


def check_adapter_for_base(
    model_name_or_path: str, adapter: str | None, trust_remote_code: bool = False
) -> PeftLoraAdapter | None:
    """Read the adapter and check it against the base architecture built on the meta device
    (no weights loaded): a module missing from the base or of another shape is an InputError
    naming it. Returns the adapter (None without one)."""
    skeleton = base_skeleton(model_name_or_path, trust_remote_code)
    if adapter is None:
        return None
    peft_adapter = read_peft_adapter(adapter)
    check_mergeable(peft_adapter, skeleton)
    return peft_adapter


def load_tokenizer(model_name_or_path: str, trust_remote_code: bool = False) -> Any:
    """The base model's tokenizer; it must define EOS, since generation stops at it. Code
    shipped with the tokenizer runs only with `trust_remote_code`."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_name_or_path, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise InputError(
            f"cannot load a tokenizer from {model_name_or_path}: {first_line(exc)}"
        ) from exc
    if tokenizer.eos_token_id is None:
        raise InputError(f"the tokenizer of {model_name_or_path} has no eos_token")
    return tokenizer


def default_device(local_rank: int = 0) -> torch.device:
    """cuda:<local rank> when a GPU is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def load_eval_model(
    model_name_or_path: str,
    adapter: PeftLoraAdapter | None,
    dtype: torch.dtype,
    device: torch.device,
    device_map: str | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """The base in eval mode with the adapter merged in.

    With `device_map` (e.g. "auto") transformers places the layers over the visible devices
    (and the CPU) and `device` is unused. Code shipped with the model runs only with
    `trust_remote_code`; the weights are read as safetensors or weights-only checkpoints.
    """
    model = load_base(
        model_name_or_path,
        dtype,
        attn_implementation=resolve_attn_implementation("auto"),
        device_map=device_map,
        trust_remote_code=trust_remote_code,
    )
    if not device_map:
        model.to(device)
    if adapter is not None:
        for name in adapter.lora_A:
            # accelerate leaves weights it offloads to disk on the meta device; adding B A to
            # one would silently do nothing.
            if model.get_submodule(name).weight.device.type == "meta":
                raise InputError(
                    f"module {name} was offloaded to disk by --device_map {device_map}; "
                    "the adapter cannot be merged into it (use more devices or a smaller dtype)"
                )
        merge_adapter(model, adapter)
    return model.eval()


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the embedding's device (the first device under a device_map)."""
    return model.get_input_embeddings().weight.device


def eos_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Every id generation stops at: the tokenizer's EOS and the model's (LLaMA-3 has several)."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(model.generation_config, "eos_token_id", None)
    if configured is not None:
        ids += configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(ids))


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (B, T): pads on the left, so every prompt ends at the
    last position and the generated tokens of all rows start at the same column."""
    width = max(len(s) for s in sequences)
    ids = [[pad_id] * (width - len(s)) + list(s) for s in sequences]
    mask = [[0] * (width - len(s)) + [1] * len(s) for s in sequences]
    return torch.tensor(ids), torch.tensor(mask)  # (B, T), (B, T)


@torch.no_grad()
def generate_batch(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    eos_ids: Sequence[int],
) -> list[tuple[str, str]]:
    """(response text, finish) for each prompt's ids; finish is "eos" or "length".

    The response is the text of the new tokens up to (not including) the first EOS, with
    special tokens dropped and surrounding whitespace stripped.
    """
    input_ids, attention_mask = left_pad(prompts, config.pad_token_id)
    device = input_device(model)
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        generation_config=config,
    )  # (B, T + new); rows that stopped early are padded after their EOS
    results = []
    for row in output[:, input_ids.shape[1] :].tolist():
        stop = next((i for i, token in enumerate(row) if token in eos_ids), None)
        tokens = row if stop is None else row[:stop]
        text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        results.append((text, "length" if stop is None else "eos"))
    return results


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Example:
    """One data row, ready to generate for."""

    id: Any
    """The row's own `id` field when it has one, else its 1-based row number."""
    prompt: str
    references: list[str]
    mr: str | None
    """E2E only: the meaning representation, which eval.metrics groups references by."""


def read_examples(task: str, path: str | Path, max_examples: int | None) -> list[Example]:
    """The first `max_examples` rows (all without it) of a data file, formatted as in training.

    A row missing a field of the prompt or the reference field is an InputError naming the
    file, the row and the field.
    """
    rows = load_task_rows(path)
    if max_examples is not None:
        rows = rows[:max_examples]
    examples = []
    for number, row in enumerate(rows, start=1):
        prompt, _ = format_example(task, row, row_id=number, source=path)
        refs = references(task, row, row_id=number, source=path)
        mr = row["meaning_representation"].strip() if task == "e2e" else None
        examples.append(Example(row.get("id", number), prompt, refs, mr))
    return examples


def plan_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices into `lengths`, longest first, cut into batches of `batch_size`.

    Sorting keeps padding small; longest first makes an out-of-memory batch show up at once.
    Ties keep the input order, so the plan is the same on every process.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def generate_share(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    batches: Sequence[Sequence[int]],
    procs: Processes,
    decoding: Decoding,
    label: str,
) -> dict[int, tuple[str, str]]:
    """This process's share: batch k of `batches` (indices into `prompts`) when k mod world
    size is its rank. Returns prompt index -> (response, finish), with a progress bar on rank 0.
    """
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    config = decoding.generation_config(eos_ids, pad_id)
    mine = range(procs.rank, len(batches), procs.world_size)
    results: dict[int, tuple[str, str]] = {}
    with tqdm(
        total=sum(len(batches[k]) for k in mine),
        unit="ex",
        desc=label if procs.world_size == 1 else f"{label} (rank 0 of {procs.world_size})",
        disable=not procs.is_main,
    ) as progress:
        for k in mine:
            # Seeded per batch, so a batch samples alike whichever process generates it.
            torch.manual_seed(decoding.seed + k)
            batch = [prompts[i] for i in batches[k]]
            results.update(
                zip(
                    batches[k],
                    generate_batch(model, tokenizer, batch, config, eos_ids),
                    strict=True,
                )
            )
            progress.update(len(batch))
    return results


def prediction_rows(
    examples: Sequence[Example], generated: Sequence[tuple[str, str]]
) -> list[dict[str, Any]]:
    """predictions.jsonl rows: each example with its (response, finish)."""
    rows = []
    for example, (prediction, finish) in zip(examples, generated, strict=True):
        row: dict[str, Any] = {
            "id": example.id,
            "prompt": example.prompt,
            "prediction": prediction,
            "references": example.references,
            "finish": finish,
        }
        if example.mr is not None:
            row["mr"] = example.mr
        rows.append(row)
    return rows


# Plain data parallelism (alora_ds.runtime.eval_group): the only collective is one all_gather of
# the predictions at the end, over gloo on every machine, GPUs included: it carries Python
# objects (a few KB of text) and keeps CUDA out of the communication.


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m eval.score",
        description="Generate a task's responses and score them with the paper's metrics.",
    )
    parser.add_argument(
        "--model_name_or_path", required=True, help="base model directory (or the alias smollm2)"
    )
    parser.add_argument("--adapter", help="PEFT LoRA adapter directory (default: the base alone)")
    parser.add_argument("--task", required=True, help=f"one of: {', '.join(SCORED_TASKS)}")
    parser.add_argument("--data", required=True, help="test file: .jsonl / .json / .csv / .parquet")
    parser.add_argument("--output_dir", required=True, help="predictions.jsonl, metrics.json")
    parser.add_argument(
        "--decoding", default="beam", choices=DECODINGS, help="search (default: beam)"
    )
    parser.add_argument(
        "--num_beams", type=int, help=f"beams for --decoding beam (default {DEFAULT_NUM_BEAMS})"
    )
    parser.add_argument("--temperature", type=float, help="--decoding sample only (default 1.0)")
    parser.add_argument("--top_p", type=float, help="--decoding sample only (default 1.0)")
    parser.add_argument(
        "--max_new_tokens", type=int, help="generation budget (default: the task's own)"
    )
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per generate call")
    parser.add_argument("--max_examples", type=int, help="score only the first N rows")
    parser.add_argument(
        "--max_seq_length",
        type=int,
        default=512,
        help="as in training: prompt + response tokens; longer prompts lose their start",
    )
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype")
    parser.add_argument(
        "--device_map", help="passed to from_pretrained, e.g. auto (one process only)"
    )
    parser.add_argument("--seed", type=int, default=42, help="seeds sampling, batch by batch")
    parser.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="run Python code shipped with the model or tokenizer (off: transformers' own code)",
    )
    parser.add_argument(
        "--dist_timeout", type=int, default=7200, help="seconds a process waits for the others"
    )
    # deepspeed's launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    return parser


def _check_positive(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise InputError(f"{flag} must be positive, got {value}")


def main(argv: Sequence[str] | None = None) -> int:
    """Score one model on one task's data; see the module docstring."""
    args = build_parser().parse_args(argv)
    procs = launched_processes()
    # Every check below is deterministic, so all processes fail alike before any collective.
    spec = get_task(args.task)
    if spec.name not in SCORED_TASKS:
        raise InputError(
            f"task {spec.name} has no automatic metric here (scored tasks: "
            f"{', '.join(SCORED_TASKS)}); evaluate instruction tuning with eval.mt_bench"
        )
    for flag, value in (
        ("--batch_size", args.batch_size),
        ("--max_examples", args.max_examples),
        ("--max_seq_length", args.max_seq_length),
        ("--dist_timeout", args.dist_timeout),
    ):
        _check_positive(flag, value)
    max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else spec.max_new_tokens
    decoding = make_decoding(
        args.decoding, args.num_beams, args.temperature, args.top_p, max_new_tokens, args.seed
    )
    # The whole sequence stays within what training saw: the prompt gets what the response
    # budget leaves (training gave it what the actual response left).
    prompt_budget = args.max_seq_length - max_new_tokens
    if prompt_budget < 1:
        raise InputError(
            f"--max_new_tokens {max_new_tokens} leaves no room for a prompt in "
            f"--max_seq_length {args.max_seq_length}"
        )
    if args.device_map and procs.world_size > 1:
        raise InputError(
            f"--device_map {args.device_map} spreads one model over the devices; run it as one "
            f"process (got {procs.world_size})"
        )
    dtype = parse_dtype(args.dtype)
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"--output_dir {output_dir} is a file")
    check_output_location(output_dir, "--output_dir", inside=True)
    examples = read_examples(spec.name, args.data, args.max_examples)
    args.model_name_or_path = resolve_model_alias(args.model_name_or_path)
    adapter = check_adapter_for_base(args.model_name_or_path, args.adapter, args.trust_remote_code)
    tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code)

    # Identical prompts (E2E: one per reference of a meaning representation) are generated once.
    prompt_index: dict[str, int] = {}
    for example in examples:
        prompt_index.setdefault(example.prompt, len(prompt_index))
    encoded = [tokenize_prompt(tokenizer, p, prompt_budget) for p in prompt_index]
    batches = plan_batches([len(ids) for ids, _ in encoded], args.batch_size)

    join_process_group(procs, args.dist_timeout)
    try:
        device = default_device(procs.local_rank)
        model = load_eval_model(
            args.model_name_or_path,
            adapter,
            dtype,
            device,
            args.device_map,
            trust_remote_code=args.trust_remote_code,
        )
        start = time.perf_counter()
        share = generate_share(
            model, tokenizer, [ids for ids, _ in encoded], batches, procs, decoding, spec.name
        )
        shares = gather_on_main(share, procs)
        seconds = time.perf_counter() - start
    finally:
        leave_process_group()
    if shares is None:  # not rank 0: its predictions are in rank 0's hands
        return 0

    generated = {i: result for share in shares for i, result in share.items()}
    rows = prediction_rows(examples, [generated[prompt_index[e.prompt]] for e in examples])
    metrics = compute_metrics(spec.name, rows)
    metrics["counts"] = {
        "examples": len(rows),
        "distinct_prompts": len(encoded),
        "truncated_prompts": sum(encoded[prompt_index[e.prompt]][1] for e in examples),
        "stopped_at_eos": sum(r["finish"] == "eos" for r in rows),
        "hit_max_new_tokens": sum(r["finish"] == "length" for r in rows),
    }
    metrics["decoding"] = asdict(decoding) | {
        "batch_size": args.batch_size,
        "max_seq_length": args.max_seq_length,
        "dtype": args.dtype,
    }
    metrics["run"] = {
        "model_name_or_path": args.model_name_or_path,
        "adapter": args.adapter,
        "data": str(args.data),
        "processes": procs.world_size,
        "device_map": args.device_map,
        "generation_seconds": round(seconds, 3),
        "prompts_per_second": round(len(encoded) / seconds, 3) if seconds > 0 else None,
    }
    atomic_write_text(
        output_dir / PREDICTIONS_NAME,
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
    )
    atomic_write_json(output_dir / METRICS_NAME, metrics)
    headline = {k: v for k, v in metrics.items() if isinstance(v, float)}
    print(
        f"{spec.name}: {len(rows)} examples ({len(encoded)} distinct prompts) on "
        f"{procs.world_size} process(es) in {seconds:.1f}s; "
        f"{', '.join(f'{k} {v:.2f}' for k, v in headline.items())}; wrote "
        f"{output_dir / PREDICTIONS_NAME} and {METRICS_NAME}"
    )
    for line in result_notes(spec.name, metrics):
        print(line)
    return 0


def result_notes(task: str, metrics: dict[str, Any]) -> list[str]:
    """What the numbers alone do not say: predictions that named no label (counted wrong, so an
    accuracy of 0 may be a decoding problem, not a model that is always wrong), and how to judge
    instruction following."""
    notes = []
    unparseable = metrics.get("unparseable", 0)
    if task in LABELS and unparseable:
        share = "all" if unparseable == metrics["n"] else f"{unparseable} of"
        notes.append(
            f"note: {share} {metrics['n']} predictions were none of the labels "
            f"({', '.join(LABELS[task])}) and count as wrong; read them in {PREDICTIONS_NAME} "
            "(a model that was not trained on the task, or --max_new_tokens too small)"
        )
    if task in INSTRUCTION_TASKS:
        notes.append(
            "note: rouge_l is each response's overlap with its row's output, a rough check only; "
            "judge instruction following on MT-Bench as the paper does: python -m eval.mt_bench "
            "generate (the same --model_name_or_path and --adapter), then python -m eval.judge "
            "pairwise or single (a GPT-4-class judge), or python -m eval.judge rouge (ROUGE-L "
            "against the GPT-4 reference answers, no API)"
        )
    return notes


def cli(argv: Sequence[str] | None = None) -> int:
    """run_cli on rank 0. The other processes exit with the same status on bad input but print
    nothing: rank 0's one line says why."""
    if launched_processes().is_main:
        return run_cli(main, argv)
    try:
        return main(argv)
    except InputError:
        return EXIT_INPUT_ERROR


if __name__ == "__main__":
    sys.exit(cli())
