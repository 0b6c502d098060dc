"""Real model, real labels: SmolLM2-135M-Instruct fine-tuned on the Rotten Tomatoes sentences.

    .venv/bin/python scripts/fetch_rotten_tomatoes.py          # once: data/rotten_tomatoes/
    .venv/bin/python bench/real.py --size cpu  [--json bench/results/real-cpu.json]
    .venv/bin/python bench/real.py --size full [--json bench/results/real-full.json]   # a GPU

Every method (lora, alora, adalora, sora by default) is trained by the real trainer
(`launch/train.py`, one process, a subprocess per run) with the same rank budget, data, schedule
and seed, on the `--task sst2` splits that scripts/fetch_rotten_tomatoes.py writes. ALoRA runs
with the trainer's default scoring mode (the `scoring` recorded in each row). Each run's
exported adapter is then scored with `eval.score` (accuracy of the generated label) on the
Rotten Tomatoes test split and, as an out-of-domain check, on the tweets, New York Times
editorial and Amazon review sentences rated the same way. Reported per run: those accuracies
(and how many predictions were not a label at all), the trainer's last dev loss and that of
the exported adapter (they differ for the methods that prune to the budget after training),
adapter parameters at start / peak / end and peak memory (the run's summary.json), the
trainer's wall time (start-up included; the loop alone in `train_s`) and the scoring time.

The two sizes (`SIZES`) are the same benchmark with a different budget:

- cpu: fits in about an hour on 2 shared CPU cores. 256 training sentences (the first rows of
  train.jsonl, which the fetch script shuffled), 32 steps of 8, adapters on q_proj and v_proj
  at r_init 2 (120 ranks), two ALoRA rounds of 12, |B_val| 8 from 64 dev sentences; greedy
  decoding on a fixed sample of 200 test sentences and 64 of each other set. SmolLM2 trains at
  about 4 s per step of 8 sentences on one free core, a round of exact AB-LoRA scores costs
  seconds per rank, and beam search with 5 beams costs about 6x greedy here.
- full: the paper's schedule on a GPU. All 8,000 training sentences, 10 epochs at most with
  early stopping, global batch 128, lr 1e-4, r_init 8 on all 7 projections (1,680 ranks), K1 one
  epoch, 8 rounds of 7 every quarter epoch, |B_val| 32 from the 1,000 dev sentences; beam
  search (5 beams) on every test sentence.

A run whose trainer fails is reported and its method skipped (exit status 1). Finished runs are
kept under --work_dir (one directory per seed and method, with the scores in scores.json) and
reused when the benchmark is started again with the same settings.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402

from alora_ds.errors import ArgumentParser, InputError, run_cli  # noqa: E402
from alora_ds.io.examples import make_batches  # noqa: E402
from alora_ds.io.files import atomic_write_json, atomic_write_text  # noqa: E402
from alora_ds.io.pretrained import resolve_model_alias  # noqa: E402
from alora_ds.io.splits import build_split  # noqa: E402
from alora_ds.io.tasks import load_task_rows  # noqa: E402
from alora_ds.scoring.direct import validation_score  # noqa: E402
from bench.planted import TrainerFailed  # noqa: E402
from bench.tables import real_table  # noqa: E402
from eval import score  # noqa: E402

TRAIN_SCRIPT = REPO / "launch" / "train.py"
DATA = REPO / "data" / "rotten_tomatoes"
FETCH = "scripts/fetch_rotten_tomatoes.py"
# The test sets: key -> file written by the fetch script. The first is the in-domain one.
TEST_SETS = {
    "rt": "test.jsonl",
    "tweets": "tweets.jsonl",
    "nyt": "nyt_editorials.jsonl",
    "amazon": "amazon_reviews.jsonl",
}
TINY = "tiny"  # --model_name_or_path tiny: the trainer's embedded random LLaMA (smoke tests)
ALL_MODULES = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass(frozen=True)
class Size:
    """Everything that differs between the CPU and the GPU size of the benchmark."""

    train_rows: int  # the first rows of train.jsonl; 0: all
    dev_rows: int  # the first rows of dev.jsonl; 0: all
    test_rows: int  # a fixed sample of the Rotten Tomatoes test split; 0: all
    ood_rows: int  # a fixed sample of each out-of-domain set; 0: all
    epochs: float  # --num_train_epochs (at most: early stopping on the dev loss)
    steps: int  # --max_steps (overrides epochs when > 0)
    batch: int  # per_device_train_batch_size
    accumulation: int
    learning_rate: float
    target_modules: str
    rank_budget: int
    lora_alpha: float
    initial_epochs: float  # K1
    round_epochs: float  # K2
    initial_steps: int  # K1 in steps (overrides initial_epochs when > 0)
    round_steps: int
    rounds: int  # N_A
    prune_per_round: float  # n_A
    val_examples: int  # |B_val|
    eval_steps: int
    patience: int
    max_seq_length: int
    decoding: str  # eval.score --decoding: greedy or beam (5 beams)
    eval_batch: int


SIZES = {
    "cpu": Size(
        train_rows=256, dev_rows=64, test_rows=200, ood_rows=64, epochs=1, steps=32, batch=8,
        accumulation=1, learning_rate=1e-3, target_modules="q_proj,v_proj", rank_budget=120,
        lora_alpha=4, initial_epochs=0, round_epochs=0, initial_steps=16, round_steps=8,
        rounds=2, prune_per_round=12, val_examples=8, eval_steps=32, patience=10,
        max_seq_length=128, decoding="greedy", eval_batch=16,
    ),
    "full": Size(
        train_rows=0, dev_rows=0, test_rows=0, ood_rows=0, epochs=10, steps=-1, batch=16,
        accumulation=8, learning_rate=1e-4, target_modules=ALL_MODULES, rank_budget=1680,
        lora_alpha=16, initial_epochs=1, round_epochs=0.25, initial_steps=0, round_steps=0,
        rounds=8, prune_per_round=7, val_examples=32, eval_steps=20, patience=10,
        max_seq_length=128, decoding="beam", eval_batch=64,
    ),
}  # fmt: skip


# ---- data -------------------------------------------------------------------------------------


def write_rows(path: Path, rows: Sequence[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def sample(rows: list[dict], count: int) -> list[dict]:
    """`count` rows drawn with a fixed seed, in file order (all of them for 0): the extra sets
    are in their authors' order, so their first rows would not be representative."""
    if count <= 0 or count >= len(rows):
        return rows
    return [rows[i] for i in sorted(random.Random(0).sample(range(len(rows)), count))]


def prepare_data(data_dir: Path, size: Size, work: Path) -> dict[str, Path]:
    """The files every run reads, cut to the size, under work/data."""
    files = {"train": "train.jsonl", "dev": "dev.jsonl", **TEST_SETS}
    missing = [name for name in files.values() if not (data_dir / name).is_file()]
    if missing:
        raise InputError(
            f"--data_dir {data_dir} lacks {', '.join(missing)}: run "
            f"`.venv/bin/python {FETCH} --out {data_dir}` first"
        )
    cut = {"train": size.train_rows, "dev": size.dev_rows, "rt": size.test_rows}
    paths = {}
    for key, name in files.items():
        rows = load_task_rows(data_dir / name)
        count = cut.get(key, size.ood_rows)
        rows = rows[:count] if key in ("train", "dev") and count > 0 else sample(rows, count)
        paths[key] = work / "data" / f"{key}.jsonl"
        write_rows(paths[key], rows)
    return paths


# ---- one run ----------------------------------------------------------------------------------


def train_command(args: argparse.Namespace, method: str, seed: int, paths: dict, out: Path):
    size: Size = args.size_spec
    model = [] if args.model_name_or_path == TINY else ["--model_name_or_path", args.model]
    return [
        sys.executable, str(TRAIN_SCRIPT), "--ds_config", args.ds_config, "--task", "sst2",
        "--train_file", str(paths["train"]), "--validation_file", str(paths["dev"]), *model,
        "--method", method, "--rank_budget", str(size.rank_budget),
        "--target_modules", size.target_modules, "--lora_alpha", f"{size.lora_alpha:g}",
        "--output_dir", str(out), "--overwrite_output_dir", "--seed", str(seed),
        "--max_seq_length", str(size.max_seq_length), "--learning_rate", f"{size.learning_rate:g}",
        "--per_device_train_batch_size", str(size.batch),
        "--gradient_accumulation_steps", str(size.accumulation),
        "--num_train_epochs", f"{size.epochs:g}", "--max_steps", str(size.steps),
        "--initial_epochs", f"{size.initial_epochs:g}", "--round_epochs", f"{size.round_epochs:g}",
        "--initial_steps", str(size.initial_steps), "--round_steps", str(size.round_steps),
        "--num_rounds", str(size.rounds), "--prune_per_round", f"{size.prune_per_round:g}",
        "--val_examples", str(size.val_examples), "--eval_steps", str(size.eval_steps),
        "--patience", str(size.patience), "--logging_steps", "1", "--report_to", "none",
        "--progress_bar", "false", *shlex.split(args.train_args),
    ]  # fmt: skip


def run_trainer(command: list[str], out: Path, threads: int) -> float:
    """Run train.py; its wall time. A failure is a TrainerFailed naming the log."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.setdefault("DS_ACCELERATOR", "cpu")
    env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - start
    log = out.parent / f"{out.name}.log"
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        last = errors or [line for line in result.stderr.splitlines() if line.strip()]
        raise TrainerFailed(f"train.py exit {result.returncode}: {(last or ['?'])[-1]} ({log})")
    return wall


def score_adapter(args: argparse.Namespace, base: str, adapter: Path, paths: dict) -> dict:
    """eval.score on every test set (in this process: the model loads in a second or two, a
    Python start-up would cost more); test set -> its metrics.json."""
    size: Size = args.size_spec
    results = {}
    for key in TEST_SETS:
        out = adapter.parent / "eval" / key
        argv = ["--model_name_or_path", base, "--adapter", str(adapter), "--task", "sst2",
                "--data", str(paths[key]), "--output_dir", str(out), "--decoding", size.decoding,
                "--batch_size", str(size.eval_batch), "--max_seq_length",
                str(size.max_seq_length)]  # fmt: skip
        if score.main(argv) != 0:
            raise TrainerFailed(f"eval.score failed on {paths[key]}")
        results[key] = json.loads((out / score.METRICS_NAME).read_text())
    return results


def exported_dev_loss(args: argparse.Namespace, base: str, adapter: Path, dev: Path) -> float:
    """The dev loss of the exported adapter, merged into the base as eval.score merges it.

    The trainer's own dev loss is that of the adapters it trains; SoRA and AdaLoRA export
    fewer ranks than they train with (their final prune to the budget), so only this one
    compares the methods' adapters."""
    tokenizer = score.load_tokenizer(base)
    model = score.load_eval_model(
        base, score.check_adapter_for_base(base, str(adapter)), torch.float32, torch.device("cpu")
    )
    examples, _ = build_split(
        "sst2", str(dev), "validation", tokenizer, args.size_spec.max_seq_length
    )
    batches = make_batches(examples, args.size_spec.eval_batch, tokenizer.pad_token_id)
    return -validation_score(model, batches)


def run_method(args: argparse.Namespace, method: str, seed: int, paths: dict) -> dict:
    """One (method, seed): train, score, and the row; reused from scores.json when the same
    settings already produced it."""
    out = args.work / f"seed{seed}" / method
    cache = out.parent / f"{method}.scores.json"
    settings = {"size": asdict(args.size_spec), "model": args.model, "train_args": args.train_args}
    base = str(out / "base_model") if args.model_name_or_path == TINY else args.model
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached["settings"] == settings:
            return cached["row"]
    wall = run_trainer(train_command(args, method, seed, paths, out), out, args.threads)
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    start = time.perf_counter()
    scores = score_adapter(args, base, out / "adapter", paths)
    row = {
        "method": method,
        "seed": seed,
        "scoring": config["scoring"] if method == "alora" else None,
        "accuracy": {key: round(s["accuracy"], 2) for key, s in scores.items()},
        "unparseable": {key: s["unparseable"] for key, s in scores.items()},
        "dev_loss": round([m["dev_loss"] for m in metrics if "dev_loss" in m][-1], 5),
        "exported_dev_loss": round(exported_dev_loss(args, base, out / "adapter", paths["dev"]), 5),
        "adapter_params_start": summary["adapter_params_start"],
        "adapter_params_peak": summary["adapter_params_peak"],
        "adapter_params_end": summary["adapter_params_end"],
        "peak_mem_mb": round(max(summary["peak_memory_bytes"]) / 1e6, 1),
        "wall_s": round(wall, 1),
        "train_s": round(summary["wall_time_s"], 1),
        "eval_s": round(time.perf_counter() - start, 1),
    }
    atomic_write_json(cache, {"settings": settings, "row": row})
    return row


# ---- command line -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="bench/real.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size", choices=sorted(SIZES), default="cpu", help="the budget (see above)")
    p.add_argument("--methods", default="lora,alora,adalora,sora", help="comma-separated")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (adapter init, data order)")
    p.add_argument("--model_name_or_path", default="smollm2", help="base model (tiny: smoke)")
    p.add_argument("--data_dir", default=str(DATA), help=f"what {FETCH} wrote")
    p.add_argument("--work_dir", help="runs go here (default runs/real/SIZE)")
    p.add_argument("--json", help="write the settings and one row per run")
    p.add_argument("--ds_config", default="zero2.json", help="one process: ZeRO-2")
    p.add_argument("--threads", type=int, default=1, help="torch threads (trainer and scoring)")
    p.add_argument("--train_args", default="", help="more train.py options for every run")
    smaller = p.add_argument_group("overrides of the size (a smaller smoke run)")
    for name in ("train_rows", "dev_rows", "test_rows", "ood_rows", "steps", "batch"):
        smaller.add_argument(f"--{name}", type=int)
    smaller.add_argument("--initial_steps", type=int, help="K1 in steps")
    smaller.add_argument("--round_steps", type=int, help="K2 in steps")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.methods:
        raise InputError("--methods is empty: name at least one (e.g. lora,alora)")
    if args.seeds <= 0 or args.threads <= 0:
        raise InputError(
            f"--seeds and --threads must be positive, got {args.seeds}, {args.threads}"
        )
    overrides = {
        name: getattr(args, name)
        for name in ("train_rows", "dev_rows", "test_rows", "ood_rows", "steps", "batch",
                     "initial_steps", "round_steps")
        if getattr(args, name) is not None
    }  # fmt: skip
    args.size_spec = replace(SIZES[args.size], **overrides)
    args.work = Path(args.work_dir or REPO / "runs" / "real" / args.size)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.model = (
        TINY if args.model_name_or_path == TINY else resolve_model_alias(args.model_name_or_path)
    )
    paths = prepare_data(Path(args.data_dir), args.size_spec, args.work)
    counts = {key: len(load_task_rows(path)) for key, path in paths.items()}
    size = args.size_spec
    print(
        f"real-data benchmark ({args.size}): {args.model_name_or_path} on {counts['train']} "
        f"training / {counts['dev']} dev sentences, {', '.join(args.methods)} x {args.seeds} "
        f"seed(s), rank budget {size.rank_budget} on {size.target_modules}; test sentences "
        f"{', '.join(f'{k} {counts[k]}' for k in TEST_SETS)}; {size.decoding} decoding",
        flush=True,
    )
    rows: list[dict] = []
    failed: dict[str, str] = {}
    for seed in range(args.seeds):
        for method in args.methods:
            if method in failed:
                continue
            try:
                row = run_method(args, method, seed, paths)
            except TrainerFailed as exc:
                failed[method] = str(exc)
                print(f"  {method} seed {seed}: {exc}", flush=True)
                continue
            rows.append(row)
            accuracy = ", ".join(f"{k} {v:.1f}" for k, v in row["accuracy"].items())
            print(
                f"  {method:8s} seed {seed}: accuracy {accuracy}; dev loss {row['dev_loss']:.4f} "
                f"(exported {row['exported_dev_loss']:.4f}); "
                f"params {row['adapter_params_end']:,}; peak {row['peak_mem_mb']:.0f} MB; "
                f"wall {row['wall_s']:.0f}s (train {row['train_s']:.0f}s), scoring "
                f"{row['eval_s']:.0f}s",
                flush=True,
            )
            if args.json:  # written after every run, so a long benchmark keeps what it has
                atomic_write_json(args.json, report(args, counts, rows))
    print()
    print(real_table(report(args, counts, rows)))
    for method, message in failed.items():
        print(f"not run: {method}: {message}")
    if args.json:
        print(f"rows written to {args.json}")
    return 1 if failed else 0


def report(args: argparse.Namespace, counts: dict[str, int], rows: list[dict]) -> dict:
    return {
        "size": args.size,
        "model": args.model_name_or_path,
        "settings": asdict(args.size_spec),
        "sentences": counts,
        "threads": args.threads,
        "rows": rows,
    }


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
