"""Shared fixtures. Tests never touch the network.

The launches several test packages read are made once per session: each golden training run
(tests/golden) and the 2-process Engine checks (tests/scripts/engine_checks.py); every test that
checks something of them reads their output."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# One intra-op thread, here and in every process a test starts: the tiny models gain nothing from
# more, two launched processes with two threads each oversubscribe two cores, and on a busy
# machine OpenMP's hand-offs between threads made the same work 10-25x slower. Thread counts do
# not change the golden runs' numbers (the Slurm tests' tasks run with one thread and match
# them bitwise).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from alora_ds.io.models import build_random_llama, tiny_llama_config  # noqa: E402
from tests.golden.record import RUNS, run_args  # noqa: E402
from tests.helpers import run_engine_checks, run_train, write_engine_check_inputs  # noqa: E402

GoldenRun = Callable[[str], tuple[Path, subprocess.CompletedProcess]]


@pytest.fixture
def tiny_model():
    """A seeded tiny LLaMA (hidden 64, 2 layers, vocab 128) in fp32."""
    return build_random_llama(tiny_llama_config(), seed=0)


@pytest.fixture(scope="session")
def golden_run(tmp_path_factory) -> GoldenRun:
    """golden_run("alora-2p") -> (output_dir, result) of that configuration, launched on first
    use: `deepspeed launch/train.py` (2 processes) or `python launch/train.py` (1), ZeRO-3."""
    done: dict[str, tuple[Path, subprocess.CompletedProcess]] = {}

    def launch(name: str) -> tuple[Path, subprocess.CompletedProcess]:
        if name not in done:
            method, procs = RUNS[name]
            output_dir = tmp_path_factory.mktemp(name) / "run"
            done[name] = output_dir, run_train(output_dir, *run_args(method), procs=procs, base=[])
        return done[name]

    return launch


@pytest.fixture(scope="session")
def engine_checks(tmp_path_factory) -> subprocess.CompletedProcess:
    """The one launch of tests/scripts/engine_checks.py (every check, 2 processes), with the
    single-process references it compares with written first."""
    directory = tmp_path_factory.mktemp("engine_checks")
    write_engine_check_inputs(directory)
    return run_engine_checks(directory)
