"""A plain gloo process group for data-parallel evaluation (eval/): each process generates for
its share of the examples and the results are gathered on the main process. No DeepSpeed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    """This process's place among the launched ones (torchrun / deepspeed set the env)."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_processes() -> Processes:
    """Rank, world size and local rank from the launcher's environment (1 process without)."""
    return Processes(
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def join_process_group(procs: Processes, timeout_s: int) -> None:
    """Join the launcher's process group (gloo); a no-op for a single process."""
    if procs.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))


def gather_on_main(value: Any, procs: Processes) -> list[Any] | None:
    """Every process's `value` in rank order on rank 0 (None elsewhere); a collective."""
    if procs.world_size == 1:
        return [value]
    gathered: list[Any] = [None] * procs.world_size
    dist.all_gather_object(gathered, value)
    return gathered if procs.is_main else None


def leave_process_group() -> None:
    """Destroy the process group if this module created one."""
    if dist.is_initialized():
        dist.destroy_process_group()
