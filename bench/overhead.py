"""ALoRA's own cost against LoRA's training, at the paper's settings, on a real model.

    .venv/bin/python bench/overhead.py --json bench/results/overhead-smollm2-cpu.json
    .venv/bin/python bench/overhead.py --agreement --json bench/results/agreement-cpu.json

The cost part: SmolLM2-135M-Instruct (real weights, the `smollm2` alias) in one process under
DeepSpeed ZeRO-2 (as the trainer runs one process), r_init 8 on all 7 module types (30 layers:
1,680 ranks), |B_val| = 32 development examples of SST-2's length (the task's sample file), n_A
= 7. It measures, in one run:

- `train_step_s`: one optimizer step at batch 16 (the median of the warm steps);
- `screened_round_s`: one whole screened round (two gradient passes, exact scores for the
  candidates, any widening), on adapters trained for those steps;
- `fast_round_s`: the fast exact round, timed on a subset of ranks spread evenly over the
  layers and halves and scaled: its fixed part (the prefix passes, timed with one candidate)
  plus the per-rank part times 1,680 (a full fast round takes tens of minutes on this CPU);
- `naive_round_s`: the direct path likewise (two full forwards per rank);
- `rebuild_s`: the engine rebuilt after a round's plan;
- `projected_ratio`: ALoRA / LoRA wall time for the paper's schedule (10 epochs of batch 16,
  K1 = 1 epoch, 8 rounds, K2 = 0.25 epoch) at the training-set sizes of RTE, BoolQ, E2E and
  SST-2, with screened scoring (and `projected_ratio_fast` with fast): (10 epochs x steps x
  step + 8 x (round + rebuild)) / (10 epochs x steps x step). ALoRA's training steps cost what
  LoRA's do (the same adapter sizes: the budget holds from step 0).

The agreement part (`--agreement`): the planted-rank benchmark (bench/planted.py, both patterns,
3 seeds) trained with fast and with screened scoring, the screened runs with --screen_verify
(every round also scored exactly, and the plans compared), plus a screened SmolLM2 run with
--screen_verify on SST-2's samples. Reported: the fraction of rounds whose pruned sets are
identical (`identical_prune_fraction`), and the held-out loss of each mode's runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

from alora_ds.core.allocation import plan_round, pruned_by_module
from alora_ds.core.inject import gated_modules, inject_gated_lora
from alora_ds.io.examples import make_batches
from alora_ds.io.models import load_causal_lm, load_tokenizer
from alora_ds.io.pretrained import resolve_model_alias
from alora_ds.io.splits import build_split
from alora_ds.runtime import process as P
from alora_ds.runtime import zero
from alora_ds.runtime.engine import Engine
from alora_ds.scoring.direct import ablation_scores
from alora_ds.scoring.fast import LlamaStack, candidate_groups, fast_candidate_scores
from alora_ds.scoring.screened import first_candidates

# The paper's schedule and the training-set sizes the issue names.
EPOCHS, ROUNDS, BATCH, N_PRUNE, B_VAL, R_INIT = 10, 8, 16, 7, 32, 8
TASK_SIZES = {"rte": 2490, "boolq": 9427, "e2e": 42061, "sst2": 67349}


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def spread_subset(model, every: int) -> list:
    """Every `every`-th live rank of each (layer, half) group: the subset keeps the layers'
    mix, which decides the fast path's cost per rank (a rank in layer l re-runs layers l..L)."""
    stack = LlamaStack(model)
    names = [n for n, m in model.named_modules() if any(m is layer for layer in stack.layers)]
    groups = candidate_groups(gated_modules(model), names)
    return [c for _, _, cands in groups for c in cands[::every]]


def cost(args: argparse.Namespace) -> dict:
    """The cost part, in this process."""
    torch.set_num_threads(args.threads)
    info = P.init_distributed(3600)
    path = resolve_model_alias("smollm2")
    tokenizer = load_tokenizer(path)
    train, _ = build_split("sst2", None, "train", tokenizer, 128)
    dev, _ = build_split("sst2", None, "validation", tokenizer, 128)
    dev = (dev * (-(-B_VAL // len(dev))))[:B_VAL]  # |B_val| = 32 rows of the task's length
    model = load_causal_lm(path, torch.float32, "cpu")
    model.config.use_cache = False
    modules = inject_gated_lora(model, R_INIT * 7 * model.config.num_hidden_layers, seed=0)
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds.update(train_micro_batch_size_per_gpu=BATCH, gradient_accumulation_steps=1,
              train_batch_size=BATCH)  # fmt: skip
    engine = Engine(model, ds, zero.OptimizerSettings(1e-3, (0.9, 0.999), 1e-8, 0.0), info)
    pad = tokenizer.pad_token_id
    batches = make_batches((train * 4)[: BATCH * args.steps], BATCH, pad)
    step_times = []
    for batch in batches:  # trains the adapters too: the rounds score trained ranks
        engine.model.train()
        seconds, _ = timed(lambda b=batch: (engine.backward(engine.loss(b)), engine.step()))
        step_times.append(seconds)
    train_step_s = statistics.median(step_times[1:])
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)
    print(f"train step (batch {BATCH}, {tokens:.0f} tokens): {train_step_s:.2f} s", flush=True)

    val = make_batches(dev, args.scoring_batch_size, pad)
    live = sum(m.r for m in modules.values())
    # The defaults (n_A first candidates, module means estimated) and a wider first set: what
    # the widening rule then adds is part of each round's cost. `--exact_means` adds the round
    # with footnote 4's module means exact (on SmolLM2 it ran for over 8 minutes, so it is not
    # part of the default run).
    by_candidates = {}
    variants = [(0, False), (4 * N_PRUNE, False)] + [(0, True)] * args.exact_means
    for candidates, exact_means in variants:
        seconds, result = timed(
            lambda k=candidates, m=exact_means: engine.screened_scores(
                val, N_PRUNE, candidates=k, exact_means=m
            )
        )
        key = f"{first_candidates(candidates, N_PRUNE)} candidates" + (
            ", means exact" if exact_means else ""
        )
        by_candidates[key] = {"round_s": seconds, **result.record}
        print(f"screened round, {key}: {seconds:.1f} s; {result.record}", flush=True)
        if candidates == 0 and not exact_means:
            screened_s, screened = seconds, result

    reset = engine._start_of_pass()
    one = spread_subset(model, 10**9)[:1]
    subset = spread_subset(model, args.every)
    prefix_s, _ = timed(lambda: fast_candidate_scores(model, val, one, start_of_pass=reset))
    subset_s, _ = timed(lambda: fast_candidate_scores(model, val, subset, start_of_pass=reset))
    per_rank = (subset_s - prefix_s) / (len(subset) - 1)
    fast_round_s = prefix_s + per_rank * (live - 1)
    print(f"fast: prefix {prefix_s:.1f} s, {len(subset)} ranks {subset_s:.1f} s -> "
          f"{fast_round_s:.0f} s for {live}", flush=True)  # fmt: skip

    naive_subset = subset[:: max(1, len(subset) // 6)]
    naive_s, _ = timed(lambda: ablation_scores(model, val, naive_subset))
    naive_round_s = naive_s / len(naive_subset) * live
    print(f"naive: {len(naive_subset)} ranks {naive_s:.1f} s -> {naive_round_s:.0f} s", flush=True)

    plan = plan_round(screened.importance, N_PRUNE)
    rebuild_s, _ = timed(
        lambda: engine.rebuild(pruned_by_module(plan.pruned), plan.added, seed=0, round_index=1)
    )
    after = []
    for batch in batches[:3]:
        engine.model.train()
        seconds, _ = timed(lambda b=batch: (engine.backward(engine.loss(b)), engine.step()))
        after.append(seconds)

    def ratio(round_s: float, size: int) -> float:
        lora = EPOCHS * (size // BATCH) * train_step_s
        return (lora + ROUNDS * (round_s + rebuild_s)) / lora

    return {
        "model": "SmolLM2-135M-Instruct", "engine": "DeepSpeed ZeRO-2, 1 process, CPU fp32",
        "threads": args.threads, "live_ranks": live, "b_val": B_VAL, "n_prune": N_PRUNE,
        "tokens_per_step": tokens, "train_step_s": train_step_s,
        "train_step_after_rebuild_s": statistics.median(after[1:]),
        "screened_round_s": screened_s, "screened_record": screened.record,
        "screened_by_first_candidates": by_candidates,
        "fast_round_s": fast_round_s, "fast_prefix_s": prefix_s,
        "fast_subset_ranks": len(subset), "fast_subset_s": subset_s,
        "naive_round_s": naive_round_s, "naive_subset_ranks": len(naive_subset),
        "rebuild_s": rebuild_s,
        "screened_round_steps": screened_s / train_step_s,
        "fast_round_steps": fast_round_s / train_step_s,
        "screened_over_fast": screened_s / fast_round_s,
        "projected_ratio": {t: ratio(screened_s, n) for t, n in TASK_SIZES.items()},
        "projected_ratio_fast": {t: ratio(fast_round_s, n) for t, n in TASK_SIZES.items()},
        "steps_per_run": {t: EPOCHS * (n // BATCH) for t, n in TASK_SIZES.items()},
    }  # fmt: skip


# ---- the agreement part -------------------------------------------------------------------------

PATTERNS = ("attention-late", "mlp-early")
MODES = {"fast": "--scoring fast", "screened": "--scoring screened --screen_verify true"}
# SmolLM2 rounds scored both ways: all 7 module types of layers 0-1 (14 modules x r_init 8 = 112
# ranks), 2 rounds, so that the exact check of every round (a full fast round) fits on this CPU.
SMOLLM2_RUN = [
    "--model_name_or_path", "smollm2", "--task", "sst2", "--target_modules",
    r"model\.layers\.[0-1]\..*_proj", "--rank_budget", "112", "--max_seq_length", "128",
    "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--max_steps", "30",
    "--initial_steps", "11", "--round_steps", "4", "--num_rounds", "2", "--prune_per_round", "7",
    "--val_examples", "32", "--scoring_batch_size", "8", "--eval_steps", "30",
    "--logging_steps", "10", "--report_to", "none", "--progress_bar", "false",
]  # fmt: skip


def run(command: list[str], log: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DS_ACCELERATOR="cpu")
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {shlex.join(command)}; see {log}")


def verify_records(rounds: list[Path]) -> list[dict]:
    out = []
    for path in sorted(rounds):
        record = json.loads(path.read_text())
        verify = record["verify"]
        out.append({
            "round": record["round"], "identical_pruned": verify["identical_pruned"],
            "identical_added": verify["identical_added"], "spearman_all": verify["spearman_all"],
            "exact_ranks": record["screening"]["exact_ranks"],
            "live_ranks": record["screening"]["live_ranks"],
            "widenings": record["screening"]["widenings"],
        })  # fmt: skip
    return out


def agreement(args: argparse.Namespace) -> dict:
    """Planted patterns (3 seeds) and SmolLM2 rounds, trained with fast and with screened
    scoring; every screened round also scored exactly (--screen_verify)."""
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="alora-agreement-"))
    rounds: dict[str, list[dict]] = {}
    heldout: dict[str, dict[str, list[float]]] = {}
    for pattern in PATTERNS:
        for mode, extra in MODES.items():
            out = work / f"{pattern}-{mode}"
            out.mkdir(parents=True, exist_ok=True)
            if not (args.reuse and (out / "rows.json").exists()):
                run([sys.executable, str(REPO / "bench" / "planted.py"),
                    "--pattern", str(REPO / "bench" / "patterns" / f"{pattern}.json"),
                    "--methods", "alora", "--seeds", str(args.seeds), "--work_dir", str(out),
                    "--json", str(out / "rows.json"), "--train_args", extra], out / "planted.log")  # fmt: skip
            rows = json.loads((out / "rows.json").read_text())
            rows = rows["runs"] if isinstance(rows, dict) else rows
            heldout.setdefault(pattern, {})[mode] = [r["heldout_loss"] for r in rows]
            if mode == "screened":
                rounds[pattern] = verify_records(
                    list(out.glob("seed*/alora/allocation/round_*.json"))
                )
            print(f"{pattern} {mode}: held-out loss {heldout[pattern][mode]}", flush=True)
    smollm2: dict[str, float] = {}
    # Screened first: its fast twin only decides something when a plan differed (identical plans
    # in every round give the same run, bit for bit, as fast scoring would).
    for mode, extra in reversed(MODES.items()):
        if mode == "fast" and all(r["identical_pruned"] and r["identical_added"]
                                  for r in rounds["smollm2"]):  # fmt: skip
            smollm2["fast"] = smollm2["screened"]
            print("smollm2 fast: every screened round's plan was the exact one; not rerun")
            continue
        out = work / f"smollm2-{mode}"
        run([sys.executable, str(REPO / "launch" / "train.py"), "--ds_config", "zero2.json",
             "--output_dir", str(out), "--overwrite_output_dir", *SMOLLM2_RUN, *shlex.split(extra)],
            work / f"smollm2-{mode}.log")  # fmt: skip
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        smollm2[mode] = [m["dev_loss"] for m in metrics if "dev_loss" in m][-1]
        if mode == "screened":
            rounds["smollm2"] = verify_records(list((out / "allocation").glob("round_*.json")))
        print(f"smollm2 {mode}: dev loss {smollm2[mode]}", flush=True)
    every = [r for records in rounds.values() for r in records]
    return {
        "identical_prune_fraction": sum(r["identical_pruned"] for r in every) / len(every),
        "identical_added_fraction": sum(r["identical_added"] for r in every) / len(every),
        "rounds": len(every),
        "by_source": {
            source: {
                "identical_prune_fraction": sum(r["identical_pruned"] for r in records)
                / len(records),
                "median_spearman_all": statistics.median(r["spearman_all"] for r in records),
                "median_exact_share": statistics.median(
                    r["exact_ranks"] / r["live_ranks"] for r in records
                ),
                "rounds": records,
            }
            for source, records in rounds.items()
        },
        "planted_heldout_loss": heldout,
        "smollm2_dev_loss": smollm2,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--steps", type=int, default=6, help="training steps before the round")
    parser.add_argument("--every", type=int, default=20, help="fast path timed on every Nth rank")
    parser.add_argument("--scoring_batch_size", type=int, default=8)
    parser.add_argument("--agreement", action="store_true", help="the agreement part instead")
    parser.add_argument("--exact_means", action="store_true",
                        help="cost: also time a round with --screen_exact_means")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=3, help="agreement: planted seeds")
    parser.add_argument("--work_dir", help="agreement: where runs go (default: a temp dir)")
    parser.add_argument("--reuse", action="store_true",
                        help="agreement: keep planted runs already finished in --work_dir")  # fmt: skip
    args = parser.parse_args()
    results = agreement(args) if args.agreement else cost(args)
    print(json.dumps({k: v for k, v in results.items() if k != "screened_record"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
