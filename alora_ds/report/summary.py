"""What a finished run reports: where the ranks went, and what the run cost.

Pure functions over plain data (no model, no config, no process group):

- `plot_rank_heatmap`: a PNG of the final rank of every adapted module, module type x layer, like
  the paper's Figure 3 (arXiv 2403.16187); a run draws every one of its maps on one colour scale
  (`rank_scale`), so the same colour is the same rank in every round's picture.
- `plot_loss_curves`: a PNG of the training loss and the dev loss against the optimizer step, the
  allocation rounds marked.
- `summarize_run`: the paper's Table 4 columns (final ranks per module type, adapter parameters at
  start and end, peak memory per process, wall time, tokens per second) as a dict and as text.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from alora_ds.core import LLAMA_TARGET_MODULES

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def split_module_name(name: str) -> tuple[int, str]:
    """ "model.layers.3.mlp.up_proj" -> (3, "up_proj")."""
    match = _LAYER.search(name)
    if match is None:
        raise ValueError(f"module name {name!r} has no '.layers.<index>.' part")
    return int(match.group(1)), name.rsplit(".", 1)[-1]


def module_types(names: Sequence[str]) -> list[str]:
    """The module types present, LLaMA's order first (q, k, v, o, gate, up, down), then the rest
    alphabetically."""
    present = {split_module_name(n)[1] for n in names}
    known = [t for t in LLAMA_TARGET_MODULES if t in present]
    return known + sorted(present - set(known))


def rank_matrix(rank_map: Mapping[str, int]) -> tuple[list[str], list[int], np.ndarray]:
    """(module types, layer indices, ranks) with ranks[type, layer]; -1 where a layer has no
    module of that type (not adapted)."""
    if not rank_map:
        raise ValueError("the rank map is empty")
    types = module_types(list(rank_map))
    layers = sorted({split_module_name(n)[0] for n in rank_map})
    row = {t: i for i, t in enumerate(types)}
    column = {layer: j for j, layer in enumerate(layers)}
    ranks = np.full((len(types), len(layers)), -1, dtype=np.int64)
    for name, rank in rank_map.items():
        layer, kind = split_module_name(name)
        if ranks[row[kind], column[layer]] != -1:
            raise ValueError(f"two modules of type {kind!r} in layer {layer} (second: {name!r})")
        ranks[row[kind], column[layer]] = rank
    return types, layers, ranks


def rank_scale(*rank_maps: Mapping[str, int]) -> int:
    """The top of a colour scale that every one of `rank_maps` fits: their largest rank (>= 1)."""
    return max([1, *(r for ranks in rank_maps for r in ranks.values())])


def plot_rank_heatmap(
    rank_map: Mapping[str, int],
    path: str | Path,
    *,
    title: str = "Final LoRA ranks",
    vmax: int | None = None,
) -> Path:
    """Write a heatmap PNG of `rank_map` (module name -> rank): module types down, layers across,
    each cell labelled with its rank when the grid is small enough to read. Colours run from 0
    to `vmax` (default: this map's largest rank; pass `rank_scale` of every map a run draws, so
    that they compare). Returns the path."""
    types, layers, ranks = rank_matrix(rank_map)
    top = max(int(ranks.max()), 1) if vmax is None else vmax
    masked = np.ma.masked_less(ranks, 0)  # modules that are not adapted stay blank
    width = min(2.0 + 0.42 * len(layers), 40.0)
    fig = Figure(figsize=(width, 1.2 + 0.45 * len(types)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(
        masked, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=top
    )
    ax.set_yticks(range(len(types)), labels=types)
    step = max(1, len(layers) // 40)
    ax.set_xticks(range(0, len(layers), step), labels=[str(layer) for layer in layers[::step]])
    ax.set_xlabel("layer")
    ax.set_title(title)
    if len(layers) * len(types) <= 600:
        for i in range(len(types)):
            for j in range(len(layers)):
                if ranks[i, j] >= 0:
                    dark = ranks[i, j] < 0.6 * top  # light text on viridis' dark end
                    ax.text(j, i, str(ranks[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")  # fmt: skip
    fig.colorbar(image, ax=ax, label="rank")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_loss_curves(
    records: Sequence[Mapping], path: str | Path, *, round_steps: Sequence[int] = ()
) -> Path:
    """Write a PNG of the training loss and the dev loss against the optimizer step, from
    metrics records (`step`, `loss`, `dev_loss`; later records of a step replace earlier ones,
    as after a resume), with a dashed line at each allocation round. Returns the path."""
    by_step = {int(r["step"]): r for r in records if "step" in r}
    steps = sorted(by_step)
    train = [(s, by_step[s]["loss"]) for s in steps if by_step[s].get("loss") is not None]
    dev = [(s, by_step[s]["dev_loss"]) for s in steps if by_step[s].get("dev_loss") is not None]
    fig = Figure(figsize=(7.0, 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train, strict=True), label="training loss", color="tab:blue", lw=1)
    if dev:
        ax.plot(*zip(*dev, strict=True), "o-", label="dev loss", color="tab:orange", ms=3)
    for index, step in enumerate(round_steps):
        label = "allocation round" if index == 0 else None
        ax.axvline(step, color="grey", ls="--", lw=0.8, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (cross-entropy)")
    if train or dev or round_steps:
        ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


@dataclass(frozen=True)
class TypeRanks:
    total: int
    mean: float
    min: int
    max: int


@dataclass(frozen=True)
class RunSummary:
    """The cost columns of the paper's Table 4 plus where the ranks ended up."""

    ranks_by_type: dict[str, TypeRanks]
    total_ranks_start: int
    total_ranks_end: int
    adapter_params_start: int
    adapter_params_end: int
    adapter_params_peak: int  # the most the adapters held at any time (SoRA/AdaLoRA start high)
    peak_memory_bytes: list[int]  # one per process, in rank order
    wall_time_s: float
    tokens: int
    tokens_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)

    def to_text(self) -> str:
        lines = ["final ranks per module type:"]
        width = max(len(t) for t in self.ranks_by_type)
        lines.append(f"  {'type':{width}}  {'total':>6}  {'mean':>6}  {'min':>4}  {'max':>4}")
        for kind, r in self.ranks_by_type.items():
            lines.append(f"  {kind:{width}}  {r.total:6d}  {r.mean:6.2f}  {r.min:4d}  {r.max:4d}")
        peaks = ", ".join(f"{b / 1e9:.2f}" for b in self.peak_memory_bytes)
        lines += [
            f"ranks: {self.total_ranks_start} at start, {self.total_ranks_end} at end",
            f"adapter parameters: {self.adapter_params_start:,} at start, "
            f"{self.adapter_params_end:,} at end, {self.adapter_params_peak:,} at the peak",
            f"peak memory per process (GB): {peaks}",
            f"wall time: {self.wall_time_s / 3600:.2f} h ({self.wall_time_s:.1f} s)",
            f"tokens per second: {self.tokens_per_s:.1f} ({self.tokens:,} tokens)",
        ]
        return "\n".join(lines)


def adapter_parameters(rank_map: Mapping[str, int], params_per_rank: Mapping[str, int]) -> int:
    """LoRA parameters of a rank map: each rank of a module holds in + out features."""
    missing = sorted(set(rank_map) - set(params_per_rank))
    if missing:
        raise ValueError(f"no parameter count per rank for modules {missing}")
    return sum(r * params_per_rank[name] for name, r in rank_map.items())


def summarize_run(
    *,
    initial_ranks: Mapping[str, int],
    final_ranks: Mapping[str, int],
    params_per_rank: Mapping[str, int],
    peak_memory_bytes: Sequence[int],
    wall_time_s: float,
    tokens: int,
    adapter_params_peak: int | None = None,
) -> RunSummary:
    """The run's summary from plain numbers: rank maps (module name -> rank) at start and end,
    in_features + out_features per module, each process's peak memory, the wall time and the
    training tokens processed."""
    if wall_time_s <= 0:
        raise ValueError(f"wall_time_s must be positive, got {wall_time_s}")
    by_type: dict[str, list[int]] = {t: [] for t in module_types(list(final_ranks))}
    for name in sorted(final_ranks, key=split_module_name):
        by_type[split_module_name(name)[1]].append(final_ranks[name])
    return RunSummary(
        ranks_by_type={
            kind: TypeRanks(sum(v), sum(v) / len(v), min(v), max(v)) for kind, v in by_type.items()
        },
        total_ranks_start=sum(initial_ranks.values()),
        total_ranks_end=sum(final_ranks.values()),
        adapter_params_start=adapter_parameters(initial_ranks, params_per_rank),
        adapter_params_end=adapter_parameters(final_ranks, params_per_rank),
        adapter_params_peak=max(
            adapter_params_peak or 0,
            adapter_parameters(initial_ranks, params_per_rank),
            adapter_parameters(final_ranks, params_per_rank),
        ),
        peak_memory_bytes=[int(b) for b in peak_memory_bytes],
        wall_time_s=float(wall_time_s),
        tokens=int(tokens),
        tokens_per_s=tokens / wall_time_s,
    )


def final_rank_lines(
    final_ranks: Mapping[str, int], rank_budget: int, best_loss: float
) -> list[str]:
    """The lines a run ends with: every module's final rank by type (in layer order), and the
    total against the budget."""
    by_type: dict[str, list[int]] = {}
    for name, r in final_ranks.items():
        by_type.setdefault(name.rsplit(".", 1)[-1], []).append(r)
    most_common = Counter(final_ranks.values()).most_common(1)[0][0]
    return [
        "final ranks per module type (layer order): "
        + "; ".join(f"{kind} {ranks}" for kind, ranks in by_type.items()),
        f"total ranks {sum(final_ranks.values())} of budget {rank_budget}; most common rank "
        f"{most_common}; best dev loss {best_loss:.4f}",
    ]
