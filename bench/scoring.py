"""Benchmark: the cost of one AB-LoRA scoring round, direct vs fast, 1 vs 2 processes.

    .venv/bin/python bench/scoring.py [--json results.json] [--vocab_size 4096]

A LLaMA config of hidden 256, 8 layers, rank 8 on all 7 modules (448 live ranks), B_val of
32 examples x 64 tokens, CPU, fp32, under DeepSpeed ZeRO-3 (gloo) exactly as in training:

- naive, 1 process, 2 threads: two full forwards per rank (the reference);
- fast, 1 process, 2 threads;
- fast, 2 processes, 1 thread each (the same total threads), ablations split between them;
  the same run also times training steps and the ZeRO-3 adapter rebuild after a round.

Every figure in the table comes from this one invocation (the machines are shared and noisy:
compare ratios, not seconds across runs). Not a test: it takes several minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from alora_ds.runtime.process import free_port

B_VAL, SEQ_LEN, RANK_BUDGET, HIDDEN, LAYERS = 32, 64, 448, 256, 8


# ---- the worker: runs inside `deepspeed --num_gpus N bench/scoring.py --worker ...` -------------


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from alora_ds.runtime.cpu import keep_freed_memory

    keep_freed_memory()  # as launch/train.py does on CPU, for every method alike
    from transformers import AutoModelForCausalLM

    from alora_ds.core.allocation import plan_round, pruned_by_module
    from alora_ds.core.inject import inject_gated_lora
    from alora_ds.io.examples import make_batches
    from alora_ds.io.models import tiny_llama_config
    from alora_ds.runtime import process as P
    from alora_ds.runtime import zero
    from alora_ds.runtime.engine import Engine
    from alora_ds.scoring.fast import ScoringStats, naive_layer_passes

    info = P.init_distributed(600)
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds.update(train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=1,
              train_batch_size=8 * info.world_size)  # fmt: skip
    config = tiny_llama_config(
        vocab_size=args.vocab_size, hidden_size=HIDDEN, intermediate_size=688,
        num_hidden_layers=LAYERS, num_attention_heads=8, num_key_value_heads=8,
        max_position_embeddings=SEQ_LEN * 2,
    )  # fmt: skip
    with zero.partitioned_loading(ds):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    modules = inject_gated_lora(model, RANK_BUDGET, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking adapters: every rank changes the loss
        for module in modules.values():
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.05)
    engine = Engine(model, ds, zero.OptimizerSettings(1e-4, (0.9, 0.999), 1e-8, 0.0), info)

    data = torch.Generator().manual_seed(2)

    def examples(n: int, seed_offset: int) -> list[dict]:
        rows = []
        for _ in range(n):
            ids = torch.randint(3, args.vocab_size, (SEQ_LEN,), generator=data).tolist()
            rows.append({"input_ids": ids, "labels": [-100] * (SEQ_LEN // 2) + ids[SEQ_LEN // 2 :]})
        return rows

    train = make_batches(examples(8 * 4, 0), 8)
    # Training steps first (the ZeRO-3 trap: a no_grad forward first slows later steps).
    step_times = []
    for i in range(4):
        start = time.perf_counter()
        engine.backward(engine.loss(train[i % len(train)]))
        engine.step()
        step_times.append(time.perf_counter() - start)
    train_step_s = sorted(step_times[1:])[1]  # median of the warm steps

    val = make_batches(examples(B_VAL, 1), B_VAL)
    stats = ScoringStats()
    P.barrier()
    start = time.perf_counter()
    scores = engine.ab_lora_scores(val, mode=args.method, max_rows=args.max_rows, stats=stats)
    scoring_s = time.perf_counter() - start
    live = sum(m.r for m in modules.values())
    passes = (
        stats.layer_passes if args.method == "fast" else naive_layer_passes(live, LAYERS, len(val))
    )

    rebuild_s = None
    if args.rebuild:
        plan = plan_round(scores.importance, 7)
        P.barrier()
        start = time.perf_counter()
        engine.rebuild(pruned_by_module(plan.pruned), plan.added, seed=0, round_index=1)
        rebuild_s = time.perf_counter() - start
        after = []
        for i in range(4):
            start = time.perf_counter()
            engine.backward(engine.loss(train[i % len(train)]))
            engine.step()
            after.append(time.perf_counter() - start)
        # As before the round: the first step of a new engine records ZeRO-3's prefetch trace.
        train_step_after_s = sorted(after[1:])[1]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peaks = P.all_reduce_sum([peak_mb], info.device)[0] / info.world_size
    if info.is_main:
        Path(args.out).write_text(json.dumps({
            "method": args.method, "processes": info.world_size, "threads": args.threads,
            "scoring_s": scoring_s, "live_ranks": live, "layer_passes": passes,
            "layer_calls": stats.layer_calls if args.method == "fast" else passes / 1.0,
            "ranks_per_s": live / scoring_s, "peak_rss_mb_per_process": peaks,
            "train_step_s": train_step_s, "rebuild_s": rebuild_s,
            "train_step_after_rebuild_s": train_step_after_s if args.rebuild else None,
            "S_without": scores.S_without, "S_only": scores.S_only, "S_M": scores.S_M,
        }))  # fmt: skip


# ---- the driver ---------------------------------------------------------------------------------


def run(procs: int, threads: int, method: str, args, out: Path, rebuild: bool = False) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), DS_ACCELERATOR="cpu",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")  # fmt: skip
    command = [
        str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(procs),
        "--master_port", str(free_port()), str(Path(__file__).resolve()), "--worker",
        "--method", method, "--threads", str(threads), "--out", str(out),
        "--vocab_size", str(args.vocab_size), "--max_rows", str(args.max_rows),
    ] + (["--rebuild"] if rebuild else [])  # fmt: skip
    print(f"running {method} on {procs} process(es) x {threads} thread(s)...", flush=True)
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    if result.returncode != 0:
        sys.exit(
            f"error: the {method} run failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        )
    return json.loads(out.read_text())


MATMUL = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
x, w = torch.randn(16384, 256), torch.randn(688, 256)
for _ in range(3):
    x @ w.t()
start = time.perf_counter()
for _ in range(60):
    x @ w.t()
print(2 * 16384 * 256 * 688 * 60 / (time.perf_counter() - start) / 1e9)
"""


def matmul_ceiling() -> tuple[float, float]:
    """GFLOP/s of an MLP-shaped fp32 matmul: one process with 2 threads, and two 1-thread
    processes at once (their sum). Their ratio is the best wall-time ratio that splitting the
    scoring over 2 processes can reach against 2 threads on this machine."""

    def start(threads: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", MATMUL, str(threads)],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip

    one = float(start(2).communicate()[0])
    pair = [start(1), start(1)]
    return one, sum(float(p.communicate()[0]) for p in pair)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument(
        "--max_rows", type=int, default=0, help="scoring rows per forward (0: auto)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="fast", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--rebuild", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    threads_gflops, processes_gflops = matmul_ceiling()
    with tempfile.TemporaryDirectory() as tmp:
        naive = run(1, 2, "naive", args, Path(tmp) / "naive.json")
        fast1 = run(1, 2, "fast", args, Path(tmp) / "fast1.json")
        fast2 = run(2, 1, "fast", args, Path(tmp) / "fast2.json", rebuild=True)

    worst = 0.0
    for run_ in (fast1, fast2):
        for key in ("S_without", "S_only"):
            for name, values in naive[key].items():
                for a, b in zip(values, run_[key][name], strict=True):
                    worst = max(worst, abs(a - b) / abs(a))
    rows = [("naive, 1 proc x 2 threads", naive), ("fast, 1 proc x 2 threads", fast1),
            ("fast, 2 procs x 1 thread", fast2)]  # fmt: skip
    print(f"\nAB-LoRA scoring round: LLaMA hidden {HIDDEN}, {LAYERS} layers, vocab "
          f"{args.vocab_size}, {naive['live_ranks']} live ranks, B_val {B_VAL} x {SEQ_LEN} "
          "tokens, CPU fp32, ZeRO-3")  # fmt: skip
    print(
        f"{'':<28}{'wall s':>9}{'layer passes':>14}{'layer calls':>13}{'ranks/s':>9}{'peak RSS MB':>13}"
    )
    for label, r in rows:
        print(f"{label:<28}{r['scoring_s']:>9.2f}{r['layer_passes']:>14.0f}{r['layer_calls']:>13.0f}"
              f"{r['ranks_per_s']:>9.1f}{r['peak_rss_mb_per_process']:>13.0f}")  # fmt: skip
    speedup = naive["scoring_s"] / fast1["scoring_s"]
    ratio = fast2["scoring_s"] / fast1["scoring_s"]
    print(f"\nspeed-up fast vs naive (1 process): {speedup:.2f}x (target >= 1.8x)")
    print(f"fast 2 processes / 1 process wall time: {ratio:.2f} (target <= 0.6)")
    ceiling = threads_gflops / processes_gflops
    print(f"  matmul rate: 1 process x 2 threads {threads_gflops:.1f} GFLOP/s, 2 processes x 1 "
          f"thread {processes_gflops:.1f} GFLOP/s together: compute-bound work split over 2 "
          f"processes can reach {ceiling:.2f} at best here")  # fmt: skip
    print(
        f"ZeRO-3 rebuild after a round: {fast2['rebuild_s']:.3f}s; training step "
        f"{fast2['train_step_s']:.3f}s before, {fast2['train_step_after_rebuild_s']:.3f}s after "
        f"(rebuild = {fast2['rebuild_s'] / fast2['train_step_s']:.2f} steps; target < 2)"
    )
    print(f"max relative error of fast scores vs naive: {worst:.2e} (target <= 1e-5)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "naive_s": naive["scoring_s"], "fast_1proc_s": fast1["scoring_s"],
            "fast_2proc_s": fast2["scoring_s"], "speedup_fast_vs_naive": speedup,
            "ratio_2proc_vs_1proc": ratio, "rebuild_s": fast2["rebuild_s"],
            "matmul_gflops": {"1proc_x_2threads": threads_gflops,
                              "2procs_x_1thread": processes_gflops},
            "best_ratio_2proc_vs_1proc": ceiling,
            "train_step_s": fast2["train_step_s"], "max_rel_err_vs_naive": worst,
            "train_step_after_rebuild_s": fast2["train_step_after_rebuild_s"],
            "layer_passes": {"naive": naive["layer_passes"], "fast_1proc": fast1["layer_passes"],
                             "fast_2proc_per_process": fast2["layer_passes"]},
            "ranks_per_s": {"naive": naive["ranks_per_s"], "fast_1proc": fast1["ranks_per_s"],
                            "fast_2proc": fast2["ranks_per_s"]},
            "peak_rss_mb_per_process": {"naive": naive["peak_rss_mb_per_process"],
                                        "fast_1proc": fast1["peak_rss_mb_per_process"],
                                        "fast_2proc": fast2["peak_rss_mb_per_process"]},
            "config": {"hidden": HIDDEN, "layers": LAYERS, "vocab": args.vocab_size,
                       "live_ranks": naive["live_ranks"], "b_val": B_VAL, "seq_len": SEQ_LEN},
        }, indent=2))  # fmt: skip
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
