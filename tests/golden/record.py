"""Record (or check) the golden outputs of fixed-seed training runs, one per method and process
count, so that a change meant to keep behaviour can prove it did.

    .venv/bin/python tests/golden/record.py [--repo DIR] [--only NAME ...]

writes tests/golden/<method>-<procs>p.json from runs of DIR/launch/train.py (default: this
checkout). Each file holds what a run must reproduce: every round file (scores included), the
final prune, the logged losses and dev losses, the summary's rank and parameter counts, the
adapter's config and metadata, and the sha256 of every adapter's tensor file together with
per-tensor sums (for comparing on a machine whose floating point differs). The runs and the
comparison are those of tests/test_golden.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent
REPO = GOLDEN.parents[1]

# The small run of the launch tests: 14 modules x r_init 2, two rounds of 7 after K1.
SMALL_RUN = [
    "--rank_budget", "28", "--lora_alpha", "4", "--learning_rate", "3e-3",
    "--per_device_train_batch_size", "4", "--num_train_epochs", "3", "--initial_epochs", "1",
    "--round_epochs", "0.5", "--num_rounds", "2", "--val_examples", "8",
    "--scoring_batch_size", "8", "--eval_steps", "2", "--logging_steps", "1",
    "--report_to", "none", "--progress_bar", "false", "--cap_parameters", "true",
    "--scoring", "fast",
]  # fmt: skip
METHOD_ARGS = {
    "lora": [],
    "alora": [],
    "alora-sensi": [],
    "alora-dnas": [],
    "sora": ["--sora_lambda", "2"],
    "adalora": [],
}
RUNS = {f"{m}-{p}p": (m, p) for m in METHOD_ARGS for p in (1, 2)}
# Logged fields that depend on the machine's speed, not on what was computed.
TIMING_KEYS = {"tokens_per_s", "scoring_s", "rebuild_s"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command(repo: Path, method: str, procs: int, output_dir: Path) -> list[str]:
    script = [str(repo / "launch" / "train.py"), "--ds_config", str(repo / "ds_configs/zero3.json")]
    if procs == 1:
        launcher = [sys.executable]
    else:
        deepspeed = str(Path(sys.executable).with_name("deepspeed"))
        launcher = [deepspeed, "--num_gpus", str(procs), "--master_port", str(free_port())]
    return [*launcher, *script, "--output_dir", str(output_dir), "--overwrite_output_dir",
            *run_args(method)]  # fmt: skip


def run_args(method: str) -> list[str]:
    return [*SMALL_RUN, "--method", method, *METHOD_ARGS[method]]


def run(repo: Path, method: str, procs: int, output_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DS_ACCELERATOR="cpu")
    return subprocess.run(
        command(repo, method, procs, output_dir),
        capture_output=True, text=True, cwd=repo, env=env, timeout=600,
    )  # fmt: skip


def machine() -> dict:
    """What decides whether two machines compute bitwise the same floats."""
    import torch

    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model = next(
            (line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")), "",
        )  # fmt: skip
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": model,
        "machine": platform.machine(),
    }


def tensor_sums(path: Path) -> dict[str, list[float]]:
    from safetensors.torch import load_file

    return {
        key: [float(t.double().sum()), float(t.double().abs().sum())]
        for key, t in sorted(load_file(path).items())
    }


def outputs(output_dir: Path) -> dict:
    """What a run produced, as comparable plain data."""
    rounds = [
        json.loads(p.read_text()) for p in sorted((output_dir / "allocation").glob("round_*.json"))
    ]
    final_prune = output_dir / "allocation" / "final_prune.json"
    metrics = [
        {k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
        for line in (output_dir / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    summary = json.loads((output_dir / "summary.json").read_text())
    adapters = {}
    for name in ("adapter", "best_adapter"):
        directory = output_dir / name
        if not directory.is_dir():
            continue
        config = json.loads((directory / "adapter_config.json").read_text())
        config.pop("base_model_name_or_path")  # where each run saved its base model
        tensors = directory / "adapter_model.safetensors"
        adapters[name] = {
            "config": config,
            "metadata": json.loads((directory / "alora_metadata.json").read_text()),
            "sha256": hashlib.sha256(tensors.read_bytes()).hexdigest(),
            "tensor_sums": tensor_sums(tensors),
        }
    return {
        "rounds": rounds,
        "final_prune": json.loads(final_prune.read_text()) if final_prune.is_file() else None,
        "metrics": metrics,
        "summary": {
            k: summary[k]
            for k in (
                "ranks_by_type",
                "total_ranks_start",
                "total_ranks_end",
                "adapter_params_start",
                "adapter_params_end",
                "adapter_params_peak",
                "tokens",
            )
        },  # fmt: skip
        "adapters": adapters,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=str(REPO), help="checkout whose trainer is run")
    parser.add_argument("--only", nargs="*", choices=sorted(RUNS), help="runs to record")
    parser.add_argument("--work_dir", default="/tmp/alora-golden", help="where runs write")
    parser.add_argument(
        "--check", action="store_true", help="compare with the golden files instead of writing"
    )
    args = parser.parse_args()
    repo = Path(args.repo).resolve()
    failed = 0
    for name in args.only or sorted(RUNS):
        method, procs = RUNS[name]
        output_dir = Path(args.work_dir) / name
        result = run(repo, method, procs, output_dir / "run")
        if result.returncode != 0:
            print(result.stdout[-3000:], result.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{name}: the run failed")
        record = {"run": name, "procs": procs, "args": run_args(method), "machine": machine(),
                  **outputs(output_dir / "run")}  # fmt: skip
        if args.check:
            problems = compare(json.loads((GOLDEN / f"{name}.json").read_text()), record)
            failed += bool(problems)
            print(f"{name}: " + ("; ".join(problems) if problems else "identical"))
            continue
        (GOLDEN / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"{name}: {len(record['rounds'])} rounds, {len(record['metrics'])} metric lines")
    return 1 if failed else 0


# ---- comparing a run with its golden file -------------------------------------------------------


def _close(a, b, rel: float) -> bool:
    """Equal structure; floats within `rel` (relative, or absolute near zero)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= rel * max(abs(a), abs(b), 1e-3)
    return a == b


def compare(golden: dict, actual: dict) -> list[str]:
    """What differs between a golden record and a new run's outputs: bitwise where the golden was
    recorded on a machine of the same kind (same torch, CPU and vector unit), else the plans,
    ranks and counts exactly and every float to 1e-4 relative."""
    bitwise = golden["machine"] == machine()
    rel = 0.0 if bitwise else 1e-4
    problems = []
    plans = ("round", "ranks_before", "pruned", "added", "ranks_after")
    for i, (want, got) in enumerate(zip(golden["rounds"], actual["rounds"], strict=False)):
        if any(want[k] != got[k] for k in plans):
            problems.append(f"round {i + 1}: the plan differs")
        if not _close(want, got, rel):
            problems.append(f"round {i + 1}: the scores differ")
    if len(golden["rounds"]) != len(actual["rounds"]):
        problems.append(f"{len(actual['rounds'])} rounds, golden {len(golden['rounds'])}")
    for key in ("final_prune", "metrics", "summary"):
        if not _close(golden[key], actual[key], rel):
            problems.append(f"{key} differs")
    if golden["adapters"].keys() != actual["adapters"].keys():
        problems.append(
            f"adapters {sorted(actual['adapters'])}, golden {sorted(golden['adapters'])}"
        )
    for name in golden["adapters"].keys() & actual["adapters"].keys():
        want, got = golden["adapters"][name], actual["adapters"][name]
        if (
            want["config"] != got["config"]
            or want["metadata"]["rank_map"] != got["metadata"]["rank_map"]
        ):
            problems.append(f"{name}: adapter_config.json or the rank map differs")
        if not _close(want["metadata"], got["metadata"], rel):
            problems.append(f"{name}: alora_metadata.json differs")
        if bitwise and want["sha256"] != got["sha256"]:
            problems.append(f"{name}: adapter_model.safetensors differs in its bytes")
        if not _close(want["tensor_sums"], got["tensor_sums"], max(rel, 1e-4 * (not bitwise))):
            problems.append(f"{name}: adapter tensors differ")
    return problems


if __name__ == "__main__":
    raise SystemExit(main())
