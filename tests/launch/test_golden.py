"""Behaviour kept: every method on 1 and 2 processes under ZeRO-3 produces what the trainer
produced before the redesign (tests/golden, recorded by tests/golden/record.py): the same round
files and scores, losses, final prune, summary, adapter config and metadata, bitwise on a
machine of the kind the goldens were recorded on (tensor sums to 1e-4 elsewhere).

The suite runs every method on 2 processes (the ZeRO-3 path, where the partitioned rebuild
lives) and LoRA and ALoRA on one; the other four one-process runs add about 80 s and no code
path the others miss, so they run with `tests/golden/record.py --check` (all 12 runs)."""

from __future__ import annotations

import json

import pytest

from tests.golden.record import GOLDEN, RUNS, compare, machine, outputs

IN_SUITE = sorted(name for name in RUNS if name.endswith("-2p") or name in ("lora-1p", "alora-1p"))


@pytest.mark.parametrize("name", IN_SUITE)
def test_the_run_equals_its_golden_outputs(golden_run, name):
    output_dir, result = golden_run(name)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    golden = json.loads((GOLDEN / f"{name}.json").read_text())
    problems = compare(golden, {"machine": machine(), **outputs(output_dir)})
    assert not problems, problems
