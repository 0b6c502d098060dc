"""Multi-node launch paths, run for real on one machine: three "nodes" made of network
namespaces (node1, node2, node3), each with its own interface and address on a private /24
behind a bridge on the host, and a hosts file naming them. A process started on a node runs in
its namespace with that hosts file as /etc/hosts and sees the host's file system: the repository,
the .venv and every output directory are on a file system every node shares.

- Slurm: slurmctld on the host (on the bridge's address), one slurmd per node. The real
  launch/slurm/train.sbatch trains the small ALoRA run (the golden run alora-2p) on two nodes,
  one task each, and ends bitwise where 2 processes on one node end; a node lost in the middle
  of a round (its process killed; then its network cut) ends the job, and the job resubmitted or
  requeued by Slurm with --resume_from_checkpoint auto ends as if nothing had happened.
- DeepSpeed hostfile: sshd in node1 and node2; `deepspeed --hostfile --launcher pdsh` started on
  node1 reaches both over ssh, after launch/hostfile_check.py has said the hostfile is good.

Needs root (namespaces, a bridge), iproute2 and util-linux, and Slurm, pdsh and sshd from Debian
(scripts/install_slurm.sh); without them these tests skip and say why (under CI=true they fail). Every process started
here is stopped, and every namespace and link removed, by the fixtures, whatever the outcome.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from alora_ds.errors import run_cli
from launch import hostfile_check
from tests.golden.record import outputs, run_args
from tests.helpers import DEEPSPEED, REPO, free_port, unavailable

PARTITION = "cpu"
NODES = ("node1", "node2", "node3")
IFNAME = "cluster0"  # every node's interface to the others, the same name on each, as on a cluster
# --dist_timeout: how long a process waits for a silent peer (the default, 600, is for GPUs). It
# also bounds the start-up rendezvous, where a process starved of CPU may arrive seconds late.
DIST_TIMEOUT = 20
# The golden run alora-2p (tests/golden/record.py): 15 steps, rounds after steps 5 and 7. Every
# launch here must end bitwise where that run, 2 processes on one machine, ends.
RUN = [
    "--ds_config", str(REPO / "ds_configs" / "zero3.json"), *run_args("alora"),
    "--dist_timeout", str(DIST_TIMEOUT),
]  # fmt: skip
# What a CPU job overrides in the template's #SBATCH lines (no GPU): one task on each of two
# nodes, or two tasks on one node.
TWO_NODES = [
    "--partition", PARTITION, "--nodes", "2", "--ntasks-per-node", "1", "--gpus-per-node", "0",
    "--cpus-per-task", "1", "--time", "10",
]  # fmt: skip
ONE_NODE_TWO_TASKS = [
    "--partition", PARTITION, "--nodes", "1", "--ntasks", "2", "--ntasks-per-node", "2",
    "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "10",
]  # fmt: skip
# Variables a surrounding job, launcher or shell may have set; the jobs here must not inherit them.
_INHERITED_VARS = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME",
    "NCCL_SOCKET_IFNAME",
)  # fmt: skip


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "ALORA_DS_TEST_"))
        and k not in _INHERITED_VARS
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


# ---- three nodes on one machine --------------------------------------------------------------


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


@dataclass(frozen=True)
class Nodes:
    """Network namespaces joined by a bridge on the host, one per node name."""

    netns: dict[str, str]  # node name -> its network namespace
    addresses: dict[str, str]  # node name -> its address on IFNAME
    host_address: str  # the host's address on the bridge
    hosts_file: Path  # every node's /etc/hosts

    def on(self, node: str, *command: str) -> list[str]:
        """`command`, run on `node`: in its network namespace, with the nodes' hosts file as
        /etc/hosts. Not `ip netns exec`: that remounts /sys, which hides the host's
        /sys/fs/cgroup, and slurmd 22.05 does not start without it. nsenter changes the network
        namespace only; a private mount namespace (unshare) holds the hosts file. Every step
        execs the next, so the process started is `command` itself."""
        script = 'mount --bind "$0" /etc/hosts && n=$1 && shift && exec nsenter --net="$n" "$@"'
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                str(self.hosts_file), f"/run/netns/{self.netns[node]}", *command]  # fmt: skip

    def link(self, node: str, state: str) -> None:
        """Take `node`'s interface "down" (its network cut) or bring it back "up"."""
        ip("-n", self.netns[node], "link", "set", IFNAME, state)


def free_subnet() -> str:
    """A 10.77.X /24 no interface of this machine is on (another checkout may be testing too)."""
    used = ip("-4", "-o", "addr").stdout
    for k in range(250):
        prefix = f"10.77.{(os.getpid() + k) % 250 + 1}"
        if f" {prefix}." not in used:
            return prefix
    unavailable("no free 10.77.X.0/24 subnet for the test's nodes")


def remove_netns(netns: str) -> None:
    """Kill what still runs in a namespace of ours (a task Slurm could not reach), then drop it:
    its veth pair goes with it."""
    for pid in ip("netns", "pids", netns, check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    ip("netns", "del", netns, check=False)


@pytest.fixture(scope="module")
def nodes() -> Iterator[Nodes]:
    missing = [t for t in ("ip", "unshare", "nsenter") if not shutil.which(t)]
    if missing:
        unavailable(f"{', '.join(missing)} not installed (iproute2, util-linux)")
    if os.geteuid() != 0:
        unavailable("network namespaces need root")
    tag = f"al{os.getpid() % 100000}"  # names unique to this test process (15 characters at most)
    subnet = free_subnet()
    with contextlib.ExitStack() as undo:
        directory = Path(tempfile.mkdtemp(prefix="alora-nodes-"))
        undo.callback(shutil.rmtree, directory, ignore_errors=True)
        bridge = f"{tag}br"
        try:
            ip("link", "add", bridge, "type", "bridge")
        except subprocess.CalledProcessError as exc:
            unavailable(f"cannot create a bridge: {exc.stderr.strip()}")
        undo.callback(ip, "link", "del", bridge, check=False)
        ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        ip("link", "set", bridge, "up")
        netns, addresses = {}, {}
        for i, name in enumerate(NODES, start=1):
            netns[name], addresses[name] = f"{tag}-{name}", f"{subnet}.{10 + i}"
            ip("netns", "add", netns[name])
            undo.callback(remove_netns, netns[name])
            ip("link", "add", f"{tag}h{i}", "type", "veth", "peer", "name", f"{tag}n{i}")
            undo.callback(ip, "link", "del", f"{tag}h{i}", check=False)  # gone with the netns
            ip("link", "set", f"{tag}h{i}", "master", bridge, "up")
            ip("link", "set", f"{tag}n{i}", "netns", netns[name])
            ip("-n", netns[name], "link", "set", f"{tag}n{i}", "name", IFNAME)
            ip("-n", netns[name], "addr", "add", f"{addresses[name]}/24", "dev", IFNAME)
            ip("-n", netns[name], "link", "set", IFNAME, "up")
            ip("-n", netns[name], "link", "set", "lo", "up")
        # The nodes' names and nothing else: not this machine's own name, which (as on many
        # hosts whose name maps to 127.0.1.1) gives gloo no address another node can reach.
        hosts_file = directory / "hosts"
        hosts_file.write_text(
            "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in addresses.items())
        )
        yield Nodes(netns, addresses, f"{subnet}.1", hosts_file)


# ---- a Slurm cluster on the nodes --------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    directory: Path
    env: dict[str, str]  # SLURM_CONF, and GLOO_SOCKET_IFNAME for the jobs

    def run(self, *command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(command), env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def sbatch_command(
        self, job: list[str], *args: str, output: Path, template: str = "train.sbatch"
    ) -> list[str]:
        """`sbatch --wait` of a template (the training one unless said): `job` overrides its
        #SBATCH lines, `args` go to the template (train.sbatch: to launch/train.py)."""
        return ["sbatch", "--wait", *job, "--output", str(output),
                str(REPO / "launch/slurm" / template), *args]  # fmt: skip

    def sbatch(
        self, job: list[str], *args: str, output: Path, env: dict | None = None,
        timeout: float = 400, template: str = "train.sbatch",
    ) -> subprocess.CompletedProcess:  # fmt: skip
        """Submit from the repository root, as the template asks, and wait for the job's end."""
        return subprocess.run(
            self.sbatch_command(job, *args, output=output, template=template),
            env=env or self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def watch(
        self, job: list[str], *args: str, output: Path, env: dict, every: Callable[[str], None],
        timeout: float = 400,
    ) -> tuple[int, str]:  # fmt: skip
        """`sbatch` as above, calling `every(log so far)` twice a second until sbatch returns;
        sbatch's exit status and the job's log."""
        command = self.sbatch_command(job, *args, output=output)
        submit = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + timeout
        try:
            while submit.poll() is None and time.monotonic() < deadline:
                every(output.read_text() if output.exists() else "")
                time.sleep(0.5)
            if submit.poll() is None:
                pytest.fail(f"the job had not ended {timeout:.0f} s after it was submitted: "
                            f"{self.job()}")  # fmt: skip
        finally:
            if submit.poll() is None:
                submit.kill()
                submit.wait()
        return submit.returncode, output.read_text()

    def job(self) -> dict[str, str]:
        """The one job of this private cluster (`scontrol show job`), or {} when there is none."""
        text = self.run("scontrol", "--oneliner", "show", "job").stdout
        return dict(f.split("=", 1) for f in text.split() if "=" in f) if "JobId=" in text else {}


def slurm_conf(directory: Path, user: str, nodes: Nodes) -> str:
    node_lines = "".join(
        f"NodeName={n} NodeAddr={a} CPUs=2 RealMemory=1000 State=UNKNOWN\n"
        for n, a in nodes.addresses.items()
    )
    return f"""\
ClusterName=alora-test
SlurmctldHost=localhost({nodes.host_address})
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
# A node that stops answering is declared down (and its jobs requeued) after about this many
# seconds plus a ping cycle (about half a minute here); the default, 300, is for real clusters.
SlurmdTimeout=10
# A requeued job waits the job credential's lifetime (120 s by default, 10 here) before it starts,
# so that what is left of its last run (srun waits KillWait + 2 s for a step on a lost node) has
# ended first: a batch script ending after the job restarted would end the new run too.
KillWait=2
AuthInfo=cred_expire=10
# The scheduler's periodic pass (default every 60 s) is what starts a requeued job once its wait
# is over: nothing else happens on this cluster to start it sooner.
SchedulerParameters=sched_interval=2
StateSaveLocation={directory}/state
SlurmdSpoolDir={directory}/spool/%n
SlurmctldPidFile={directory}/slurmctld.pid
SlurmdPidFile={directory}/slurmd-%n.pid
SlurmctldLogFile={directory}/slurmctld.log
SlurmdLogFile={directory}/slurmd-%n.log
{node_lines}PartitionName={PARTITION} Nodes={",".join(nodes.addresses)} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm(nodes):
    missing = [
        t
        for t in ("slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scancel", "scontrol")
        if not shutil.which(t)
    ]
    if missing:
        unavailable(
            f"Slurm is not installed ({', '.join(missing)} not on PATH); "
            "`bash scripts/install_slurm.sh` installs Debian's slurm-wlm"
        )
    # Short paths: slurmd puts unix sockets in its spool directory (108-character limit).
    directory = Path(tempfile.mkdtemp(prefix="alora-slurm-"))
    for sub in ("state", *(f"spool/{n}" for n in NODES)):
        (directory / sub).mkdir(parents=True)
    conf = directory / "slurm.conf"
    conf.write_text(slurm_conf(directory, getpass.getuser(), nodes))
    cluster = Cluster(
        directory,
        clean_env(SLURM_CONF=str(conf), PYTHON=sys.executable, GLOO_SOCKET_IFNAME=IFNAME),
    )
    logs = [directory / "slurmctld.log", *(directory / f"slurmd-{n}.log" for n in NODES),
            directory / "daemons.out"]  # fmt: skip
    daemons: list[subprocess.Popen] = []
    try:
        with (directory / "daemons.out").open("w") as out:
            commands = [
                ["slurmctld", "-D", "-c", "-f", str(conf)],
                *(nodes.on(n, "slurmd", "-D", "-N", n, "-f", str(conf)) for n in NODES),
            ]
            for command in commands:
                daemons.append(subprocess.Popen(command, env=cluster.env, stdout=out, stderr=out))  # fmt: skip
        wait_for(
            lambda: cluster.run("sinfo", "-h", "-o", "%T").stdout.split() == ["idle"],
            60, "the nodes did not become idle", logs,
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


def test_two_nodes_train_bitwise_like_two_processes_on_one(slurm, golden_run, tmp_path):
    output_dir, log_file = tmp_path / "run", tmp_path / "job.out"
    result = slurm.sbatch(TWO_NODES, *RUN, "--output_dir", str(output_dir), output=log_file)
    log = log_file.read_text() if log_file.exists() else ""
    assert result.returncode == 0, result.stderr + log[-4000:]

    # One task on each node; MASTER_ADDR node1 (the first of SLURM_JOB_NODELIST) resolved on
    # node2, and gloo connected over the nodes' interface.
    assert task_lines(log, "task SLURM_PROCID=") == {
        0: ["task SLURM_PROCID=0 of 2 on node1, SLURM_LOCALID=0"],
        1: ["task SLURM_PROCID=1 of 2 on node2, SLURM_LOCALID=0"],
    }, log[-3000:]
    assert "0: alora-ds: alora on sst2, 2 process(es), ZeRO stage 3" in log
    assert "0: batch: micro 4 x accumulation 1 x 2 processes = 8 examples per optimizer step" in log
    # Round files (scores included), logged losses, summary and adapters: bitwise those of the
    # same run as 2 processes on one machine.
    reference, reference_result = golden_run("alora-2p")
    assert reference_result.returncode == 0, reference_result.stderr[-3000:]
    assert outputs(output_dir) == outputs(reference)


def test_without_gloo_socket_ifname_two_nodes_cannot_connect_and_say_why(slurm, tmp_path):
    # This machine's name is not in the nodes' hosts file: gloo falls back to listening on
    # loopback, where the other node cannot reach it. The group never forms: nothing to resume.
    env = {k: v for k, v in slurm.env.items() if k != "GLOO_SOCKET_IFNAME"}
    output_dir, log_file = tmp_path / "run", tmp_path / "job.out"
    failed = "error: could not start the process group of 2 process(es)"
    cancelled: list[subprocess.CompletedProcess] = []

    def cancel_once_explained(log: str) -> None:
        # The task whose connection is refused says why at once; its peer waits for a
        # connection (gloo's own connect timeout, 75 s, not --dist_timeout) until srun ends it
        # 30 s later (--wait=30). Having read why, the user cancels the job.
        if failed in log and not cancelled:
            cancelled.append(slurm.run("scancel", "--name", "alora-train"))

    _, log = slurm.watch(TWO_NODES, *RUN, "--output_dir", str(output_dir), output=log_file,
                         env=env, every=cancel_once_explained, timeout=200)  # fmt: skip
    assert cancelled, log[-3000:]  # (sbatch --wait returns 0 for a cancelled job)
    errors = task_lines(log, "error: ")
    assert errors and all(len(e) == 1 for e in errors.values()), log[-3000:]
    for (line,) in errors.values():
        assert line.startswith(f"{failed} (rendezvous at node1:"), line
        assert "so gloo listened on the loopback interface" in line, line
        assert "set GLOO_SOCKET_IFNAME" in line, line
    assert "lost contact" not in log and "Traceback" not in log
    assert not output_dir.exists()


def lost_node_fault(kind: str, marker: Path, command: str | None = None) -> dict[str, str]:
    """The job environment that injects `kind` once (launch/faults.py): `marker` is created when
    it fires, so the requeued job, started with the same environment, runs clean."""
    fault = {"ALORA_DS_TEST_FAULT": kind, "ALORA_DS_TEST_FAULT_ONCE": str(marker)}
    return {**fault, "ALORA_DS_TEST_FAULT_RUN": command} if command else fault


def test_a_node_lost_mid_round_and_the_job_resumed_elsewhere_ends_as_if_nothing_happened(
    slurm, nodes, golden_run, tmp_path
):
    """One training job on two nodes, interrupted twice in the middle of an allocation round:

    1. node2's process is killed (SIGKILL) once round 1's scores are done: the process on node1
       says it lost contact and the job fails at once. The user resubmits it.
    2. The resubmitted job resumes; once round 2's scores are done node2's network is cut (its
       interface taken down while its process lives on). Both processes give up after
       --dist_timeout; Slurm declares node2 down and requeues the job, which resumes on node1
       and node3 (node2 is gone).

    Every launch says --resume_from_checkpoint auto (as a requeued job must). The end: bitwise
    the uninterrupted run's round files, losses, summary and adapters."""
    output_dir = tmp_path / "run"
    args = [*RUN, "--save_steps", "2", "--resume_from_checkpoint", "auto",
            "--output_dir", str(output_dir)]  # fmt: skip
    lost = "error: lost contact with another process"
    latest = output_dir / "checkpoints" / "latest"

    # 1. A process killed: the survivor notices at once, srun ends the job.
    killed, log_file = tmp_path / "killed", tmp_path / "job1.out"
    env = {**slurm.env, **lost_node_fault("kill@scoring:1@1", killed)}
    result = slurm.sbatch(TWO_NODES, *args, output=log_file, env=env)
    ended_after = time.time() - killed.stat().st_mtime
    log = log_file.read_text()
    assert result.returncode != 0, log[-3000:]
    assert "srun: error: node2: task 1: Killed" in log, log[-3000:]
    survivor = task_lines(log, "error: ").get(0, [])
    assert len(survivor) == 1 and survivor[0].startswith(lost), log[-3000:]
    assert ended_after < DIST_TIMEOUT, f"the job ended {ended_after:.0f} s after the kill"
    assert latest.read_text().strip() == "step_0000004"  # --save_steps 2; round 1 not done

    # 2. The job resubmitted; node2's network cut. sbatch --wait returns at the job's very end,
    # after Slurm's requeue: watch the log and the job meanwhile.
    cut, log_file = tmp_path / "cut", tmp_path / "job2.out"
    ip_down = f"{shutil.which('ip')} link set {IFNAME} down"
    env = {**slurm.env, **lost_node_fault("run@scoring:2@1", cut, ip_down)}
    seen: dict[str, float] = {}  # event -> when the test saw it

    def note(log: str) -> None:
        if "survivor" not in seen and f"0: {lost}" in log:
            seen["survivor"] = time.time()
        if "requeued" not in seen and slurm.job().get("Restarts", "0") != "0":
            seen["requeued"] = time.time()

    try:
        code, log = slurm.watch(TWO_NODES, *args, output=log_file, env=env, every=note)
    finally:
        nodes.link("node2", "up")  # and node2 comes back (ReturnToService=2)
        slurm.run("scontrol", "update", "NodeName=node2", "State=RESUME")
    assert code == 0, log[-4000:]
    cut_at = cut.stat().st_mtime
    assert "survivor" in seen and "requeued" in seen, (seen, log[-4000:])
    survivor_after, requeued_after = seen["survivor"] - cut_at, seen["requeued"] - cut_at
    # The survivor waits --dist_timeout for node2 (gloo says so), then exits; the job ends
    # when Slurm gives node2 up.
    assert survivor_after < DIST_TIMEOUT + 5, f"the survivor gave up {survivor_after:.0f} s later"
    assert f"Timed out waiting {DIST_TIMEOUT * 1000}ms" in log, log[-4000:]
    assert requeued_after < DIST_TIMEOUT + 60, f"requeued {requeued_after:.0f} s after the cut"
    assert "DUE TO NODE FAILURE" in log, log[-4000:]
    # Two starts in one log (--open-mode=append): node1 and node2, then node1 and node3, which
    # resumed from the last checkpoint before the cut.
    starts = re.findall(r"^job \d+( \(requeued 1\))?: 2 tasks on 2 node\(s\) \((\S+)\)", log, re.M)
    assert starts == [("", "node[1-2]"), (" (requeued 1)", "node[1,3]")], log[-4000:]
    resumed = re.search(r"^0: resumed from \S+step_0000006 at step 6, round 1$", log, re.M)
    assert resumed, log[-4000:]
    reference, _ = golden_run("alora-2p")
    assert outputs(output_dir) == outputs(reference)
    wait_for(lambda: slurm.run("sinfo", "-h", "-o", "%T").stdout.split() == ["idle"], 60,
             "node2 did not come back", [slurm.directory / "slurmctld.log"])  # fmt: skip


def test_a_job_with_more_tasks_than_the_batch_allows_fails_in_one_line_per_task(slurm, tmp_path):
    # The ds config fixes train_batch_size = 4: one process's worth of micro batch 4. With 2 tasks
    # every task stops before any training starts, and sbatch --wait returns the job's status.
    fixed_batch = tmp_path / "batch4.json"
    zero3 = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    fixed_batch.write_text(json.dumps({**zero3, "train_batch_size": 4}))
    output_dir, log_file = tmp_path / "run", tmp_path / "job.out"
    result = slurm.sbatch(ONE_NODE_TWO_TASKS, *RUN, "--ds_config", str(fixed_batch),
                          "--output_dir", str(output_dir), output=log_file, timeout=200)  # fmt: skip
    log = log_file.read_text()
    assert result.returncode != 0, log[-3000:]
    # Both tasks on one node, each with its own local rank (the GPU it would take).
    assert task_lines(log, "task SLURM_PROCID=") == {
        0: ["task SLURM_PROCID=0 of 2 on node1, SLURM_LOCALID=0"],
        1: ["task SLURM_PROCID=1 of 2 on node1, SLURM_LOCALID=1"],
    }, log[-3000:]
    message = (
        f"error: ds config {fixed_batch}: train_batch_size = 4 but the run has train_batch_size = 8 "
        '(micro batch 4 x accumulation 1 x 2 processes = 8); set it to "auto" or make them agree'
    )
    # Process 0 says it once; every task exits with the input-error status.
    assert task_lines(log, "error: ") == {0: [message]}, log[-3000:]
    # srun: "tasks 0-1: Exited with exit code 2", or one line per task
    exits = re.findall(r"srun: error: node1: tasks? ([\d,-]+): Exited with exit code (\d+)", log)
    assert sorted(exits) in ([("0", "2"), ("1", "2")], [("0-1", "2")]), log[-3000:]
    assert "Traceback" not in log
    assert not output_dir.exists()


def test_eval_sbatch_scores_each_task_and_fails_the_job_for_the_one_that_failed(
    slurm, golden_run, tmp_path
):
    """launch/slurm/eval.sbatch as the README submits it (TASKS=..., base, adapter, data
    directory, output directory, eval.score options), on a CPU node with NPROC=2: the tasks one
    after another, each data parallel over two processes. A task without a test file is skipped
    with a warning; a task that fails fails the job once every task has had its turn."""
    run_dir, result = golden_run("alora-2p")
    assert result.returncode == 0, result.stderr[-3000:]
    data, output_dir, log_file = tmp_path / "data", tmp_path / "eval", tmp_path / "job.out"
    (data / "sst2").mkdir(parents=True)
    test_rows = (REPO / "alora_ds/data/samples/sst2/test.jsonl").read_text()
    (data / "sst2" / "test.jsonl").write_text(test_rows)
    (data / "e2e").mkdir()
    (data / "e2e" / "test.jsonl").write_text('{"meaning_representation": \n')  # not JSON
    job = ["--partition", PARTITION, "--nodes", "1", "--gpus-per-node", "0", "--cpus-per-task",
           "2", "--time", "10"]  # fmt: skip
    env = {**slurm.env, "TASKS": "sst2 rte e2e", "NPROC": "2"}
    result = slurm.sbatch(
        job, str(run_dir / "base_model"), str(run_dir / "adapter"), str(data), str(output_dir),
        "--decoding", "greedy", output=log_file, env=env, template="eval.sbatch", timeout=300,
    )  # fmt: skip
    log = log_file.read_text() if log_file.exists() else ""
    assert result.returncode != 0, log[-3000:]  # e2e failed
    assert re.search(r"^job \d+: 2 process\(es\) per task on node1; tasks: sst2 rte e2e$", log,
                     re.M), log[-3000:]  # fmt: skip
    assert f"warning: {data}/rte/test.jsonl does not exist; skipping rte" in log
    assert "e2e/test.jsonl row 1: not valid JSON" in log, log[-3000:]
    assert log.rstrip().endswith("error: scoring failed for: e2e"), log[-3000:]
    # sst2 was scored by both processes: every test row once, and its metrics.
    predictions = [json.loads(line) for line in (output_dir / "sst2" / "predictions.jsonl")
                   .read_text().splitlines()]  # fmt: skip
    assert len(predictions) == len(test_rows.splitlines())
    assert len({p["id"] for p in predictions}) == len(predictions)
    metrics = json.loads((output_dir / "sst2" / "metrics.json").read_text())
    assert 0 <= metrics["accuracy"] <= 100
    assert not (output_dir / "rte").exists() and not (output_dir / "e2e" / "metrics.json").exists()


# ---- DeepSpeed hostfile launch through pdsh and ssh --------------------------------------------


@dataclass(frozen=True)
class Ssh:
    port: int
    env: dict[str, str]  # PDSH_SSH_ARGS_APPEND: the key and options pdsh's ssh must use


@pytest.fixture(scope="module")
def sshd(nodes):
    """sshd on node1 and node2 (not node3), with a throw-away host key and client key."""
    missing = [t for t in ("pdsh", "ssh", "ssh-keygen") if not shutil.which(t)]
    sshd = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
    if missing or sshd is None:
        unavailable(
            f"{', '.join(missing + ([] if sshd else ['sshd']))} not installed; "
            "`bash scripts/install_slurm.sh` installs pdsh and openssh-server"
        )
    # sshd refuses to start without its privilege-separation directory.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="alora-ssh-"))
    directory.chmod(0o700)
    for key in ("host_key", "id"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / key)], check=True
        )
    shutil.copy(directory / "id.pub", directory / "authorized_keys")
    port = free_port()
    options = (
        f"-i {directory}/id -F /dev/null -o StrictHostKeyChecking=no "
        "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes"
    )
    env = clean_env(PDSH_SSH_ARGS_APPEND=options)
    daemons: list[subprocess.Popen] = []
    try:
        for node in ("node1", "node2"):
            config = directory / f"sshd_{node}"
            config.write_text(
                f"Port {port}\nListenAddress {nodes.addresses[node]}\nHostKey {directory}/host_key\n"
                f"PidFile {directory}/sshd_{node}.pid\nAuthorizedKeysFile {directory}/authorized_keys\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
                "PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\n"
            )  # fmt: skip
            with (directory / f"sshd_{node}.log").open("w") as out:
                daemons.append(subprocess.Popen(nodes.on(node, sshd, "-D", "-e", "-f", str(config)),
                                                stdout=out, stderr=out))  # fmt: skip
            probe = nodes.on("node1", "ssh", *options.split(), "-p", str(port), node, "true")
            wait_for(lambda p=probe: subprocess.run(p, capture_output=True).returncode == 0, 30,
                     f"sshd on {node} did not accept the test key",
                     [directory / f"sshd_{node}.log"])  # fmt: skip
        yield Ssh(port, env)
    finally:
        for daemon in daemons:
            stop(daemon)
        shutil.rmtree(directory, ignore_errors=True)


def test_hostfile_launch_over_pdsh_to_two_nodes(sshd, nodes, golden_run, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    # The processes start in fresh ssh sessions: DeepSpeed passes them the variables listed in
    # .deepspeed_env (read from the launch directory), as a multi-node user would.
    (tmp_path / ".deepspeed_env").write_text(
        f"HF_HUB_OFFLINE=1\nHF_DATASETS_OFFLINE=1\nDS_ACCELERATOR=cpu\nGLOO_SOCKET_IFNAME={IFNAME}\n"
    )
    # From node1, as a user on the launching node: first the check, then the launch.
    check = subprocess.run(
        nodes.on("node1", sys.executable, "-m", "launch.hostfile_check", str(hostfile),
                 "--ssh_port", str(sshd.port)),
        cwd=REPO, env=sshd.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == f"hostfile {hostfile}: 2 host(s), 2 slots, all reachable by ssh"

    output_dir = tmp_path / "run"
    result = subprocess.run(
        nodes.on("node1", DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh_check",
                 "--master_addr", "node1", "--master_port", str(free_port()), "--launcher", "pdsh",
                 "--ssh_port", str(sshd.port), str(REPO / "launch" / "train.py"),
                 *RUN, "--output_dir", str(output_dir)),
        cwd=tmp_path, env=sshd.env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "node1: alora-ds: alora on sst2, 2 process(es), ZeRO stage 3" in output
    assert re.search(r"^node2: .*Process \d+ exits successfully", output, re.M), output[-3000:]
    reference, _ = golden_run("alora-2p")
    assert outputs(output_dir) == outputs(reference)


def test_hostfile_check_names_the_host_it_cannot_reach(sshd, nodes, tmp_path):
    hostfile = tmp_path / "hostfile"
    # node3 is up but runs no sshd: refused at once.
    hostfile.write_text("# two nodes\nnode1 slots=1\n\nnode3 slots=1\n")
    result = subprocess.run(
        nodes.on("node1", sys.executable, "-m", "launch.hostfile_check", str(hostfile),
                 "--ssh_port", str(sshd.port), "--timeout", "5"),
        cwd=REPO, env=sshd.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    err = result.stderr.strip()
    assert result.returncode == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: hostfile {hostfile} line 4: cannot ssh to 'node3': ")
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
