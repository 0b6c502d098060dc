"""What one AB-LoRA scoring round costs, counted before it runs (the trainer prints it at start).

The counts follow the scorers' own accounting (alora_ds.scoring.fast.ScoringStats), per process:

- layer passes: one decoder layer run over one chunk of B_val for one candidate. The naive path
  pays 2 x layers per rank (S(M \\ r) and S(M_r)) plus 2 x layers for S(M) and S(base); the fast
  path runs a candidate only from its own layer (from the MLP half for gate/up/down), after two
  prefix passes per chunk.
- forwards: the calls that run them. Naive: one per scored configuration and chunk. Fast: the
  batched candidate blocks (ScoringStats.forwards), plus two prefix passes per chunk.
- gradient passes (screened only): a forward and backward over one chunk, twice per chunk.

Processes share the candidates (naive, fast) or the chunks (screened's gradient passes), so the
per-process counts fall with the number of processes. Every call is also listed as a `Pass`
(how many, over what share of the layers, how many rows), so that a round's time can be predicted
from two measured forwards (`seconds`). Pure Python: no torch, no model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ATTENTION, MLP = 0, 1  # the halves of a decoder layer, as alora_ds.scoring.fast names them


@dataclass(frozen=True)
class ModuleSite:
    """Where an adapted module sits: its decoder layer, the half of it (ATTENTION or MLP), and
    how many live ranks it holds."""

    layer: int
    half: int
    ranks: int


@dataclass(frozen=True)
class Pass:
    """`count` calls through `layers` (a share of the decoder layers, 1.0 = all) over `rows`
    rows each (on average); `backward`: a forward and a backward."""

    count: int
    layers: float
    rows: float
    backward: bool = False


@dataclass(frozen=True)
class RoundCost:
    """One round's work on one process (see the module docstring for the units)."""

    mode: str
    ranks: int  # live ranks
    exact_ranks: int  # ranks scored by ablation (screened: the first candidates, at least)
    examples: int  # |B_val|
    chunks: int
    num_layers: int
    layer_passes: float
    example_layer_passes: float  # layer passes weighted by the rows of their chunk
    passes: tuple[Pass, ...]

    @property
    def forwards(self) -> int:
        """Forward calls (screened: besides its gradient passes)."""
        return sum(p.count for p in self.passes if not p.backward)

    @property
    def gradient_passes(self) -> int:
        return sum(p.count for p in self.passes if p.backward)

    @property
    def forward_equivalents(self) -> float:
        """The ablation work in forwards of the whole of B_val through every layer."""
        return self.example_layer_passes / (self.num_layers * self.examples)


def _per_process(count: int, world_size: int) -> int:
    return -(-count // world_size)


def _ablation_passes(
    mode: str,
    sites: Sequence[ModuleSite],
    num_layers: int,
    chunk_rows: Sequence[int],
    world_size: int,
    max_rows: int,
    share: float,
) -> tuple[float, float, list[Pass]]:
    """(layer passes, example-layer passes, calls) of scoring a `share` of every module's ranks
    exactly: all of them (1.0), or screened's candidates, taken as an even share."""
    ranks = sum(site.ranks for site in sites)
    if mode == "naive":
        configurations = 2 + 2 * _per_process(math.ceil(share * ranks), world_size)
        calls = [Pass(configurations, 1.0, rows) for rows in chunk_rows]
        passes = float(configurations * num_layers * len(chunk_rows))
        return passes, float(configurations * num_layers * sum(chunk_rows)), calls
    groups: dict[tuple[int, int], int] = {}
    for site in sites:
        key = (site.layer, site.half)
        groups[key] = groups.get(key, 0) + site.ranks
    passes = example_passes = 0.0
    calls = []
    for rows in chunk_rows:
        per_block = max(1, max_rows // rows)
        calls.append(Pass(2, 1.0, rows))  # the two prefix passes (M, and every rank off)
        chunk_passes = 2.0 * num_layers
        for (layer, half), count in sorted(groups.items()):
            mine = _per_process(math.ceil(share * count), world_size)
            if not mine:
                continue
            run = num_layers - layer - (0.5 if half == MLP else 0.0)
            blocks = _per_process(mine, per_block)
            # Both modes (M \ r and M_r), each `mine` candidates in `blocks` even blocks.
            calls.append(Pass(2 * blocks, run / num_layers, mine * rows / blocks))
            chunk_passes += 2 * mine * run
        passes += chunk_passes
        example_passes += chunk_passes * rows
    return passes, example_passes, calls


def round_cost(
    mode: str,
    sites: Sequence[ModuleSite],
    *,
    num_layers: int,
    chunk_rows: Sequence[int],
    world_size: int = 1,
    max_rows: int = 256,
    exact_ranks: int | None = None,
) -> RoundCost:
    """The work of one round scored with `mode` (naive, fast or screened) on one process.

    `sites`: every adapted module's layer, half and live ranks; `chunk_rows`: the rows of each
    chunk of B_val; `max_rows`: the fast scorer's rows per forward; `exact_ranks` (screened): the
    ranks it scores exactly first (more follow when the cut is not proven)."""
    ranks = sum(site.ranks for site in sites)
    exact = min(ranks, exact_ranks or ranks) if mode == "screened" else ranks
    share = exact / ranks if ranks else 0.0
    passes, example_passes, calls = _ablation_passes(
        "naive" if mode == "naive" else "fast",
        sites, num_layers, chunk_rows, world_size, max_rows, share,
    )  # fmt: skip
    if mode == "screened":
        # Process p takes chunks p, p + W, ... for its gradient passes (with M, then the base).
        calls = [Pass(2, 1.0, rows, backward=True) for rows in chunk_rows[0::world_size]] + calls
    return RoundCost(
        mode, ranks, exact, sum(chunk_rows), len(chunk_rows), num_layers, passes,
        example_passes, tuple(calls),
    )  # fmt: skip


def describe(cost: RoundCost, naive: RoundCost | None = None) -> str:
    """One line: what a round scores and the forwards it runs per process."""
    chunks = f"{cost.chunks} chunk{'s' if cost.chunks != 1 else ''}"
    line = f"scoring ({cost.mode}): each round scores {cost.ranks} ranks on {cost.examples} dev "
    line += f"examples ({chunks}); per process "
    if cost.mode == "screened":
        line += (
            f"{cost.gradient_passes} forward+backward passes estimate every rank, then at least "
            f"{cost.exact_ranks} are scored exactly in "
        )
    line += (
        f"{cost.forwards} forwards, the work of {cost.forward_equivalents:.1f} forwards of B_val"
    )
    if naive is not None and cost.mode != "naive":
        line += f" (naive: {naive.forward_equivalents:.1f})"
    return line


def seconds(cost: RoundCost, per_call_s: float, per_row_s: float) -> float:
    """The round's wall time on one process, when a forward through every layer takes
    `per_call_s` + `per_row_s` x rows (measured); a backward counts as another forward (the base
    is frozen: it computes input gradients only)."""
    return sum(
        p.count * p.layers * (per_call_s + per_row_s * p.rows) * (2 if p.backward else 1)
        for p in cost.passes
    )


def site_of(name: str, layer_prefixes: Mapping[str, int]) -> tuple[int, int]:
    """(layer index, half) of an adapted module from its name and the decoder layers' names."""
    for prefix, index in layer_prefixes.items():
        if name.startswith(prefix + "."):
            rest = name[len(prefix) :]
            return index, ATTENTION if ".self_attn." in rest else MLP
    raise ValueError(f"adapted module {name} is not inside a decoder layer")
