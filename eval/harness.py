"""Run lm-evaluation-harness (`lm-eval`, the harness torchtune, axolotl and NeMo use) on a base
model plus one of our adapters, writing the harness's own results JSON.

    python -m eval.harness --model_name_or_path BASE --adapter ADAPTER \\
        --tasks alora_sst2,alora_squad --output_dir OUT [--include_path DIR ...] \\
        [--limit N] [--num_fewshot K] [--batch_size 8] [--dtype float32] [--log_samples]

Data parallel, one GPU per process (the harness shares the requests out over the processes and
gathers them on the first):

    accelerate launch --num_processes N -m eval.harness ...

The model is the harness's own Hugging Face model (`hf`, `peft=ADAPTER`), so the numbers are the
ones `lm_eval --model hf --model_args pretrained=BASE,peft=ADAPTER` gives. OUT receives what
`lm_eval --output_path OUT` writes: `OUT/<model name>/results_<time>.json` (and
`samples_<task>_<time>.jsonl` with --log_samples).

Tasks: the harness's own tasks download their datasets from the Hugging Face hub, which cannot
be reached offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set): asking for one then is a one-line
error. Local tasks over local files ship in eval/harness_tasks/, in our training templates:
`alora_sst2` (multiple choice over the SST-2 samples), `alora_squad` (generation over the SQuAD
samples) and `alora_rotten_tomatoes` (multiple choice over the real Rotten Tomatoes test split
that scripts/fetch_rotten_tomatoes.py writes to data/rotten_tomatoes). `--include_path DIR` adds
your own task YAMLs (the harness's format, e.g. `dataset_path: json` with
`dataset_kwargs.data_files`).

Every input is checked before a weight is loaded (the adapter is read and fitted to the base
architecture on the meta device); bad input stops with one `error: ...` line, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from alora_ds.errors import ArgumentParser, InputError, run_cli
from alora_ds.io.files import check_output_location
from alora_ds.io.models import DTYPES, empty_causal_lm
from alora_ds.io.peft_read import check_adapter_fits, read_peft_adapter
from alora_ds.io.pretrained import resolve_model_alias

LOCAL_TASKS = Path(__file__).resolve().parent / "harness_tasks"
_TRUE = {"1", "ON", "YES", "TRUE"}
# `task: x`, `group: x`, `tag: x`, or one of these keys followed by a list of names.
_DECLARED = re.compile(
    r"^(?:task|group|tag):[ \t]*(?:['\"]?(?P<name>[\w.\-]+)|\n(?P<items>(?:[ \t]*-[ \t]*\S+[ \t]*\n)+))",
    re.MULTILINE,
)


def hub_offline() -> bool:
    """Whether the Hugging Face libraries are told not to reach the hub (their own rule)."""
    return any(
        os.environ.get(name, "").upper() in _TRUE
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def harness_task_names() -> set[str]:
    """The task, group and tag names the harness's own YAMLs declare, read as text (a second or
    two; the harness's full index takes tens of seconds): enough to tell a hub task from a typo
    offline, where neither can run."""
    import lm_eval

    names: set[str] = set()
    for path in (Path(lm_eval.__file__).parent / "tasks").rglob("*.yaml"):
        for match in _DECLARED.finditer(path.read_text(encoding="utf-8", errors="replace")):
            if match["name"]:
                names.add(match["name"])
            else:
                names.update(item.strip(" \t-'\"") for item in match["items"].splitlines())
    return names


def task_manager(names: Sequence[str], include_paths: Sequence[Path]):
    """The harness's TaskManager that knows every task in `names`: the local ones (ours and
    `include_paths`), plus the harness's own when one is asked for and the hub can be reached.
    An unknown name, or a hub task offline, is a one-line InputError."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=[LOCAL_TASKS, *include_paths], include_defaults=False)
    missing = [name for name in names if name not in local.all_tasks]
    if not missing:
        return local
    known_local = ", ".join(local.all_subtasks)
    if hub_offline():
        name = missing[0]
        if name not in harness_task_names():
            raise _unknown_task(name, known_local)
        raise InputError(
            f"--tasks: {name!r} is one of the harness's hub tasks, whose dataset cannot be "
            f"downloaded offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): pass a local task "
            f"({known_local}) or --include_path DIR with task YAMLs over local files"
        )
    full = TaskManager(include_path=[LOCAL_TASKS, *include_paths], include_defaults=True)
    for name in missing:
        if name not in full.all_tasks:
            raise _unknown_task(name, known_local)
    return full


def _unknown_task(name: str, known_local: str) -> InputError:
    return InputError(
        f"--tasks: unknown harness task {name!r}; local tasks: {known_local} "
        "(or --include_path DIR with your task YAMLs)"
    )


def check_local_data(tasks, names: Sequence[str]) -> None:
    """Every data file of our local tasks exists (a relative path is relative to the task's
    YAML, as local_data.load reads it): a missing one, such as the Rotten Tomatoes split before
    it is fetched, is a one-line error naming it and the script that writes it."""
    for name in names:
        entry = tasks.task_index.get(name)
        if entry is None or entry.yaml_path is None or entry.yaml_path.parent != LOCAL_TASKS:
            continue
        config = entry.cfg or {}
        files = (config.get("dataset_kwargs") or {}).get("data_files") or {}
        for path in files.values():
            resolved = (LOCAL_TASKS / path).resolve()
            if not resolved.is_file():
                fetch = (config.get("metadata") or {}).get("fetch_with")
                raise InputError(
                    f"task {name}: data file {resolved} does not exist"
                    + (f"; write it with python {fetch}" if fetch else "")
                )


def check_inputs(args: argparse.Namespace) -> None:
    """Everything that needs no weights: processes, paths, the adapter against the base."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not torch.cuda.is_available():
        raise InputError(
            f"{world_size} processes without GPUs: the harness shares requests out over GPUs "
            "only (each CPU process would run every request); run one process"
        )
    for path in args.include_path:
        if not path.is_dir():
            raise InputError(f"--include_path {path} is not a directory")
    args.model_name_or_path = resolve_model_alias(args.model_name_or_path)
    skeleton = empty_causal_lm(args.model_name_or_path, args.trust_remote_code)
    if args.adapter is not None:
        check_adapter_fits(read_peft_adapter(args.adapter), skeleton)
    check_output_location(args.output_dir, "--output_dir", inside=True)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m eval.harness",
        description="lm-evaluation-harness on a base model plus a PEFT LoRA adapter.",
    )
    parser.add_argument(
        "--model_name_or_path", required=True, help="base model directory (or the alias smollm2)"
    )
    parser.add_argument("--adapter", type=Path, help="PEFT LoRA adapter directory (none: the base)")
    parser.add_argument(
        "--tasks", required=True, help="comma-separated harness task names, e.g. alora_sst2"
    )
    parser.add_argument("--output_dir", type=Path, required=True, help="results folder")
    parser.add_argument(
        "--include_path",
        type=Path,
        action="append",
        default=[],
        help="a directory of task YAMLs (repeatable); eval/harness_tasks is always included",
    )
    parser.add_argument("--limit", type=int, help="at most this many documents per task")
    parser.add_argument("--num_fewshot", type=int, help="few-shot examples (task default: 0)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", help="cpu, cuda, cuda:0 ... (default: cuda if available)")
    parser.add_argument("--log_samples", action="store_true", help="also write every request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="run Python code shipped with the base model (off: transformers' own code)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    if not names:
        raise InputError("--tasks names no task")
    check_inputs(args)
    tasks = task_manager(names, args.include_path)
    check_local_data(tasks, names)

    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.utils import make_table

    model_args = {
        "pretrained": args.model_name_or_path,
        "dtype": args.dtype,
        "trust_remote_code": args.trust_remote_code,
        **({"peft": str(args.adapter)} if args.adapter is not None else {}),
    }
    tracker = EvaluationTracker(output_path=str(args.output_dir))
    results = simple_evaluate(
        model="hf", model_args=model_args, tasks=names, task_manager=tasks,
        num_fewshot=args.num_fewshot, batch_size=args.batch_size, limit=args.limit,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        log_samples=args.log_samples, evaluation_tracker=tracker, random_seed=args.seed,
        numpy_random_seed=args.seed, torch_random_seed=args.seed, fewshot_random_seed=args.seed,
    )  # fmt: skip
    if results is None:  # not the first process: it gathered its share to the first
        return 0
    samples = results.pop("samples", None)
    tracker.save_results_aggregated(results=results, samples=samples)
    for task_name in results["configs"] if samples else ():
        tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    print(make_table(results))
    written = sorted(args.output_dir.glob("*/results_*.json"), key=lambda p: p.stat().st_mtime)
    print(f"wrote {written[-1]}" if written else f"wrote {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
