"""The one interface every fine-tuning method implements, with no-op defaults.

The trainer (launch/train.py) runs the same loop for every method and asks the method only what
differs:

    start:       gate_kind, start_budget, schedule_rounds, data_pools, setup
    every step:  step_part -> forward / backward -> after_backward -> optimizer step -> after_step
    a round:     round_scores -> (the trainer: check, plan, rebuild) -> after_rebuild
    the end:     final_prune -> (the trainer: rebuild)
    checkpoints: state_tensors / load_state_tensors

A method never touches DeepSpeed or torch.distributed: what it reads or writes on the running
model goes through `Adapters` (alora_ds.runtime.Engine implements it), which does the collectives.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch

from alora_ds.core.allocation import select_pruned
from alora_ds.core.layer import GateKind
from alora_ds.core.schedule import Schedule
from alora_ds.scoring.direct import Batch, Progress, RankScores
from alora_ds.scoring.screened import ScreenedScores

# What a step trains: everything (None), only A and B ("weights") or only the gates ("gates").
TrainedPart = str | None
ValuesAndGrads = dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]


class Adapters(Protocol):
    """What a method may read and write on the running model (collective under ZeRO: every
    process calls the same methods in the same order, which the one loop guarantees)."""

    def rank_map(self) -> dict[str, int]: ...

    def gate_values(self) -> dict[str, list[float]]: ...

    def set_gate_values(self, gates: Mapping[str, Sequence[float]]) -> None: ...

    def map_gate_logits(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None: ...

    def values_and_grads(self) -> ValuesAndGrads: ...

    def ab_lora_scores(
        self,
        batches: Sequence[Batch],
        *,
        mode: str = "fast",
        max_rows: int = 0,
        progress: Progress | None = None,
    ) -> RankScores: ...

    def screened_scores(
        self,
        batches: Sequence[Batch],
        n_prune: int,
        *,
        candidates: int = 0,
        max_rows: int = 0,
        progress: Progress | None = None,
        exact_means: bool = False,
    ) -> ScreenedScores: ...


@dataclass(frozen=True)
class MethodSettings:
    """The options methods read, as plain typed values (the trainer builds them from its
    configuration; no method sees the configuration object)."""

    seed: int = 42
    num_rounds: int = 8  # N_A
    prune_per_round: float = 7  # n_A: a count, or a fraction of the live ranks
    sora_lambda: float = 0.1
    val_examples: int = 32  # |B_val|
    scoring: str = "fast"  # naive, fast or screened
    scoring_batch_size: int = 8
    scoring_max_rows: int = 0
    screen_candidates: int = 0  # screened: ranks scored exactly first (0: n_A)
    screen_verify: bool = False  # screened: also score every rank exactly and compare
    screen_exact_means: bool = False  # screened: footnote 4's module means exact where they decide


@dataclass(frozen=True)
class StepPart:
    """What one optimizer step does: which data pool it reads, the step's index in that pool's
    own sequence of steps, and which part of the adapters it trains."""

    pool: int
    pool_step: int
    trains: TrainedPart = None


@dataclass(frozen=True)
class RoundInputs:
    """What a round's scoring may use."""

    round_index: int  # 1-based
    adapters: Adapters
    dev_examples: Sequence[dict]  # tokenized development examples (B_val is drawn from them)
    pad_id: int
    device: torch.device
    # A progress display over n ranks: a context manager yielding a Progress callback.
    progress: Callable[[int], AbstractContextManager[Progress]]


@dataclass(frozen=True)
class RoundScores:
    """A round's importance of every live rank (module -> one score per rank, in index order),
    S(M) where the scores come from ablations (None otherwise), and what else the round file
    should record about how they were computed."""

    importance: dict[str, list[float]]
    s_m: float | None = None
    extra: dict = field(default_factory=dict)
    note: str = ""  # for the round's log line


@dataclass(frozen=True)
class FinalPrune:
    """What a method prunes after training to end at the budget: the gate values it decided on,
    and the (module, rank) pairs removed."""

    gates: dict[str, list[float]]
    pruned: list[tuple[str, int]]

    @property
    def zero_gates(self) -> int:
        return sum(g == 0 for values in self.gates.values() for g in values)


class Method:
    """A fine-tuning method at a rank budget. Subclasses set the class attributes and override
    the hooks that differ; every default does nothing."""

    name: ClassVar[str]
    gate_kind: ClassVar[GateKind] = GateKind.HARD
    # The method starts at start_factor x the rank budget (SoRA and AdaLoRA start at twice it).
    start_factor: ClassVar[int] = 1
    # Whether it runs Algorithm 1's rounds: scores -> prune and add -> rebuild.
    allocates: ClassVar[bool] = False
    # Whether its round scores are AB-LoRA ablations (--scoring decides how they are run).
    scores_by_ablation: ClassVar[bool] = False

    def __init__(self, settings: MethodSettings) -> None:
        self.settings = settings

    # ---- start --------------------------------------------------------------------------

    def check(self) -> None:
        """Refuse settings this method cannot run with (an InputError naming the option)."""

    def start_budget(self, rank_budget: int) -> int:
        return self.start_factor * rank_budget

    @property
    def fits_budget_while_training(self) -> bool:
        """Whether the adapters are within the budget at every step, so a mid-run adapter (the
        best dev loss) can be exported; methods that start above it fit only after final_prune."""
        return self.start_factor == 1

    def schedule_rounds(self) -> int:
        """Round boundaries the schedule places after K1 (every K2 steps)."""
        return self.settings.num_rounds if self.allocates else 0

    def data_pools(self, num_examples: int) -> tuple[list[int], ...]:
        """The training examples each kind of step reads: one pool of all of them."""
        return (list(range(num_examples)),)

    def setup(self, module_names: Sequence[str], r_init: int, schedule: Schedule) -> None:
        """Called once the adapters exist, before the first step."""

    # ---- every step -------------------------------------------------------------------------

    def step_part(self, step: int) -> StepPart:
        """What 0-based optimizer step `step` does: every step reads the one pool, trains all."""
        return StepPart(pool=0, pool_step=step)

    def after_backward(self, step: int, adapters: Adapters) -> None:
        """After the backward of step `step`'s last micro-batch (1-based), before the optimizer
        step: the only moment the step's whole gradient exists."""

    def after_step(self, step: int, lr: float, adapters: Adapters) -> None:
        """After optimizer step `step` (1-based) was taken at learning rate `lr`."""

    # ---- rounds and the end -------------------------------------------------------------------

    def round_scores(self, inputs: RoundInputs) -> RoundScores:
        """The importance of every live rank for a round (methods that allocate)."""
        raise NotImplementedError(f"{self.name} runs no allocation rounds")

    def after_rebuild(self, pruned: Mapping[str, Sequence[int]], added: Mapping[str, int]) -> None:
        """Follow a round's rank surgery in the method's own per-rank state."""

    def final_prune(self, adapters: Adapters, rank_budget: int) -> FinalPrune | None:
        """What to prune after training so the adapters end at the budget (None: nothing)."""
        return None

    # ---- checkpoints --------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The method's own state a checkpoint must carry, as flat tensors."""
        return {}

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore state_tensors() from a checkpoint's tensors (which hold other entries too)."""


def prune_smallest_gates(gates: Mapping[str, list[float]], rank_budget: int) -> FinalPrune:
    """Keep the `rank_budget` ranks with the largest |g|; gates at exactly zero go whatever the
    budget (ties by module name, then rank index)."""
    magnitude = {name: [abs(g) for g in values] for name, values in gates.items()}
    live = sum(len(v) for v in magnitude.values())
    zeros = sum(g == 0 for values in gates.values() for g in values)
    return FinalPrune(dict(gates), select_pruned(magnitude, max(live - rank_budget, zeros)))
