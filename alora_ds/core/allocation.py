"""Allocation rules of ALoRA's Algorithm 1 (docs/method.md section 4), as pure functions.

Input: module name -> importance score of each live rank, in rank-index order.
Output: a `RoundPlan` (plain data) saying which ranks to prune and how many to add where.

Nothing here depends on process-local state or dict order: every process of a distributed run
computes the same plan from the same scores, and ties are broken by a fixed key (module name,
then rank index).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class RoundPlan:
    """What one allocation round does to the rank map."""

    ranks_before: dict[str, int]
    pruned: list[tuple[str, int]]  # (module name, rank index), sorted by name then index
    added: dict[str, int]  # module name -> new ranks (only modules that receive some)
    ranks_after: dict[str, int]
    # Modules that lost no rank and had live ranks left, i.e. those eligible to receive.
    receivers: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        data = asdict(self)
        data["pruned"] = [list(p) for p in self.pruned]
        return data


class NonFiniteScore(ValueError):
    """An importance score is NaN or infinite: no allocation can be trusted from it."""


def check_scores(scores: Mapping[str, Sequence[float]]) -> None:
    """Refuse a round whose scores are not all finite, naming the first bad (module, rank).
    The one finiteness check of a round's scores, whatever produced them."""
    for name in sorted(scores):
        for index, value in enumerate(scores[name]):
            if not math.isfinite(value):
                raise NonFiniteScore(
                    f"the importance score of {name} rank {index} is {value}: the validation "
                    "loss with that rank switched off is not finite"
                )


def resolve_prune_count(n_prune: float, live_ranks: int) -> int:
    """n_A as a plain count (an int, paper default 7) or as a fraction of the live ranks (0 < f < 1).

    The paper's n_A = N_mod is ambiguous (docs/method.md section 4); we accept both readings.
    """
    if isinstance(n_prune, bool) or n_prune < 0:
        raise ValueError(f"ranks to prune per round must be >= 0, got {n_prune!r}")
    if isinstance(n_prune, float) and not float(n_prune).is_integer():
        if not 0.0 < n_prune < 1.0:
            raise ValueError(
                f"a fractional prune count must be in (0, 1) (a share of live ranks), "
                f"got {n_prune!r}"
            )
        return max(1, round(n_prune * live_ranks))
    count = int(n_prune)
    if count > live_ranks:
        raise ValueError(f"cannot prune {count} ranks: only {live_ranks} ranks are live")
    return count


def select_pruned(scores: Mapping[str, Sequence[float]], n_prune: int) -> list[tuple[str, int]]:
    """The n_prune lowest-scored ranks over the whole model.

    Ties are broken by (module name, rank index), never by iteration order. Returned sorted by
    module name, then rank index.
    """
    check_scores(scores)
    candidates = [
        (float(value), name, index)
        for name, values in scores.items()
        for index, value in enumerate(values)
    ]
    if n_prune > len(candidates):
        raise ValueError(f"cannot prune {n_prune} ranks: only {len(candidates)} ranks are live")
    chosen = sorted(candidates)[:n_prune]
    return sorted((name, index) for _, name, index in chosen)


def share_new_ranks(
    n_add: int, receivers: Sequence[str], mean_scores: Mapping[str, float]
) -> dict[str, int]:
    """Share n_add ranks among `receivers` as evenly as possible (paper footnote 4).

    The remainder goes one each to the receivers with the highest mean importance (ties by
    name). Example: 8 ranks over m1 > m2 > m3 gives m1: 3, m2: 3, m3: 2.
    """
    if n_add < 0:
        raise ValueError(f"cannot add a negative number of ranks ({n_add})")
    if not receivers or n_add == 0:
        return {}
    base, remainder = divmod(n_add, len(receivers))
    by_importance = sorted(receivers, key=lambda name: (-mean_scores[name], name))
    shares = {name: base + (1 if i < remainder else 0) for i, name in enumerate(by_importance)}
    return {name: shares[name] for name in sorted(receivers) if shares[name] > 0}


def parameter_count(ranks: Mapping[str, int], rank_costs: Mapping[str, int]) -> int:
    """Adapter parameters of a rank map: each rank of a module costs d_in + d_out."""
    return sum(r * rank_costs[name] for name, r in ranks.items())


def plan_round(
    scores: Mapping[str, Sequence[float]],
    n_prune: int,
    n_add: int | None = None,
    *,
    rank_costs: Mapping[str, int] | None = None,
    param_budget: int | None = None,
) -> RoundPlan:
    """One round of Algorithm 1: prune the n_prune lowest ranks, give n_add (default n_prune)
    new ranks to the modules that lost none.

    Modules with no live rank left are not receivers: they were pruned away as the least useful
    and have no score to rank them by. If every module lost a rank (or no receiver is left),
    nothing is added and the total ends below the budget, as in the paper.

    With `rank_costs` (parameters per rank of each module: d_in + d_out) and `param_budget`,
    the adapter parameter count also never exceeds the budget: a rank moved from a small module
    (k_proj) to a large one (up_proj) costs more parameters, so new ranks are withdrawn, one at
    a time from the least important receiver, until the count fits.
    """
    n_add = n_prune if n_add is None else n_add
    ranks_before = {name: len(values) for name, values in scores.items()}
    pruned = select_pruned(scores, n_prune)
    lost = {name for name, _ in pruned}
    receivers = sorted(name for name, r in ranks_before.items() if r > 0 and name not in lost)
    mean_scores = {name: math.fsum(scores[name]) / len(scores[name]) for name in receivers}
    added = share_new_ranks(n_add, receivers, mean_scores)
    ranks_after = dict(ranks_before)
    for name, _ in pruned:
        ranks_after[name] -= 1
    for name, count in added.items():
        ranks_after[name] += count
    if param_budget is not None and rank_costs is not None:
        by_priority = sorted(receivers, key=lambda name: (mean_scores[name], name))  # least first
        while parameter_count(ranks_after, rank_costs) > param_budget:
            donor = next((name for name in by_priority if added.get(name, 0) > 0), None)
            if donor is None:
                break  # nothing added is left to withdraw; pruning alone never adds parameters
            added[donor] -= 1
            ranks_after[donor] -= 1
            if added[donor] == 0:
                del added[donor]
    assert all(r >= 0 for r in ranks_after.values())
    assert sum(ranks_after.values()) <= sum(ranks_before.values()) - n_prune + n_add
    return RoundPlan(
        ranks_before=ranks_before,
        pruned=pruned,
        added=added,
        ranks_after=ranks_after,
        receivers=receivers,
    )


def pruned_by_module(pruned: Iterable[tuple[str, int]]) -> dict[str, list[int]]:
    """(module name, rank index) pairs, sorted (a plan's `pruned`) -> module name -> rank
    indices to remove, ascending."""
    out: dict[str, list[int]] = {}
    for name, index in pruned:
        out.setdefault(name, []).append(index)
    return out
