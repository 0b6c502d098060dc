"""Screened AB-LoRA: every rank estimated from two gradient passes, exact ablation only where a
score decides something (docs/method.md section 3).

A round of Algorithm 1 needs exact scores only for the ranks it prunes (the n lowest) and for
the module means that place the remainder of the new ranks (footnote 4). Everything else only
has to be known to lie on the right side of those cuts. So:

1. Estimate IS(r) for every live rank from the gates' gradients, with one backward over B_val
   with every live rank on (M) and one with every rank off (the base):

       S(M) - S(M \\ r) ~ g_r dS/dg_r |M            (g_r: the rank's gate, 1 when live)
       S(M_r) - S(base) ~ g_r dS/dg_r |off
       first order:   IS(r) ~ g_r (dS/dg_r|M + dS/dg_r|off) + S(base)
       with Fisher:   + g_r^2 (F_rr|M - F_rr|off) / 2,  F_rr = sum_e (dL_e/dg_r)^2 / tokens

   Each example row has its own gate vector (GatedLoRALinear.row_gates), so one backward gives
   every example's gradient, which the Fisher term needs.
2. Score exactly (the fast path) the `candidates` ranks with the lowest estimates.
3. Widen until the cut is proven: with tau the highest exact score among the n pruned and
   `error` the largest difference between any exactly scored rank's estimate and its exact
   score (either way: a rank whose error was one way may have the other), a rank still
   estimated at e can only fall below the cut if e - error <= tau; while one can, the exact set
   doubles (the next lowest estimates).
4. Where the remainder of the new ranks goes by module means, the receivers that decide that
   cut are scored exactly, then every module whose estimated mean could fall on either side of
   it (within the largest error of an estimated module mean seen so far).

The plan made from the mixed scores is then the exact plan whenever no estimate is off by more
than the largest error seen among the ranks (and module means) checked. Plain torch: the caller passes the
collectives (`all_reduce`, `gather`), so every process computes the same estimates and sets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from alora_ds.core.allocation import select_pruned
from alora_ds.core.inject import gated_modules
from alora_ds.scoring.direct import (
    Batch,
    Candidate,
    Gather,
    Progress,
    all_candidates,
    eval_mode,
)
from alora_ds.scoring.fast import LlamaStack, ScoringStats, fast_candidate_scores

# Sums a float64 tensor over the processes (every process ends with the same values).
AllReduce = Callable[[torch.Tensor], torch.Tensor]
ESTIMATORS: tuple[str, ...] = ("first-order", "fisher")


def first_candidates(candidates: int, n_prune: int) -> int:
    """How many of the lowest estimates are scored exactly first: `candidates`, or (0) the n_A
    ranks the round prunes. Measured on SmolLM2's 1,680 ranks (bench/overhead.py), 4 x n_A cost
    2.8x the round of n_A, and neither widened: the widening rule, not a wide first set, is what
    proves the cut."""
    return max(candidates or n_prune, n_prune, 1)


@dataclass
class GateGradients:
    """What the two gradient passes measure, summed over every supervised token of B_val."""

    s_m: float  # S(M)
    s_base: float  # S(base), every LoRA rank off
    grad_on: dict[str, torch.Tensor]  # dS/dg per rank at M, (r,) per module
    grad_off: dict[str, torch.Tensor]  # dS/dg per rank with every rank off
    fisher_on: dict[str, torch.Tensor]  # sum_e (dL_e/dg)^2 / tokens at M
    fisher_off: dict[str, torch.Tensor]
    gates: dict[str, torch.Tensor]  # the live gate values g_r

    def estimates(self, estimator: str = "first-order") -> dict[str, list[float]]:
        """IS(r) estimated for every live rank, module -> list in rank-index order."""
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator {estimator!r} is not one of {', '.join(ESTIMATORS)}")
        out = {}
        for name, g in self.gates.items():
            value = g * (self.grad_on[name] + self.grad_off[name]) + self.s_base
            if estimator == "fisher":
                value = value + 0.5 * g * g * (self.fisher_on[name] - self.fisher_off[name])
            out[name] = value.tolist()
        return out


def gate_gradients(
    model: nn.Module,
    batches: Sequence[Batch],
    *,
    rank: int = 0,
    world_size: int = 1,
    all_reduce: AllReduce | None = None,
    start_of_pass: Callable[[], None] | None = None,
) -> GateGradients:
    """The gates' first derivatives (and per-example squares) at M and with every rank off.

    The chunks of B_val are shared out over the processes (process p takes chunks p, p + W,
    ...; shares padded with chunks that supervise nothing, since ZeRO-3 forwards and backwards
    are collective) and the sums all-reduced. Only the gates receive gradients: no parameter's
    gradient is computed, so the optimizer state is untouched.
    """
    start_of_pass = start_of_pass or (lambda: None)
    stack = LlamaStack(model)
    modules = {n: m for n, m in gated_modules(model).items() if m.r > 0}
    names = list(modules)
    mine: list[tuple[Batch, bool]] = [(b, True) for b in batches[rank::world_size]]
    per_process = -(-len(batches) // world_size)
    mine += [(batches[0], False)] * (per_process - len(mine))  # no supervision: zero gradient
    saved = {name: m.lora_gate.detach().clone() for name, m in modules.items()}
    width = sum(m.r for m in modules.values())
    # One flat float64 vector per pass, all-reduced at once: [loss, tokens, grads, squares].
    sums = torch.zeros(2, 2 + 2 * width, dtype=torch.float64)
    with eval_mode(model), torch.enable_grad():
        try:
            for on in (True, False):
                for batch, counts in mine:
                    start_of_pass()
                    labels = batch["labels"] if counts else torch.full_like(batch["labels"], -100)
                    rows = labels.shape[0]
                    gates = {
                        name: (saved[name] if on else torch.zeros_like(saved[name]))
                        .float().expand(rows, -1).clone().requires_grad_(True)
                        for name in names
                    }  # fmt: skip
                    for name, module in modules.items():
                        module.row_gates = gates[name]  # (N, r): every example its own gates
                    ctx = stack.context(batch)
                    h = ctx["embeds"]
                    for layer in stack.layers:
                        h = stack.mlp_half(layer, stack.attention_half(layer, h, ctx, 1))
                    per_row = stack.loss_sums(h, labels)  # (N,) summed token losses
                    grads = torch.autograd.grad(per_row.sum(), [gates[n] for n in names])
                    per_example = torch.cat([g.double() for g in grads], dim=1)  # (N, width)
                    row = sums[0 if on else 1]
                    row[0] += per_row.detach().sum().cpu()
                    row[1] += int((labels[:, 1:] != -100).sum())
                    row[2 : 2 + width] -= per_example.sum(0).cpu()  # dS = -dL
                    row[2 + width :] += per_example.square().sum(0).cpu()
        finally:
            for module in modules.values():
                module.row_gates = None
    if all_reduce is not None:
        sums = all_reduce(sums)
    tokens = float(sums[0, 1])
    if tokens == 0:
        raise ValueError("the validation batch has no supervised token (every label is -100)")

    def split(values: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(values / tokens, [modules[n].r for n in names])
        return dict(zip(names, parts, strict=True))

    return GateGradients(
        s_m=-float(sums[0, 0]) / tokens,
        s_base=-float(sums[1, 0]) / tokens,
        grad_on=split(sums[0, 2 : 2 + width]),
        grad_off=split(sums[1, 2 : 2 + width]),
        fisher_on=split(sums[0, 2 + width :]),
        fisher_off=split(sums[1, 2 + width :]),
        gates={name: saved[name].double().cpu() for name in names},
    )


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks of `values`, ties sharing the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho (Pearson correlation of average ranks). None when either side is constant
    (the correlation is undefined) or has fewer than 2 values."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs equal lengths, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    mx, my = math.fsum(rx) / len(rx), math.fsum(ry) / len(ry)
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = math.fsum((a - mx) ** 2 for a in rx)
    syy = math.fsum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


@dataclass
class ScreenedScores:
    """A screened round's scores: exact where they decide the plan, estimated elsewhere."""

    S_M: float
    S_base: float
    importance: dict[str, list[float]]  # exact where `exact`, else the estimate
    estimates: dict[str, list[float]]
    exact: dict[str, list[bool]]
    record: dict = field(default_factory=dict)  # what the round file says about the screening

    def to_json(self) -> dict:
        """`python -m alora_ds.score`'s output: RankScores.to_json's layout, with S_without /
        S_only (known only where a rank was scored exactly) replaced by the exact flags and the
        estimates."""
        return {
            "S_M": self.S_M,
            "S_base": self.S_base,
            "screening": self.record,
            "modules": {
                name: {
                    "importance": self.importance[name],
                    "exact": self.exact[name],
                    "estimate": self.estimates[name],
                }
                for name in self.importance
            },
        }

    def to_round_fields(self) -> dict:
        return {"exact": self.exact, "estimates": self.estimates, "screening": self.record}


def _to_modules(values: Mapping[Candidate, float], template: Mapping[str, list]) -> dict:
    return {name: [values[(name, i)] for i in range(len(v))] for name, v in template.items()}


def screened_scores(
    model: nn.Module,
    batches: Sequence[Batch],
    n_prune: int,
    *,
    n_add: int | None = None,
    candidates: int = 0,
    estimator: str = "first-order",
    max_rows: int = 256,
    rank: int = 0,
    world_size: int = 1,
    gather: Gather | None = None,
    all_reduce: AllReduce | None = None,
    start_of_pass: Callable[[], None] | None = None,
    progress: Progress | None = None,
    stats: ScoringStats | None = None,
    exact_means: bool = False,
) -> ScreenedScores:
    """Screened AB-LoRA scores for a round that prunes `n_prune` ranks and shares `n_add`
    (default n_prune) among the modules that lost none; `candidates` ranks (default n_prune)
    are scored exactly first, more as the rules above require. `exact_means=True` also scores
    exactly the receivers whose means place the remainder of the new ranks. Every
    process must call it with the same batches and ends with the same scores and sets."""
    n_add = n_prune if n_add is None else n_add
    modules = gated_modules(model)
    live = all_candidates(modules)
    grads = gate_gradients(
        model, batches, rank=rank, world_size=world_size, all_reduce=all_reduce,
        start_of_pass=start_of_pass,
    )  # fmt: skip
    estimates = {name: [] for name in modules} | grads.estimates(estimator)
    estimate = {(n, i): v for n, values in estimates.items() for i, v in enumerate(values)}
    order = sorted(live, key=lambda c: (estimate[c], c))
    exact: dict[Candidate, tuple[float, float]] = {}
    s_m = s_base = None
    first = min(len(live), first_candidates(candidates, n_prune))
    want = order[:first]
    widenings = calls = 0
    mean_checks: list[str] = []
    for_means: set[Candidate] = set()  # scored only because a module mean was undecided
    while True:
        new = [c for c in want if c not in exact]
        if new:
            s_m, s_base, found = fast_candidate_scores(
                model, batches, new, max_rows=max_rows, rank=rank, world_size=world_size,
                gather=gather, stats=stats, start_of_pass=start_of_pass,
            )  # fmt: skip
            exact.update(found)
            calls += 1
        # IS(r) = S(M) - S(M \ r) + S(M_r) where scored exactly, else the estimate.
        value = {c: s_m - exact[c][0] + exact[c][1] if c in exact else estimate[c] for c in live}
        # The prune cut's error is calibrated on the ranks scored for that cut: the modules
        # scored for their means are the most important ones, whose first-order errors are
        # larger and say nothing about ranks near the low cut (counting them widened every
        # round they joined, on SmolLM2 from 28 exact ranks to 184).
        largest = max([0.0, *(abs(estimate[c] - value[c]) for c in exact if c not in for_means)])
        pruned = select_pruned(_to_modules(value, estimates), n_prune) if n_prune else []
        need = [c for c in pruned if c not in exact]  # never: the lowest estimates are exact
        cut = max((value[c] for c in pruned), default=-math.inf)
        waiting = [c for c in order if c not in exact]
        if not need and waiting and estimate[waiting[0]] - largest <= cut:
            widenings += 1
            need = waiting[: max(len(exact) - len(for_means), 1)]  # double the cut's exact set
        if not need and exact_means:
            undecided = _undecided_modules(value, estimate, estimates, exact, pruned, n_add)
            mean_checks += undecided
            need = [(n, i) for n in undecided for i in range(len(estimates[n]))]
            for_means.update(c for c in need if c not in exact)
        if not need:
            break
        want = list(exact) + need
    if progress is not None:
        progress(len(live))
    importance = _to_modules(value, estimates)
    flags = {name: [(name, i) in exact for i in range(len(v))] for name, v in estimates.items()}
    checked = sorted(exact)
    record = {
        "estimator": estimator,
        "candidates": first,
        "widenings": widenings,
        "exact_ranks": len(exact),
        "live_ranks": len(live),
        "exact_passes": calls,
        "exact_means": exact_means,
        "modules_scored_for_means": mean_checks,
        "largest_error": largest,
        "spearman": spearman([estimate[c] for c in checked], [value[c] for c in checked]),
    }
    return ScreenedScores(s_m, s_base, importance, estimates, flags, record)


def _undecided_modules(
    value: Mapping[Candidate, float],
    estimate: Mapping[Candidate, float],
    template: Mapping[str, list],
    exact: Mapping[Candidate, object],
    pruned: Sequence[Candidate],
    n_add: int,
) -> list[str]:
    """Receivers whose mean importance could fall on either side of the remainder's cut
    (footnote 4: the remainder of the new ranks goes to the receivers with the highest means)
    and that still hold estimated ranks.

    How far an estimated mean may be off is calibrated on the receivers already scored exactly:
    the largest difference between their estimated and exact means. First-order estimates are
    worst for the most important modules, which sit at this cut, so until some of the receivers
    that decide the cut (the top remainder + 1 by mean) are exact, those are scored first."""
    lost = {name for name, _ in pruned}
    receivers = sorted(n for n, v in template.items() if v and n not in lost)
    remainder = n_add % len(receivers) if receivers else 0
    if remainder == 0:
        return []

    def mean(source: Mapping[Candidate, float], name: str) -> float:
        return math.fsum(source[(name, i)] for i in range(len(template[name]))) / len(
            template[name]
        )

    def is_exact(name: str) -> bool:
        return all((name, i) in exact for i in range(len(template[name])))

    means = {n: mean(value, n) for n in receivers}
    ranked = sorted(receivers, key=lambda n: (-means[n], n))
    deciding = ranked[: remainder + 1]
    if not any(is_exact(n) for n in deciding):
        return [n for n in deciding if not is_exact(n)]
    error = max(abs(mean(estimate, n) - means[n]) for n in receivers if is_exact(n))
    cut = (means[ranked[remainder - 1]] + means[ranked[remainder]]) / 2
    return [n for n in receivers if not is_exact(n) and abs(means[n] - cut) <= error]
