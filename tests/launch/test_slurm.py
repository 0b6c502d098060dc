"""Multi-node launch paths, run for real on one machine over 127.0.0.1.

- Slurm: a one-node cluster (slurmctld + slurmd) in a temporary directory; the real
  launch/slurm/train.sbatch runs the tiny demo with 2 tasks on CPU (the #SBATCH GPU lines
  overridden on the sbatch command line), and jobs that must fail do, with one line per task.
- DeepSpeed hostfile: `deepspeed --hostfile --launcher pdsh` ssh-es into "localhost" (a private
  sshd on a free loopback port with a throw-away key) and starts 2 processes; the hostfile check
  names a host it cannot reach in one line.

Slurm, pdsh and sshd come from Debian (scripts/install_slurm.sh); without them these tests skip
and say why. Every daemon started here is stopped by its fixture, whatever the outcome.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from alora_ds.errors import run_cli
from launch import hostfile_check
from tests.helpers import DEEPSPEED, REPO, free_port

PARTITION = "cpu"
# The demo config on a short schedule: 4 optimizer steps, one allocation round after step 2.
SHORT_DEMO = [
    "--ds_config", "ds_configs/zero3.json", "--config", "configs/demo.yaml", "--num_rounds", "1",
    "--initial_steps", "2", "--round_steps", "1", "--max_steps", "4", "--rank_budget", "28",
    "--val_examples", "8", "--eval_steps", "100",
]  # fmt: skip
# What a CPU job overrides in the template's #SBATCH lines: 2 tasks on the one node, no GPU.
CPU_JOB = [
    "--partition", PARTITION, "--nodes", "1", "--ntasks", "2", "--ntasks-per-node", "2",
    "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "10",
]  # fmt: skip
# Variables a surrounding job or launcher may have set; the jobs here must not inherit them.
_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k not in _LAUNCHER_VARS
    }
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DS_ACCELERATOR="cpu")
    env.update(extra)
    return env


def stop(process: subprocess.Popen) -> None:
    """End a daemon this module started: SIGTERM, then SIGKILL after 15 s."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=15)


def wait_for(predicate, timeout: float, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    tails = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in logs if p.exists())
    pytest.fail(f"{what} within {timeout:.0f} s\n{tails}")


# ---- a one-node Slurm cluster ------------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    directory: Path
    env: dict[str, str]

    def run(self, *command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(command), env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def sbatch(self, *args: str, output: Path, timeout: float = 400) -> subprocess.CompletedProcess:
        """`sbatch --wait` of the training template from the repository root."""
        return subprocess.run(
            ["sbatch", "--wait", *CPU_JOB, "--output", str(output), str(REPO / "launch/slurm/train.sbatch"), *args],
            env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip


def slurm_conf(directory: Path, user: str) -> str:
    return f"""\
ClusterName=alora-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/none
CredType=cred/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
# sbatch --wait polls every 2 s only while 2 s < MinJobAge / 2 fails to hold; with the default
# (300) it backs off to 8 and then 32 s, adding up to half a minute to every job here.
MinJobAge=4
StateSaveLocation={directory}/state
SlurmdSpoolDir={directory}/spool
SlurmctldPidFile={directory}/slurmctld.pid
SlurmdPidFile={directory}/slurmd.pid
SlurmctldLogFile={directory}/slurmctld.log
SlurmdLogFile={directory}/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=1000 State=UNKNOWN
PartitionName={PARTITION} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm():
    missing = [
        t
        for t in ("slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scancel")
        if not shutil.which(t)
    ]
    if missing:
        pytest.skip(
            f"Slurm is not installed ({', '.join(missing)} not on PATH); "
            "`bash scripts/install_slurm.sh` installs Debian's slurm-wlm"
        )
    # Short paths: slurmd puts unix sockets in its spool directory (108-character limit).
    directory = Path(tempfile.mkdtemp(prefix="alora-slurm-"))
    for sub in ("state", "spool"):
        (directory / sub).mkdir()
    conf = directory / "slurm.conf"
    conf.write_text(slurm_conf(directory, getpass.getuser()))
    cluster = Cluster(directory, clean_env(SLURM_CONF=str(conf), PYTHON=sys.executable))
    logs = [directory / "slurmctld.log", directory / "slurmd.log", directory / "daemons.out"]
    daemons: list[subprocess.Popen] = []
    try:
        with (directory / "daemons.out").open("w") as out:
            for command in (
                ["slurmctld", "-D", "-c", "-f", str(conf)],
                ["slurmd", "-D", "-N", "localhost", "-f", str(conf)],
            ):
                daemons.append(subprocess.Popen(command, env=cluster.env, stdout=out, stderr=out))  # fmt: skip
        wait_for(
            lambda: cluster.run("sinfo", "-h", "-o", "%T").stdout.strip() == "idle",
            60, "the node did not become idle", logs,
        )  # fmt: skip
        yield cluster
    finally:
        # Our private cluster runs only our jobs: cancel whatever is left, then the daemons.
        if daemons and daemons[0].poll() is None:
            jobs = cluster.run("squeue", "-h", "-o", "%i").stdout.split()
            if jobs:
                cluster.run("scancel", *jobs)
        for daemon in reversed(daemons):
            stop(daemon)
        shutil.rmtree(directory, ignore_errors=True)


def task_lines(log: str, prefix: str) -> dict[int, list[str]]:
    """Lines of an `srun --label` log that start with `prefix` after the task label, by task."""
    lines: dict[int, list[str]] = {}
    for line in log.splitlines():
        label, sep, rest = line.partition(": ")
        if sep and label.strip().isdigit() and rest.startswith(prefix):
            lines.setdefault(int(label), []).append(rest)
    return lines


def test_sbatch_trains_the_demo_with_two_tasks(slurm, tmp_path):
    output_dir, log_file = tmp_path / "run", tmp_path / "job.out"
    result = slurm.sbatch(*SHORT_DEMO, "--output_dir", str(output_dir), output=log_file)
    log = log_file.read_text() if log_file.exists() else ""
    assert result.returncode == 0, result.stderr + log[-4000:]

    # Both tasks started, each knows its place, and they formed one process group of 2.
    host = socket.gethostname()
    assert task_lines(log, "task SLURM_PROCID=") == {
        0: [f"task SLURM_PROCID=0 of 2 on {host}, SLURM_LOCALID=0"],
        1: [f"task SLURM_PROCID=1 of 2 on {host}, SLURM_LOCALID=1"],
    }, log[-3000:]
    assert "0: alora-ds: alora on sst2, 2 process(es), ZeRO stage 3" in log
    assert "0: batch: micro 4 x accumulation 1 x 2 processes = 8 examples per optimizer step" in log

    round_file = json.loads((output_dir / "allocation" / "round_01.json").read_text())
    assert round_file["round"] == 1 and len(round_file["pruned"]) == 7
    assert sum(round_file["ranks_after"].values()) <= 28
    for name in ("adapter_model.safetensors", "adapter_config.json", "alora_metadata.json"):
        assert (output_dir / "adapter" / name).is_file(), name
    config = json.loads((output_dir / "config.json").read_text())
    assert config["resolved"]["world_size"] == 2


def test_a_job_with_more_tasks_than_the_batch_allows_fails_in_one_line_per_task(slurm, tmp_path):
    # The ds config fixes train_batch_size = 4: one process's worth of micro batch 4. With 2 tasks
    # every task stops before any training starts, and sbatch --wait returns the job's status.
    fixed_batch = tmp_path / "batch4.json"
    zero3 = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    fixed_batch.write_text(json.dumps({**zero3, "train_batch_size": 4}))
    output_dir, log_file = tmp_path / "run", tmp_path / "job.out"
    result = slurm.sbatch(*SHORT_DEMO, "--ds_config", str(fixed_batch), "--output_dir", str(output_dir),
                          output=log_file, timeout=200)  # fmt: skip
    log = log_file.read_text()
    assert result.returncode != 0, log[-3000:]
    message = (
        f"error: ds config {fixed_batch}: train_batch_size = 4 but the run has train_batch_size = 8 "
        '(micro batch 4 x accumulation 1 x 2 processes = 8); set it to "auto" or make them agree'
    )
    assert task_lines(log, "error: ") == {0: [message], 1: [message]}, log[-3000:]
    assert "Traceback" not in log
    assert not output_dir.exists()


# ---- DeepSpeed hostfile launch through pdsh and ssh --------------------------------------------


@dataclass(frozen=True)
class Ssh:
    port: int
    env: dict[str, str]  # PDSH_SSH_ARGS_APPEND: the key and options pdsh's ssh must use


@pytest.fixture(scope="module")
def local_sshd():
    missing = [t for t in ("pdsh", "ssh", "ssh-keygen") if not shutil.which(t)]
    sshd = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
    if missing or sshd is None:
        pytest.skip(
            f"{', '.join(missing + ([] if sshd else ['sshd']))} not installed; "
            "`bash scripts/install_slurm.sh` installs pdsh and openssh-server"
        )
    # sshd refuses to start without its privilege-separation directory.
    privsep = Path("/run/sshd")
    if not privsep.is_dir():
        if os.geteuid() != 0:
            pytest.skip("sshd needs /run/sshd, which only root can create")
        privsep.mkdir(mode=0o755)
    directory = Path(tempfile.mkdtemp(prefix="alora-ssh-"))
    directory.chmod(0o700)
    for key in ("host_key", "id"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / key)], check=True
        )
    shutil.copy(directory / "id.pub", directory / "authorized_keys")
    port = free_port()
    (directory / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {directory}/host_key\n"
        f"PidFile {directory}/sshd.pid\nAuthorizedKeysFile {directory}/authorized_keys\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        "PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\n"
    )  # fmt: skip
    options = (
        f"-i {directory}/id -F /dev/null -o StrictHostKeyChecking=no "
        "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes"
    )
    log = directory / "sshd.log"
    with log.open("w") as out:
        daemon = subprocess.Popen(
            [sshd, "-D", "-e", "-f", str(directory / "sshd_config")], stdout=out, stderr=out
        )
    try:
        env = clean_env(PDSH_SSH_ARGS_APPEND=options)
        probe = ["ssh", *options.split(), "-p", str(port), "localhost", "true"]
        wait_for(lambda: subprocess.run(probe, capture_output=True).returncode == 0, 30,
                 "sshd did not accept the test key", [log])  # fmt: skip
        yield Ssh(port, env)
    finally:
        stop(daemon)
        shutil.rmtree(directory, ignore_errors=True)


def test_hostfile_launch_with_pdsh(local_sshd, tmp_path, monkeypatch):
    monkeypatch.setenv("PDSH_SSH_ARGS_APPEND", local_sshd.env["PDSH_SSH_ARGS_APPEND"])
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    # The processes start in a fresh ssh session: DeepSpeed passes them the variables listed in
    # .deepspeed_env (read from the launch directory), as a multi-node user would.
    (tmp_path / ".deepspeed_env").write_text(
        "HF_HUB_OFFLINE=1\nHF_DATASETS_OFFLINE=1\nDS_ACCELERATOR=cpu\n"
    )
    assert run_cli(hostfile_check.main, [str(hostfile), "--ssh_port", str(local_sshd.port)]) == 0

    output_dir = tmp_path / "run"
    args = [a if not a.endswith((".json", ".yaml")) else str(REPO / a) for a in SHORT_DEMO]
    result = subprocess.run(
        [DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh_check", "--force_multi",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "--launcher", "pdsh",
         "--ssh_port", str(local_sshd.port), str(REPO / "launch" / "train.py"),
         *args, "--output_dir", str(output_dir), "--num_rounds", "0", "--max_steps", "2"],
        cwd=tmp_path, env=local_sshd.env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "localhost: alora-ds: alora on sst2, 2 process(es), ZeRO stage 3" in output
    assert (output_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_hostfile_check_names_the_host_it_cannot_reach(local_sshd, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PDSH_SSH_ARGS_APPEND", local_sshd.env["PDSH_SSH_ARGS_APPEND"])
    hostfile = tmp_path / "hostfile"
    # 127.0.0.3 is on the loopback interface but nothing listens there: refused at once.
    hostfile.write_text("# two nodes\nlocalhost slots=2\n\n127.0.0.3 slots=2\n")
    code = run_cli(
        hostfile_check.main, [str(hostfile), "--ssh_port", str(local_sshd.port), "--timeout", "5"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: hostfile {hostfile} line 4: cannot ssh to '127.0.0.3': ")
    assert "refused" in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("node1 slots=8\nnode2\n", r"line 2: expected 'HOSTNAME slots=N', got 'node2'"),
        ("node1 slots=eight\n", r"line 1: slots must be a positive integer, got 'eight'"),
        ("node1 slots=0\n", r"line 1: slots must be a positive integer, got '0'"),
        ("node1 slots=8\nnode1 slots=8\n", r"line 2: host 'node1' already given on line 1"),
        ("# nothing\n\n", r"names no host"),
    ],
)
def test_malformed_hostfiles(tmp_path, capsys, text, message):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(text)
    assert run_cli(hostfile_check.main, [str(hostfile)]) == 2  # before any ssh
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: hostfile {hostfile} ")
    assert re.search(message, err), err


# ---- the templates themselves ---------------------------------------------------------------


@pytest.mark.parametrize("template", ["train.sbatch", "eval.sbatch"])
def test_templates_parse_and_mark_what_to_edit(template):
    path = REPO / "launch" / "slurm" / template
    subprocess.run(["bash", "-n", str(path)], check=True)
    edits = [
        line.split()[1].split("=")[0]
        for line in path.read_text().splitlines()
        if line.startswith("#SBATCH") and "# EDIT" in line
    ]
    expected = {"train.sbatch": ["--nodes", "--ntasks-per-node", "--gpus-per-node", "--partition", "--time"],
                "eval.sbatch": ["--gpus-per-node", "--partition", "--time"]}  # fmt: skip
    assert edits == expected[template]
