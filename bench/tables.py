"""Every table of BENCHMARKS.md, and README.md's performance table, rendered from the committed
results file that the command above the table writes (bench/results/*.json).

    .venv/bin/python bench/tables.py            # print every table, with its document and file
    .venv/bin/python bench/tables.py --check    # exit 1 naming each table a document lacks

After a benchmark is re-run, paste its tables from the first command into the documents.
tests/test_user_docs.py runs the check, so a figure in a table cannot drift from its file, and
BENCHMARKS.md cannot hold a table that is neither rendered here nor listed in UNFILED (a table
from a run that wrote no results file, which its section must say, with the run's date).

Only json and statistics are imported (no torch): the check takes milliseconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

# BENCHMARKS.md tables that no results file holds, by their header line. Each one's section says
# plainly that it comes from an earlier run and when; add nothing here for a new benchmark.
UNFILED = ("| method | best dev loss | final dev loss | test accuracy (22) |",)  # section 2


def load(name: str):
    """A committed results file, by its name under bench/results/."""
    return json.loads((RESULTS / name).read_text())


def spread(values: Sequence[float], digits: int) -> str:
    """'median [min-max]' over seeds; one value alone."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def by_method(rows: Sequence[dict]) -> dict[str, list[dict]]:
    """Rows grouped by method, in the order the file first names each method."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["method"], []).append(row)
    return groups


# ---- the tables ----------------------------------------------------------------------------------


def planted(pattern: str) -> str:
    """bench/planted.py's rows: the ZeRO-2 file, then the methods re-run under ZeRO-3. Medians
    over seeds with [min-max]; the lowest median held-out loss in bold."""
    groups = {
        ("ZeRO-2", method): rows
        for method, rows in by_method(load(f"planted-{pattern}.json")).items()
    }
    groups |= {
        ("ZeRO-3", method): rows
        for method, rows in by_method(load(f"planted-{pattern}-zero3.json")).items()
    }
    best = min(median([r["heldout_loss"] for r in rows]) for rows in groups.values())
    lines = [
        "| method | engine | seeds | held-out loss | adapter params | peak MB | wall s | Spearman |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (engine, method), rows in groups.items():
        losses = [r["heldout_loss"] for r in rows]
        loss = spread(losses, 4)
        if median(losses) == best:
            loss = f"**{loss}**"
        rhos = [r["spearman"] for r in rows if r["spearman"] is not None]
        rho = spread(rhos, 2) if rhos else "null"
        if rhos and len(rhos) < len(rows):
            rho += f" ({len(rows) - len(rhos)} null)"
        lines.append(
            f"| {method} | {engine} | {len(rows)} | {loss} | "
            f"{median([r['adapter_params'] for r in rows]):,.0f} | "
            f"{median([r['peak_mem_mb'] for r in rows]):.0f} | "
            f"{median([r['wall_s'] for r in rows]):.1f} | {rho} |"
        )
    return "\n".join(lines)


def llama_cpp() -> str:
    """bench/llama_cpp_lora.py: relative L2 error of the logits, mean (max) over the prompts, and
    top-1 agreement, for each adapter on each base."""
    found = load("llama-cpp-lora.json")["logits_vs_peft"]
    columns = (
        found["llama.cpp on the f32 base"],
        found["llama.cpp on the q4_1 base"],
        found["llama.cpp q4_1 vs f32 base (quantization noise)"],
    )
    rows = {  # the row's label -> its key in each column, in the column order
        "no adapter": ("base (no adapter)", "base (no adapter)", "base"),
        "`adapter_portable/`": ("portable",) * 3,
        "`adapter/` (PEFT-native)": ("native",) * 3,
    }
    lines = [
        "| | llama.cpp on the F32 base vs peft | llama.cpp on the Q4_1 base vs peft "
        "| Q4_1 vs F32 in llama.cpp (quantization noise) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, keys in rows.items():
        cells = [
            f"{error(c[k]['rel_l2_mean'])} ({error(c[k]['rel_l2_max'])}), {c[k]['top1_agree']}"
            for c, k in zip(columns, keys, strict=True)
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def error(value: float) -> str:
    """Relative errors: three decimals, or two significant digits below 0.001 (4e-6, 2.4e-5)."""
    if value >= 1e-3:
        return f"{value:.3f}"
    mantissa, exponent = f"{value:.2g}".split("e")
    return f"{mantissa}e{int(exponent)}"


REAL_SETS = {"rt": "RT test", "tweets": "tweets", "nyt": "NYT", "amazon": "Amazon"}


def real(name: str) -> str:
    """The table of a committed bench/real.py results file."""
    return real_table(load(name))


def real_table(found: dict) -> str:
    """bench/real.py's report (what it writes to --json, and prints as this table): medians over
    seeds with [min-max]; accuracy in %."""
    sizes = found["sentences"]
    sets = " | ".join(f"{label} acc ({sizes[key]})" for key, label in REAL_SETS.items())
    lines = [
        f"| method | seeds | {sets} | dev loss (trainer) | dev loss (exported) | "
        "adapter params start / peak / end | peak MB | wall s | eval s |",
        "| --- | ---: |" + " ---: |" * (len(REAL_SETS) + 6),
    ]
    for method, rows in by_method(found["rows"]).items():
        accuracy = " | ".join(spread([r["accuracy"][k] for r in rows], 1) for k in REAL_SETS)
        params = " / ".join(
            f"{median([r[f'adapter_params_{when}'] for r in rows]):,.0f}"
            for when in ("start", "peak", "end")
        )
        lines.append(
            f"| {method} | {len(rows)} | {accuracy} | {spread([r['dev_loss'] for r in rows], 4)} | "
            f"{spread([r['exported_dev_loss'] for r in rows], 4)} | {params} | "
            f"{median([r['peak_mem_mb'] for r in rows]):,.0f} | "
            f"{median([r['wall_s'] for r in rows]):.0f} | {median([r['eval_s'] for r in rows]):.0f} |"
        )
    return "\n".join(lines)


def scoring() -> str:
    """bench/scoring.py (README.md, Performance): one scoring round three ways."""
    found = load("scoring-cpu-2core.json")
    passes = found["layer_passes"]
    rows = {  # the row's label -> its key in the file, and its layer passes
        "naive, 1 process x 2 threads": ("naive", f"{passes['naive']:.0f}"),
        "fast, 1 process x 2 threads": ("fast_1proc", f"{passes['fast_1proc']:.0f}"),
        "fast, 2 processes x 1 thread": (
            "fast_2proc",
            f"{passes['fast_2proc_per_process']:.0f} per process",
        ),
    }
    lines = [
        "| | wall s | layer passes | ranks/s | peak RSS MB / process |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, (key, layer_passes) in rows.items():
        lines.append(
            f"| {label} | {found[f'{key}_s']:.1f} | {layer_passes} | "
            f"{found['ranks_per_s'][key]:.1f} | {found['peak_rss_mb_per_process'][key]:.0f} |"
        )
    return "\n".join(lines)


PAPER_ROUNDS = 8  # N_A: the projections below count the paper's 8 rounds
TASK_NAMES = {"rte": "RTE", "boolq": "BoolQ", "e2e": "E2E", "sst2": "SST-2"}


def overhead() -> str:
    """bench/overhead.py's cost part: one round's cost each way, and ALoRA / LoRA wall time for
    the paper's schedule at each task's training-set size (rounds plus rebuilds over 10 epochs)."""
    found = load("overhead-smollm2-cpu.json")
    step, rebuild = found["train_step_s"], found["rebuild_s"]
    live = found["live_ranks"]
    rows = [(f"screened, {key}", v["round_s"], v["exact_ranks"])
            for key, v in found["screened_by_first_candidates"].items()]  # fmt: skip
    rows += [("fast (exact, the default)", found["fast_round_s"], live),
             ("naive (exact)", found["naive_round_s"], live)]  # fmt: skip
    tasks = list(found["steps_per_run"])
    lines = [
        "| scoring | round s | in training steps | exact ranks | "
        + " | ".join(f"ALoRA / LoRA, {TASK_NAMES.get(t, t)}" for t in tasks)
        + " |",
        "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in tasks) + " |",
    ]
    for label, seconds, exact in rows:
        ratios = [1 + PAPER_ROUNDS * (seconds + rebuild) / (found["steps_per_run"][t] * step)
                  for t in tasks]  # fmt: skip
        lines.append(
            f"| {label} | {seconds:,.0f} | {seconds / step:,.1f} | {exact:,} of {live:,} | "
            + " | ".join(f"{r:.3f}" for r in ratios)
            + " |"
        )
    return "\n".join(lines)


def agreement() -> str:
    """bench/overhead.py --agreement: screened rounds checked against exact scoring."""
    found = load("agreement-cpu.json")
    lines = [
        "| runs | rounds | pruned set identical | added ranks identical | "
        "Spearman, all ranks (median) | ranks scored exactly (median) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for source, part in found["by_source"].items():
        rounds = part["rounds"]
        pruned = sum(r["identical_pruned"] for r in rounds)
        added = sum(r["identical_added"] for r in rounds)
        lines.append(
            f"| {source} | {len(rounds)} | {pruned} of {len(rounds)} | {added} of {len(rounds)} | "
            f"{part['median_spearman_all']:.3f} | {100 * part['median_exact_share']:.0f}% |"
        )
    return "\n".join(lines)


# Every rendered table: name -> (the document it appears in, its results files, the renderer).
TABLES: dict[str, tuple[str, str, Callable[[], str]]] = {
    "planted attention-late": (
        "BENCHMARKS.md",
        "planted-attention-late.json, planted-attention-late-zero3.json",
        lambda: planted("attention-late"),
    ),
    "planted mlp-early": (
        "BENCHMARKS.md",
        "planted-mlp-early.json, planted-mlp-early-zero3.json",
        lambda: planted("mlp-early"),
    ),
    "llama.cpp": ("BENCHMARKS.md", "llama-cpp-lora.json", llama_cpp),
    "rotten tomatoes cpu": ("BENCHMARKS.md", "real-cpu.json", lambda: real("real-cpu.json")),
    "scoring": ("README.md", "scoring-cpu-2core.json", scoring),
    "overhead": ("BENCHMARKS.md", "overhead-smollm2-cpu.json", overhead),
    "agreement": ("BENCHMARKS.md", "agreement-cpu.json", agreement),
}


# ---- the check -----------------------------------------------------------------------------------


def markdown_tables(text: str) -> list[str]:
    """Every table of a Markdown text: runs of consecutive lines that start with '|'."""
    tables, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append("\n".join(current))
            current = []
    return tables


def problems(repo: Path = REPO) -> list[str]:
    """What differs between the documents and the results files, one line each; [] when none."""
    rendered = {name: render() for name, (_, _, render) in TABLES.items()}
    found = []
    for name, (document, files, _) in TABLES.items():
        if rendered[name] not in markdown_tables((repo / document).read_text()):
            found.append(f"{document}: the '{name}' table is not the one rendered from {files}")
    ours = {table for name, table in rendered.items() if TABLES[name][0] == "BENCHMARKS.md"}
    for table in markdown_tables((repo / "BENCHMARKS.md").read_text()):
        if table not in ours and not table.startswith(UNFILED):
            found.append(f"BENCHMARKS.md: a table no results file renders: {table.splitlines()[0]}")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the documents")
    args = parser.parse_args(argv)
    if args.check:
        found = problems()
        for line in found:
            print(line)
        return 1 if found else 0
    for name, (document, files, render) in TABLES.items():
        print(f"{name} ({document}; from bench/results/: {files}):\n\n{render()}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
