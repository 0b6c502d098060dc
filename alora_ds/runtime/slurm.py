"""Slurm's task variables as torch.distributed's: pure functions, no process group.

A script started by `srun` (one task per GPU, no launcher) sees SLURM_PROCID, SLURM_LOCALID,
SLURM_NTASKS and SLURM_JOB_NODELIST; torch.distributed wants RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT.
"""

from __future__ import annotations

from collections.abc import Mapping


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: "gpu[07-09,12],cpu1" -> "gpu07"."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist
    if "[" not in head:
        return head
    prefix, _, rest = head.partition("[")
    first = rest.split(",")[0].split("-")[0].rstrip("]")
    return prefix + first


def slurm_environment(env: Mapping[str, str]) -> dict[str, str]:
    """RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from Slurm's variables, for a
    script started by `srun` (one task per GPU) where no launcher set the usual ones; empty
    when a launcher did (RANK is set) or the script does not run under srun."""
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return {}
    return {
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "MASTER_ADDR": env.get("MASTER_ADDR")
        or first_slurm_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))),
        # A port derived from the job id: the same on every node, different between jobs.
        "MASTER_PORT": env.get("MASTER_PORT")
        or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000),
    }
