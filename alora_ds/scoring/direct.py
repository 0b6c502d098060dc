"""AB-LoRA: the importance of each rank by ablation (docs/method.md section 3).

    IS(r) = S(M) - S(M \\ r) + S(M_r)

S(.) is minus the mean cross-entropy over every supervised token of one fixed validation batch,
computed in fp32 under no_grad; M has every live rank on, M \\ r has only rank r off, M_r has
every LoRA rank of every module off except r. The gates are switches: no parameter changes.

This is the direct way (two forwards over the batch per rank), kept as the reference that faster
scorers are checked against. Plain torch: on several processes each scores its own share of the
ranks and a `gather` function the caller passes (alora_ds.runtime) brings every share together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from alora_ds.core.inject import gated_modules
from alora_ds.core.layer import GatedLoRALinear

Batch = Mapping[str, torch.Tensor]
Candidate = tuple[str, int]  # (module name, rank index)
# A scorer's progress callback: called with how many more live ranks are scored; the calls add up
# to the number of live ranks of the model (a progress bar's update).
Progress = Callable[[int], None]
# An all-gather: every process's tensor (same shape everywhere), in process order.
Gather = Callable[[torch.Tensor], list[torch.Tensor]]


@dataclass(frozen=True)
class RankScores:
    """S(M) and, per module, S(M \\ r), S(M_r) and IS(r) for every live rank in index order."""

    S_M: float
    S_base: float  # every LoRA rank off: the base model
    S_without: dict[str, list[float]]
    S_only: dict[str, list[float]]

    @property
    def importance(self) -> dict[str, list[float]]:
        return {
            name: [
                self.S_M - without + only
                for without, only in zip(self.S_without[name], self.S_only[name], strict=True)
            ]
            for name in self.S_without
        }

    def to_json(self) -> dict:
        importance = self.importance
        return {
            "S_M": self.S_M,
            "S_base": self.S_base,
            "modules": {
                name: {
                    "S_without": self.S_without[name],
                    "S_only": self.S_only[name],
                    "importance": importance[name],
                }
                for name in self.S_without
            },
        }


@contextmanager
def preserved_gates(modules: Mapping[str, GatedLoRALinear]) -> Iterator[None]:
    """Restore every gate buffer on exit, whatever happens inside (an exception half-way through
    scoring must not leave a rank switched off)."""
    saved = {name: module.lora_gate.clone() for name, module in modules.items()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, module in modules.items():
                module.lora_gate.copy_(saved[name])


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluation mode (no dropout) for the duration; the previous mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def supervised_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Sum of next-token cross-entropy in fp32 over positions whose label is not -100, and their
    count (the standard causal shift: the logits at t predict the label at t + 1)."""
    logits = logits[:, :-1].float()  # (B, T-1, V)
    targets = labels[:, 1:]  # (B, T-1)
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return float(loss), int((targets != -100).sum())


@torch.no_grad()
def supervised_loss_totals(model: nn.Module, batches: Sequence[Batch]) -> tuple[float, int]:
    """Summed fp32 cross-entropy and supervised-token count over all batches (no_grad)."""
    total, count = 0.0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_sum, tokens = supervised_loss_sum(logits, batch["labels"])
        total += loss_sum
        count += tokens
    return total, count


def validation_score(model: nn.Module, batches: Sequence[Batch]) -> float:
    """S = minus the mean cross-entropy over all supervised tokens of all batches (fp32).

    The mean is per token over the whole validation set, not per batch, so how the set is cut
    into micro-batches does not change the score.
    """
    total, count = supervised_loss_totals(model, batches)
    if count == 0:
        raise ValueError("the validation batch has no supervised token (every label is -100)")
    return -total / count


def all_candidates(modules: Mapping[str, GatedLoRALinear]) -> list[Candidate]:
    """Every live rank, in model order then rank index."""
    return [(name, index) for name, module in modules.items() for index in range(module.r)]


class CandidateProgress:
    """Turns the work units a scorer has finished into live ranks scored, for a `Progress`
    callback.

    On several processes each one works through its own share of the candidates in lockstep
    with the others (ZeRO-3 forwards are collective), so the fraction of its own units a
    process has done is the fraction of the round done: each process reports
    `num_candidates * done // units`, and the calls add up to exactly `num_candidates`.
    """

    def __init__(self, callback: Progress | None, units: int, num_candidates: int) -> None:
        self.callback = callback
        self.units = units
        self.num_candidates = num_candidates
        self.done = 0
        self.reported = 0

    def advance(self, units: int = 1) -> None:
        if self.callback is None or self.units == 0:
            return
        self.done += units
        scored = self.num_candidates * min(self.done, self.units) // self.units
        if scored > self.reported:
            self.callback(scored - self.reported)
            self.reported = scored


@torch.no_grad()
def ablation_scores(
    model: nn.Module,
    batches: Sequence[Batch],
    candidates: Sequence[Candidate | None],
    progress: Progress | None = None,
) -> list[tuple[float, float]]:
    """(S(M \\ r), S(M_r)) for each candidate, the direct way (two forwards over the batches each).

    A `None` candidate runs the same forwards with nothing switched: distributed callers pad their
    share with it so every process runs the same number of forwards in lockstep. `progress` is
    called as the ablations finish, with counts that add up to the model's number of live ranks
    (see CandidateProgress: a share's progress stands for the whole round's).
    """
    modules = gated_modules(model)
    counter = CandidateProgress(progress, 2 * len(candidates), len(all_candidates(modules)))
    results_without: list[float] = []
    results_only: list[float] = []
    with eval_mode(model), preserved_gates(modules):
        for candidate in candidates:  # M \ r: all live ranks on, one off
            if candidate is not None:
                modules[candidate[0]].lora_gate[candidate[1]] = 0
            results_without.append(validation_score(model, batches))
            if candidate is not None:
                modules[candidate[0]].lora_gate[candidate[1]] = 1
            counter.advance()
        for module in modules.values():  # M_r: every LoRA rank off, one on
            module.lora_gate.zero_()
        for candidate in candidates:
            if candidate is not None:
                modules[candidate[0]].lora_gate[candidate[1]] = 1
            results_only.append(validation_score(model, batches))
            if candidate is not None:
                modules[candidate[0]].lora_gate[candidate[1]] = 0
            counter.advance()
    return list(zip(results_without, results_only, strict=True))


@torch.no_grad()
def reference_scores(model: nn.Module, batches: Sequence[Batch]) -> tuple[float, float]:
    """(S(M), S(base)): every live rank on, then every LoRA rank off."""
    modules = gated_modules(model)
    with eval_mode(model), preserved_gates(modules):
        s_m = validation_score(model, batches)
        for module in modules.values():
            module.lora_gate.zero_()
        s_base = validation_score(model, batches)
    return s_m, s_base


def assemble_scores(
    modules: Mapping[str, GatedLoRALinear],
    s_m: float,
    s_base: float,
    candidates: Sequence[Candidate],
    results: Sequence[tuple[float, float]],
) -> RankScores:
    """Put per-candidate results back into per-module lists in rank-index order; every live
    rank must have exactly one result. Whether the values are finite is the round's check
    (alora_ds.core.allocation.check_scores), which names the module and rank."""
    s_without: dict[str, list] = {name: [None] * module.r for name, module in modules.items()}
    s_only: dict[str, list] = {name: [None] * module.r for name, module in modules.items()}
    for (name, index), (without, only) in zip(candidates, results, strict=True):
        s_without[name][index] = without
        s_only[name][index] = only
    missing = [(n, i) for n, values in s_without.items() for i, v in enumerate(values) if v is None]
    if missing:
        raise ValueError(f"AB-LoRA: no score was computed for {missing[0][0]} rank {missing[0][1]}")
    return RankScores(S_M=s_m, S_base=s_base, S_without=s_without, S_only=s_only)


def shared_ab_lora_scores(
    model: nn.Module,
    batches: Sequence[Batch],
    *,
    rank: int,
    world_size: int,
    gather: Gather,
    progress: Progress | None = None,
) -> RankScores:
    """The direct way with the ablations shared out over processes: process p takes candidates
    p, p + W, p + 2W, ..., padded with no-op candidates so every process runs the same forwards
    (ZeRO-3 forwards are collective); `gather` brings every process's (S(M \\ r), S(M_r))
    pairs together, so every process ends with every score."""
    modules = gated_modules(model)
    candidates = all_candidates(modules)
    per_process = -(-len(candidates) // world_size)
    share: list[Candidate | None] = list(candidates[rank::world_size])
    share += [None] * (per_process - len(share))
    s_m, s_base = reference_scores(model, batches)
    mine = torch.tensor(ablation_scores(model, batches, share, progress), dtype=torch.float64)
    everyone = gather(mine.reshape(per_process, 2))  # world x (per_process, 2)
    results = [
        tuple(everyone[i % world_size][i // world_size].tolist()) for i in range(len(candidates))
    ]
    return assemble_scores(modules, s_m, s_base, candidates, results)


def ab_lora_scores(
    model: nn.Module, batches: Sequence[Batch], progress: Progress | None = None
) -> RankScores:
    """AB-LoRA scores of every live rank of every gated module, on one process, the direct way.

    `progress(n)`: n more ranks scored (the calls add up to the number of live ranks)."""
    if not gated_modules(model):
        raise ValueError("the model has no gated LoRA module to score")
    return shared_ab_lora_scores(
        model, batches, rank=0, world_size=1, gather=lambda t: [t], progress=progress
    )
