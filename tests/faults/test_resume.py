"""Nothing lost: runs killed at any point and resumed end exactly where an uninterrupted run ends.

Every run here is the real `deepspeed launch/train.py` with 2 CPU processes under ZeRO-3; the
faults are real too (SIGKILL, an exception, a NaN loss, a rebuilt adapter perturbed on one
process, a file-size limit that makes the checkpoint write fail with an OSError), triggered at a
chosen point through ALORA_DS_TEST_FAULT.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.torch import load_file

from alora_ds.errors import run_cli
from launch import train
from tests.golden.record import run_args
from tests.helpers import OFFLINE, REPO, free_port, read_rounds, run_train

# The golden run alora-2p (tests/golden/record.py), checkpointed: 15 optimizer steps, rounds
# after steps 5 and 7, checkpoints every 2 steps and at each round. Checkpoints change nothing it
# computes, so the uninterrupted run it must end like is the session's golden run.
RUN = [*run_args("alora"), "--save_steps", "2"]
ENV = dict(os.environ, **OFFLINE)
# A checkpoint being written: `.step_NNNNNNN.tmp-XXXX` beside the finished ones.
TEMPORARY = ".step_*.tmp-*"


def launch(output_dir: Path, *args: str, fault: str | None = None, procs: int = 2):
    env = {"ALORA_DS_TEST_FAULT": fault} if fault else {}
    return run_train(output_dir, *args, procs=procs, env=env, base=RUN, timeout=300)


def latest(output_dir: Path) -> str | None:
    path = output_dir / "checkpoints" / "latest"
    return path.read_text().strip() if path.is_file() else None


def adapter(output_dir: Path) -> dict:
    return load_file(output_dir / "adapter" / "adapter_model.safetensors")


def logged_losses(output_dir: Path) -> dict[int, float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.fixture
def reference(golden_run) -> Path:
    out, result = golden_run("alora-2p")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


# One run stopped six times, each launch going on from the checkpoint the last one left:
# (fault, the checkpoint `latest` names afterwards, whether the launch resumed from one).
CHAIN = [
    ("kill@step:1", None, False),  # SIGKILL before the first checkpoint: the next starts afresh
    ("corrupt@round:1@1", "step_0000004", False),  # K1's checkpoints; round 1's plans disagree
    ("nan@step:6@1", "step_0000005", True),  # during K2: a NaN loss; round 1's checkpoint stays
    ("kill@scoring:2", "step_0000006", True),  # round 2's ablations done, nothing applied
    ("kill@save:10", "step_0000008", True),  # half-written step 10: the temp dir is not listed
    ("disk@save:12", "step_0000010", True),  # the write fails; step 10 stays loadable
]


@dataclass(frozen=True)
class Link:
    """One launch of the chain and what it left in the output directory."""

    fault: str | None
    result: subprocess.CompletedProcess
    seconds: float
    latest: str | None
    rounds: list[dict]
    temporary: list[Path]


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> tuple[Path, list[Link]]:
    """Every launch of CHAIN, then a last one without a fault, on one output directory; each
    says `--resume_from_checkpoint auto`, as a requeued Slurm job does."""
    out = tmp_path_factory.mktemp("chain") / "run"
    links = []
    for fault in [*(f for f, _, _ in CHAIN), None]:
        started = time.monotonic()
        result = launch(out, "--resume_from_checkpoint", "auto", fault=fault)
        seconds = time.monotonic() - started
        temporary = list((out / "checkpoints").glob(TEMPORARY))
        links.append(Link(fault, result, seconds, latest(out), read_rounds(out), temporary))
    return out, links


def test_killed_anywhere_and_resumed_ends_like_an_uninterrupted_run(chain, reference):
    """One run, stopped six times: SIGKILL before its first checkpoint; processes that disagree on
    round 1's adapters; a NaN loss during K2; SIGKILL during round 2's scoring and half-way
    through a checkpoint write; then a full disk while writing a checkpoint. The last launch
    ends with the uninterrupted run's round files, losses and (bitwise) adapter."""
    out, links = chain
    for (fault, left, resumed), link in zip(CHAIN, links, strict=False):
        result = link.result
        output = f"{fault}: " + result.stdout[-2000:] + result.stderr[-2000:]
        assert result.returncode != 0, output
        assert link.latest == left, output
        assert ("resumed from" in result.stdout) == resumed, fault
        assert link.temporary == [] or fault == "kill@save:10", fault
        # Whatever was written so far agrees with the uninterrupted run.
        assert link.rounds == read_rounds(reference)[: len(link.rounds)], fault
    stops = {link.fault: link for link in links}
    # A failed checkpoint write names the step and the checkpoint left to resume from.
    disk = stops["disk@save:12"].result.stderr.strip().splitlines()
    assert any(
        "could not write the checkpoint of step 12" in line and "step_0000010" in line
        for line in disk
    ), disk[-5:]
    # Processes that disagree on a rebuilt adapter stop, each naming the module, at once; the
    # round is not written.
    mismatch = stops["corrupt@round:1@1"]
    message = (
        "after round 1, process 1 disagrees with process 0 on module "
        "model.layers.0.self_attn.q_proj"
    )
    output = mismatch.result.stdout + mismatch.result.stderr
    assert output.count(message) >= 2, output[-3000:]  # raised by both processes
    assert mismatch.seconds < 120 and mismatch.rounds == []
    # A non-finite loss stops every process: exit status 1, the step and the last good
    # checkpoint named in the last line.
    nan = stops["nan@step:6@1"].result
    assert nan.returncode == 1
    last = nan.stderr.strip().splitlines()[-1]
    assert "the loss is not finite at step 6" in last and "step_0000005" in last, last

    result = links[-1].result
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "step_0000010" in result.stdout
    assert read_rounds(out) == read_rounds(reference)  # the same plans from the same scores
    summary, expected_summary = (
        json.loads((d / "summary.json").read_text()) for d in (out, reference)
    )
    assert summary["ranks_by_type"] == expected_summary["ranks_by_type"]
    # Each process counts its own tokens and only process 0's state is saved: counted once.
    assert summary["tokens"] == expected_summary["tokens"]
    assert not list((out / "checkpoints").glob(TEMPORARY))  # the half-written one was cleared
    expected, got = adapter(reference), adapter(out)
    assert expected.keys() == got.keys()
    for key in expected:  # bitwise: fp32 masters and Adam moments are restored exactly
        assert (expected[key] == got[key]).all(), key
    assert logged_losses(out) == logged_losses(reference)  # one line per step, same losses
    assert len(list((out / "checkpoints").glob("step_*"))) == 2  # save_total_limit


def copy_of(chain, tmp_path: Path, step: str) -> Path:
    """The chain's output directory (at its end the uninterrupted run's, checkpoints included),
    as if the run had been stopped after checkpoint `step`."""
    out = tmp_path / "run"
    shutil.copytree(chain[0], out)
    for checkpoint in (out / "checkpoints").glob("step_*"):
        if checkpoint.name > step:
            shutil.rmtree(checkpoint)
    (out / "checkpoints" / "latest").write_text(step + "\n")
    return out


def test_resume_with_a_different_process_count(chain, reference, tmp_path):
    """A 2-process checkpoint resumed by 1 process (accumulation 2 keeps the global batch): the
    plan and adapters are reloaded; only the order of floating-point sums differs."""
    out = copy_of(chain, tmp_path, "step_0000012")
    result = launch(
        out, "--resume_from_checkpoint", "auto", "--gradient_accumulation_steps", "2", procs=1
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "re-seeded" in result.stdout
    assert read_rounds(out) == read_rounds(reference)
    expected, got = adapter(reference), adapter(out)
    for key in expected:
        assert (expected[key] - got[key]).abs().max() <= 1e-4 * (1 + expected[key].abs().max())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--learning_rate", "1e-3"], "cannot resume: --learning_rate is 0.001 but the run in"),
        (["--seed", "7"], "cannot resume: --seed is 7"),
        ([], "cannot resume: the global batch is 4 but the run was started with 8"),
    ],
)
def test_resume_refuses_what_would_change_the_run(chain, tmp_path, capsys, change, message):
    """Checked before any process starts; the checkpoints are left as they were."""
    out = copy_of(chain, tmp_path, "step_0000012")
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    argv = ["--ds_config", str(REPO / "ds_configs/zero3.json"), "--output_dir", str(out), *RUN,
            "--resume_from_checkpoint", "auto", *change]  # fmt: skip
    env = {"WORLD_SIZE": "2"} if change else {}  # the launcher's world; [] resumes with 1
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        assert run_cli(train.main, argv) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def start_without_launcher(output_dir: Path, fault: str, timeout_s: int) -> list:
    """Two processes started the way srun starts them: nobody kills the survivor for us. Their
    stderr goes to output_dir.stderr.RANK."""
    port = str(free_port())
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(2):
        env = dict(
            ENV, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port, ALORA_DS_TEST_FAULT=fault,
        )  # fmt: skip
        command = [sys.executable, str(REPO / "launch/train.py"), "--ds_config",
                   str(REPO / "ds_configs/zero3.json"), "--output_dir", str(output_dir), *RUN,
                   "--dist_timeout", str(timeout_s)]  # fmt: skip
        with open(f"{output_dir}.stderr.{rank}", "w") as err:
            procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                          stderr=err))  # fmt: skip
    return procs


def test_one_process_failing_ends_every_process_within_dist_timeout(tmp_path):
    """Process 1 raises, or is killed, after step 2: process 0 exits with the lost-contact line
    within --dist_timeout of process 1's end (the README's promise), not after a hang."""
    timeout_s = 30
    runs = {
        fault: start_without_launcher(tmp_path / fault.split("@")[0], fault, timeout_s)
        for fault in ("raise@step:2@1", "kill@step:2@1")
    }
    deadline = time.monotonic() + 240  # start-up of 4 processes on 2 cores, then the faults
    ended: dict[tuple[str, int], float] = {}
    while len(ended) < 4 and time.monotonic() < deadline:
        for fault, procs in runs.items():
            for rank, proc in enumerate(procs):
                if (fault, rank) not in ended and proc.poll() is not None:
                    ended[fault, rank] = time.monotonic()
        time.sleep(0.2)
    for procs in runs.values():
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for fault, procs in runs.items():
        assert all((fault, rank) in ended for rank in (0, 1)), f"{fault}: a process hung"
        assert [proc.returncode != 0 for proc in procs] == [True, True], fault
        waited = ended[fault, 0] - ended[fault, 1]
        assert waited < timeout_s, f"{fault}: process 0 ended {waited:.1f} s after process 1"
        err = (tmp_path / f"{fault.split('@')[0]}.stderr.0").read_text().strip().splitlines()
        assert err[-1].startswith("error: lost contact with another process"), err[-5:]
