"""The process group (alora_ds.runtime.process) and Slurm's variables mapped to the ones
torch.distributed reads (alora_ds.runtime.slurm)."""

import os
import subprocess
import sys
from pathlib import Path

from alora_ds.runtime.slurm import first_slurm_host, slurm_environment
from tests.helpers import free_port


def test_first_host_of_a_nodelist():
    assert first_slurm_host("gpu[07-09,12],cpu1") == "gpu07"
    assert first_slurm_host("node1,node2") == "node1"
    assert first_slurm_host("a[3,5]") == "a3"
    assert first_slurm_host("localhost") == "localhost"


def test_slurm_variables_fill_the_missing_ones():
    env = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4",
           "SLURM_JOB_NODELIST": "n[2-3]", "SLURM_JOB_ID": "77"}  # fmt: skip
    assert slurm_environment(env) == {
        "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "n2", "MASTER_PORT": "20077",
    }  # fmt: skip
    # A launcher that already set RANK wins; no Slurm, nothing to map.
    assert slurm_environment({**env, "RANK": "0"}) == {}
    assert slurm_environment({}) == {}
    assert slurm_environment({**env, "MASTER_PORT": "1234"})["MASTER_PORT"] == "1234"


def test_cpu_process_group_builds_nothing_and_leaves_no_shared_memory(tmp_path):
    """On CPU, gloo does the collectives: DeepSpeed's shared-memory all-reduce op is neither
    compiled (its lock in the extensions folder hangs every later launch if a start-up is
    killed) nor mapped (it leaves a /dev/shm buffer per process behind)."""
    port = str(free_port())
    script = (
        "import torch.distributed as dist\n"
        "from alora_ds.runtime import process as P\n"
        "info = P.init_distributed(30)\n"
        "assert info.backend == 'gloo', info\n"
        "print(P.all_reduce_sum([1.5], info.device))\n"
        "dist.destroy_process_group()\n"
    )
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "MASTER_PORT": port}
    env.pop("RANK", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[1.5]" in done.stdout
    assert not (tmp_path / "ext").exists(), list((tmp_path / "ext").rglob("*"))
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def test_a_process_group_that_cannot_start_says_why_in_one_line():
    """A GLOO_SOCKET_IFNAME naming no interface of this machine (one copied from a cluster's
    instructions): one line naming the variable and its value, not the lost-contact line
    (nothing was lost, there is nothing to resume). tests/launch/test_slurm.py drives the
    same through launch/train.py on two nodes with no GLOO_SOCKET_IFNAME at all."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "nosuch0", "MASTER_PORT": str(free_port())}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        env.pop(name, None)
    script = (
        "from alora_ds.errors import run_cli\n"
        "from alora_ds.runtime import process as P\n"
        "raise SystemExit(run_cli(lambda argv: P.init_distributed(30) and 0))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not start the process group of 1 process(es) "), last
    assert "Unable to find address for: nosuch0" in last
    assert "GLOO_SOCKET_IFNAME is 'nosuch0': it must name the network interface" in last
    assert "Traceback" not in done.stderr
