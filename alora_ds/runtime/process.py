"""The process group and the collectives the trainer uses outside the engine.

Every function here that communicates must be called by every process, in the same order.
"""

from __future__ import annotations

import os
import re
import resource
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import deepspeed
import torch
import torch.distributed as dist

from alora_ds.errors import RunFailure
from alora_ds.runtime.slurm import slurm_environment


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_collective_failure(exc: BaseException) -> bool:
    """Whether `exc` is a collective failing because a peer died or stayed silent past the
    timeout: NCCL raises DistError subclasses, gloo a plain RuntimeError from its transport."""
    if isinstance(exc, RunFailure):  # already said in one line (e.g. by init_distributed)
        return False
    return isinstance(exc, dist.DistError) or (
        isinstance(exc, RuntimeError) and "gloo/transport" in str(exc)
    )


def free_port() -> int:
    """A TCP port nothing listens on now (for a group of one, which still needs a rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _skip_cpu_shared_memory_all_reduce() -> None:
    """Let gloo do every CPU collective instead of DeepSpeed's shared-memory all-reduce op.

    That op is compiled at the first launch (a C++ compiler and about a minute), and every
    later launch takes a file lock in ~/.cache/torch_extensions to check it: a process killed
    while holding that lock (Ctrl-C at start-up, a scheduler's timeout) leaves the lock behind
    and every later run waits on it forever, silently. It also leaves a 68 MB /dev/shm buffer
    per process behind after every run. CPU runs are for tests and demos, where gloo's speed
    is enough; GPU runs use NCCL and never reach this op.
    """
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(timeout_s: int) -> DistInfo:
    """Join (or, run as a plain script, create) the process group.

    Launched by deepspeed / torchrun the usual RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT are set; under `srun` they are derived from Slurm's variables; run as
    `python launch/train.py` it becomes a group of one. `timeout_s` bounds every collective, so
    a dead peer ends the run instead of hanging it.
    """
    os.environ.update(slurm_environment(os.environ))
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        backend, device = "nccl", torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")
        _skip_cpu_shared_memory_all_reduce()
    try:
        deepspeed.init_distributed(
            dist_backend=backend, timeout=timedelta(seconds=timeout_s), verbose=False
        )
    except RuntimeError as exc:
        if not is_collective_failure(exc):
            raise
        raise RunFailure(_join_failure(exc, backend)) from exc
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def _join_failure(exc: BaseException, backend: str) -> str:
    """Why the processes never formed a group, and what to check. Nothing was lost, so this is
    not the lost-contact message (which says to resume): on several nodes it is almost always
    the address a process listens on, or MASTER_ADDR, being one the other nodes cannot reach."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    first = re.sub(r"\[(enforce fail at )?\S+:\d+\] ", "", first)  # "[/gloo/.../pair.cc:152] "
    if "EADDRINUSE" in str(exc):
        return _port_taken()
    variable = "GLOO_SOCKET_IFNAME" if backend == "gloo" else "NCCL_SOCKET_IFNAME"
    interface = os.environ.get(variable)
    what = (
        "the network interface the nodes reach each other on (`ip -br addr` lists them), and "
        "MASTER_ADDR must resolve to that network on every node"
    )
    if interface:
        hint = f"{variable} is {interface!r}: it must name {what}"
    else:
        hint = f"set GLOO_SOCKET_IFNAME (gloo) or NCCL_SOCKET_IFNAME (NCCL) to {what}"
    if backend == "gloo" and not interface:
        # Without GLOO_SOCKET_IFNAME gloo listens on the address of this host's name, and on
        # the loopback interface when that name resolves to nothing or to 127.x.
        host = socket.gethostname()
        try:
            address = socket.gethostbyname(host)
        except OSError:
            address = "no address"
        if not address[0].isdigit() or address.startswith("127."):
            hint = (
                f"this host's name {host!r} resolves to {address}, so gloo listened on the "
                f"loopback interface, which no other node reaches: {hint}"
            )
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    return (
        f"could not start the process group of {os.environ.get('WORLD_SIZE')} process(es) "
        f"(rendezvous at {where}): {first}; {hint}"
    )


def _port_taken() -> str:
    """Process 0 could not listen on MASTER_PORT for the rendezvous: another program (often an
    earlier run still going, or one that has not released its port) holds it."""
    port, address = os.environ.get("MASTER_PORT"), os.environ.get("MASTER_ADDR")
    return (
        f"port {port} is already in use on this machine (another program, often another "
        f"training run, listens on it), so process 0 could not open the rendezvous at "
        f"{address}:{port}; choose a free port: --master_port N with the deepspeed launcher or "
        f"torchrun, MASTER_PORT=N otherwise (srun and launch/slurm/train.sbatch take it from the "
        f"environment too)"
    )


def barrier() -> None:
    dist.barrier()


def all_gather_tensor(value: torch.Tensor) -> list[torch.Tensor]:
    """Every process's `value` (same shape everywhere), in rank order."""
    out = [torch.empty_like(value) for _ in range(dist.get_world_size())]
    dist.all_gather(out, value.contiguous())
    return out


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def sum_tensor(value: torch.Tensor) -> torch.Tensor:
    """The sum of every process's `value` (same shape everywhere), the same on every process."""
    out = value.clone()
    dist.all_reduce(out)
    return out


def all_agree(flag: bool, device: torch.device) -> bool:
    """True on every process iff `flag` is true on every process."""
    tensor = torch.tensor([0 if flag else 1], dtype=torch.int64, device=device)
    dist.all_reduce(tensor)
    return int(tensor) == 0


def gathered_rng_states(info: DistInfo) -> dict[str, torch.Tensor]:
    """Every process's torch generator states, on every process: `cpu.<rank>` and, on GPUs,
    `cuda.<rank>` (collective)."""
    own = {"cpu": torch.get_rng_state()}
    if info.device.type == "cuda":
        own["cuda"] = torch.cuda.get_rng_state(info.device)
    rng: dict[str, torch.Tensor] = {}
    for kind, state in own.items():
        for rank, gathered_state in enumerate(all_gather_tensor(state.to(info.device))):
            rng[f"{kind}.{rank}"] = gathered_state.cpu()
    return rng


def restore_rng(rng: dict[str, torch.Tensor], info: DistInfo) -> bool:
    """Put this process's generator states back; False when the checkpoint has none for this
    process (it was written by a different number of processes)."""
    if f"cpu.{info.rank}" not in rng or f"cpu.{info.world_size}" in rng:
        return False
    torch.set_rng_state(rng[f"cpu.{info.rank}"])
    if info.device.type == "cuda" and f"cuda.{info.rank}" in rng:
        torch.cuda.set_rng_state(rng[f"cuda.{info.rank}"], info.device)
    return True


def peak_memory_bytes(info: DistInfo) -> list[int]:
    """Every process's peak memory (GPU: allocated by torch; CPU: resident set), in rank order
    (collective)."""
    peak = (
        torch.cuda.max_memory_allocated(info.device)
        if info.device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # peak RSS, bytes
    )
    everyone = all_gather_tensor(torch.tensor([peak], dtype=torch.int64, device=info.device))
    return [int(p) for p in everyone]
