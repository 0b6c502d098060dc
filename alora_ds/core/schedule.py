"""The step arithmetic of a run, as pure functions: epochs to steps, round boundaries, the
learning rate at each step, and which examples each process reads."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from alora_ds.errors import InputError


@dataclass(frozen=True)
class Schedule:
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    round_after: tuple[int, ...]  # round i + 1 runs after this many optimizer steps

    def lr_at(self, step: int, peak: float) -> float:
        """Learning rate for optimizer step `step` (0-based): linear warm-up, linear decay to 0."""
        if step < self.warmup_steps:
            return peak * (step + 1) / self.warmup_steps
        remaining = self.total_steps - self.warmup_steps
        return peak * max(0.0, (self.total_steps - step) / max(remaining, 1))

    @property
    def last_round_step(self) -> int:
        return self.round_after[-1] if self.round_after else 0


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    return max(1, round(epochs * steps_per_epoch)) if epochs > 0 else 0


def make_schedule(
    num_examples: int,
    global_batch: int,
    *,
    num_train_epochs: float,
    max_steps: int,
    warmup_ratio: float,
    num_rounds: int,
    initial_epochs: float,
    round_epochs: float,
    initial_steps: int = 0,
    round_steps: int = 0,
) -> Schedule:
    """Algorithm 1's timeline: K1 steps, then a round every K2 steps, N_A times; the rest of the
    training follows. Epochs may be fractional; steps override them when given."""
    if num_examples < global_batch:
        raise InputError(
            f"the training split has {num_examples} examples, fewer than one global batch of "
            f"{global_batch}: lower the batch size or add data"
        )
    steps_per_epoch = num_examples // global_batch
    total = max_steps if max_steps > 0 else math.ceil(num_train_epochs * steps_per_epoch)
    k1 = initial_steps if initial_steps > 0 else epochs_to_steps(initial_epochs, steps_per_epoch)
    k2 = round_steps if round_steps > 0 else max(1, epochs_to_steps(round_epochs, steps_per_epoch))
    rounds = tuple(k1 + i * k2 for i in range(num_rounds)) if num_rounds > 0 else ()
    if rounds and rounds[-1] > total:
        raise InputError(
            f"the rounds need {rounds[-1]} optimizer steps (K1 = {k1} + {num_rounds - 1} x K2 = "
            f"{k2}) but the run has only {total}: raise --num_train_epochs or --max_steps, or "
            "lower --num_rounds"
        )
    return Schedule(
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=math.ceil(warmup_ratio * total),
        round_after=rounds,
    )


def micro_batch_indices(
    num_examples: int,
    *,
    seed: int,
    step: int,
    steps_per_epoch: int,
    micro_batch: int,
    accumulation: int,
    world_size: int,
    rank: int,
) -> list[list[int]]:
    """Example indices of this process's micro-batches for one optimizer step.

    Each epoch is a fresh permutation seeded by (seed, epoch); the step's global batch is cut
    into accumulation x world micro-batches, micro-batch j of process r being number
    j * world + r. Pure: any process can recompute any step (resume needs nothing else).
    """
    epoch, within = divmod(step, steps_per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_examples, generator=generator).tolist()
    global_batch = micro_batch * accumulation * world_size
    batch = order[within * global_batch : (within + 1) * global_batch]
    return [
        batch[(j * world_size + rank) * micro_batch : (j * world_size + rank + 1) * micro_batch]
        for j in range(accumulation)
    ]


def draw_validation_indices(
    num_examples: int, count: int, *, seed: int, round_index: int
) -> list[int]:
    """B_val for one round: `count` dev examples drawn with a generator seeded by (seed, round),
    the same on every process, in ascending order."""
    count = min(count, num_examples)
    generator = torch.Generator().manual_seed(seed * 7_919 + round_index)
    return sorted(torch.randperm(num_examples, generator=generator)[:count].tolist())


def bilevel_split(num_examples: int, seed: int) -> tuple[list[int], list[int]]:
    """ALoRA-DNAS's two disjoint halves of the training set (docs/method.md section 5): D1 trains
    the adapter weights, D2 the gate logits. A seeded permutation, cut in two, each half sorted."""
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[0::2]), sorted(order[1::2])
