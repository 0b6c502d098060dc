"""Faults the tests inject into a real training run, through one environment variable:

    ALORA_DS_TEST_FAULT=<kind>@<point>:<n>[@<rank>]

- `kill@step:N`, `raise@step:N`: SIGKILL (a lost node) or an exception, after optimizer step N;
- `kill@scoring:N`, `raise@scoring:N`: when round N's scores are computed, nothing applied yet;
- `kill@save:N`: half-way through writing the checkpoint of step N (its first file written);
- `disk@save:N`: files cannot grow past 4 KB while the checkpoint of step N is written, so the
  write fails with a real OSError (EFBIG), as on a full disk;
- `nan@step:N`: the loss of step N is not finite;
- `corrupt@round:N`: this process's rebuilt adapters are perturbed after round N, before the
  processes prove that they agree;
- `run@step:N`, `run@scoring:N`: run the command line in ALORA_DS_TEST_FAULT_RUN (no shell) there and go
  on (e.g. `ip link set eth0 down`: the node's network is cut while the process lives on);

on every process, or only on process `rank`. With ALORA_DS_TEST_FAULT_ONCE=PATH a fault fires
at most once: firing creates PATH, and a launch that finds PATH arms nothing (a requeued Slurm
job is started again with the environment that asked for the fault). Nothing here is part of
the library: the trainer calls these hooks, which do nothing when no fault is asked for.
"""

from __future__ import annotations

import os
import resource
import shlex
import signal
import subprocess
from dataclasses import dataclass

import torch

from alora_ds.io import checkpoint
from alora_ds.runtime.engine import Engine

FAULT_ENV = "ALORA_DS_TEST_FAULT"
RUN_ENV = "ALORA_DS_TEST_FAULT_RUN"
ONCE_ENV = "ALORA_DS_TEST_FAULT_ONCE"


@dataclass(frozen=True)
class Faults:
    """The injected fault, if any, as seen by process `rank`."""

    kind: str | None = None
    point: str | None = None
    at: int = -1
    only_rank: int | None = None
    rank: int = 0

    @staticmethod
    def from_env(rank: int) -> Faults:
        text = os.environ.get(FAULT_ENV)
        once = os.environ.get(ONCE_ENV)
        if not text or (once and os.path.exists(once)):
            return Faults(rank=rank)
        kind, where, *only = text.split("@")
        point, at = where.split(":")
        return Faults(kind, point, int(at), int(only[0]) if only else None, rank)

    def hits(self, kind: str, point: str, at: int) -> bool:
        """Whether the fault is due here; one that is, is spent (see ALORA_DS_TEST_FAULT_ONCE)."""
        due = (self.kind, self.point, self.at) == (kind, point, at) and self.only_rank in (
            None,
            self.rank,
        )
        if due and os.environ.get(ONCE_ENV):
            open(os.environ[ONCE_ENV], "a").close()
        return due

    def fire(self, point: str, at: int) -> None:
        """A `kill`, `raise` or `run` fault due at (point, at)."""
        if self.hits("run", point, at):
            subprocess.run(shlex.split(os.environ[RUN_ENV]), check=True)  # a command line, no shell
        if self.hits("kill", point, at):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.hits("raise", point, at):
            raise RuntimeError(f"injected fault at {point} {at} on process {self.rank}")

    def poison(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """The loss of step `step` (1-based), made NaN when a `nan` fault is due."""
        return loss * float("nan") if self.hits("nan", "step", step) else loss

    def before_save(self, step: int) -> None:
        """Arm a `disk` or `kill` fault for the checkpoint of step `step`."""
        if self.hits("disk", "save", step):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an OSError, not a signal
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        if self.hits("kill", "save", step):
            save = checkpoint.save_tensors

            def save_then_die(tensors, path) -> None:
                save(tensors, path)
                os.kill(os.getpid(), signal.SIGKILL)

            checkpoint.save_tensors = save_then_die

    def watch(self, engine: Engine) -> None:
        """Arm a `corrupt` fault on the engine's rebuilds."""
        if self.kind != "corrupt" or self.only_rank not in (None, self.rank):
            return
        planned = engine.planned_states

        def corrupted(*args, round_index: int, **kwargs):
            states = planned(*args, round_index=round_index, **kwargs)
            if round_index == self.at:
                next(iter(states.values())).values["lora_A"].add_(1.0)
            return states

        engine.planned_states = corrupted
