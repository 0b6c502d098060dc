"""Nothing lost: runs killed at any point and resumed end exactly where an uninterrupted run ends.

Every run here is the real `deepspeed launch/train.py` with 2 CPU processes under ZeRO-3; the
faults are real too (SIGKILL, an exception, a file-size limit that makes the checkpoint write
fail with an OSError), triggered at a chosen point through ALORA_DS_TEST_FAULT.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from alora_ds.errors import run_cli
from launch import train
from tests.helpers import OFFLINE, REPO, SMALL_RUN, free_port, read_rounds, run_train

# 15 optimizer steps: rounds after steps 5 and 7, checkpoints every 2 steps and at each round.
RUN = [*SMALL_RUN, "--save_steps", "2", "--progress_bar", "false", "--report_to", "none"]
ENV = dict(os.environ, **OFFLINE)
# A checkpoint being written: `.step_NNNNNNN.tmp-XXXX` beside the finished ones.
TEMPORARY = ".step_*.tmp-*"


def launch(output_dir: Path, *args: str, fault: str | None = None, procs: int = 2):
    env = {"ALORA_DS_TEST_FAULT": fault} if fault else {}
    return run_train(output_dir, *args, procs=procs, env=env, base=RUN, timeout=300)


def latest(output_dir: Path) -> str:
    return (output_dir / "checkpoints" / "latest").read_text().strip()


def adapter(output_dir: Path) -> dict:
    return load_file(output_dir / "adapter" / "adapter_model.safetensors")


def logged_losses(output_dir: Path) -> dict[int, float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    result = launch(out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_killed_anywhere_and_resumed_ends_like_an_uninterrupted_run(reference, tmp_path):
    """One run, interrupted six times: SIGKILL before its first checkpoint, during K1, during
    K2, during round 2's scoring and half-way through a checkpoint write, then a full disk while
    writing a checkpoint. Every launch, the first included, says `--resume_from_checkpoint auto`
    (as a requeued Slurm job does) and goes on from the checkpoint the last one left."""
    out = tmp_path / "run"
    chain = [
        ("kill@step:1", None),  # nothing saved yet: the next launch starts from scratch
        ("kill@step:3", "step_0000002"),  # during K1 (first round after step 5)
        ("kill@step:6", "step_0000005"),  # during K2: the round-1 checkpoint survives
        ("kill@scoring:2", "step_0000006"),  # round 2's ablations done, nothing applied
        ("kill@save:10", "step_0000008"),  # half-written step 10: the temp dir is not listed
        ("disk@save:12", "step_0000010"),  # the write fails; step 10 stays loadable
    ]
    for fault, left in chain:
        result = launch(out, "--resume_from_checkpoint", "auto", fault=fault)
        assert result.returncode != 0, f"{fault}: the run did not fail"
        if left is None:
            assert not (out / "checkpoints").exists()
            continue
        assert latest(out) == left, fault
        assert ("resumed from" in result.stdout) == (left != "step_0000002"), fault
        assert list((out / "checkpoints").glob(TEMPORARY)) == [] or fault == "kill@save:10"
        if fault.startswith("disk"):
            message = result.stderr.strip().splitlines()
            assert any(
                "could not write the checkpoint of step 12" in line and left in line
                for line in message
            ), result.stderr[-2000:]
        # Whatever was written so far agrees with the uninterrupted run.
        assert read_rounds(out) == read_rounds(reference)[: len(read_rounds(out))]
    result = launch(out, "--resume_from_checkpoint", "auto")
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


def copy_of(reference: Path, tmp_path: Path, step: str) -> Path:
    """The reference run's output directory, as if it had been stopped after checkpoint `step`."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for checkpoint in (out / "checkpoints").glob("step_*"):
        if checkpoint.name > step:
            shutil.rmtree(checkpoint)
    (out / "checkpoints" / "latest").write_text(step + "\n")
    return out


def test_resume_with_a_different_process_count(reference, tmp_path):
    """A 2-process checkpoint resumed by 1 process (accumulation 2 keeps the global batch): the
    plan and adapters are reloaded; only the order of floating-point sums differs."""
    out = copy_of(reference, tmp_path, "step_0000012")
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
def test_resume_refuses_what_would_change_the_run(reference, tmp_path, capsys, change, message):
    """Checked before any process starts; the checkpoints are left as they were."""
    out = copy_of(reference, tmp_path, "step_0000012")
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
    """Two processes started the way srun starts them: nobody kills the survivor for us."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(
            ENV, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port, ALORA_DS_TEST_FAULT=fault,
        )  # fmt: skip
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(REPO / "launch/train.py"),
                    "--ds_config",
                    str(REPO / "ds_configs/zero3.json"),
                    "--output_dir",
                    str(output_dir),
                    *RUN,
                    "--dist_timeout",
                    str(timeout_s),
                ],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
        )
    return procs


def test_one_process_failing_ends_every_process_without_a_hang(tmp_path):
    timeout_s = 30
    runs = {
        fault: start_without_launcher(tmp_path / fault.split("@")[0], fault, timeout_s)
        for fault in ("raise@step:2@1", "kill@step:2@1")
    }
    for fault, procs in runs.items():
        outputs = []
        for proc in procs:
            started = time.monotonic()
            try:
                _, err = proc.communicate(timeout=timeout_s + 60)
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                pytest.fail(f"{fault}: a process was still running {timeout_s + 60}s later")
            outputs.append(err)
            assert proc.returncode != 0, fault
            assert time.monotonic() - started < timeout_s + 60
        survivor = outputs[0].strip().splitlines()[-1]
        assert survivor.startswith("error: lost contact with another process"), survivor


def test_nonfinite_loss_stops_or_is_skipped(tmp_path):
    result = launch(tmp_path / "stop", "--method", "lora", fault="nan@step:5@1")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "the loss is not finite at step 5" in last and "step_0000004" in last, last

    out = tmp_path / "skip"
    result = launch(out, "--method", "lora", "--skip_nonfinite", fault="nan@step:5@1")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[4]["step"] == 5 and records[4]["loss"] is None
    assert records[-1]["skipped_steps"] == 1
    assert all(r["loss"] is not None for r in records if r["step"] != 5)
