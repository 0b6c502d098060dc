"""Training runs shared by the launch tests: each golden configuration (tests/golden) is
launched once per session, and every test that checks something of that run reads its output."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.golden.record import RUNS, run_args
from tests.helpers import run_train

GoldenRun = Callable[[str], tuple[Path, subprocess.CompletedProcess]]


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
