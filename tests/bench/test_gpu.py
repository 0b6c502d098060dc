"""bench/gpu.py: the FLOP count, the micro-batch search, the round's time limit, and the whole
script at its smoke size (a tiny LLaMA on CPU through every code path the GPU run takes)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from alora_ds.config import TrainConfig
from alora_ds.errors import InputError, RunFailure
from tests.helpers import OFFLINE, REPO

_spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "gpu.py")
gpu = importlib.util.module_from_spec(_spec)
sys.modules["bench_gpu"] = gpu  # dataclasses look their module up while the file runs
_spec.loader.exec_module(gpu)


def test_frozen_matmul_params_of_llama2_7b():
    # LLaMA-2-7B has 6,738,415,616 parameters: less the embedding (32000 x 4096) and the 65
    # RMSNorm weights (4096 each), the rest are the matmul weights the FLOP count multiplies by.
    shape = gpu.ModelShape.of(gpu.LlamaConfig(**gpu.LLAMA2_7B))
    assert shape.frozen_matmul_params == 6_738_415_616 - 32000 * 4096 - 65 * 4096


def test_step_flops_pinned_on_the_tiny_llama():
    # L 2, h 64, h_kv 32, f 128, V 128: P = 2 (64^2 + 2*64*32 + 64^2 + 3*64*128) + 128*64 =
    # 81920; rank 2 on 14 modules: A = 2 * 2 * 1024 = 4096; N = 4 x 64 = 256 tokens.
    shape = gpu.ModelShape.of(gpu.LlamaConfig(**gpu.TINY))
    flops = gpu.step_flops(shape, adapter_params=4096, micro=4, seq=64)
    assert flops == {
        "frozen_forward": 2 * 81920 * 256,  # 41,943,040
        "input_gradients": 2 * 81920 * 256 - 2 * 256 * 64 * (64 + 64 + 256),  # 29,360,128
        "adapters": 6 * 4096 * 256,  # 6,291,456
        "attention": 6 * 2 * 4 * 64**2 * 64,  # 12,582,912
        "total": 90_177_536,
    }


def test_largest_fitting_doubles_then_bisects():
    calls = []

    def fits(b: int) -> bool:
        calls.append(b)
        return b <= 11

    assert gpu.largest_fitting(fits, 256)[0] == 11
    assert calls == [256, 1, 2, 4, 8, 16, 12, 10, 11]
    best, tried = gpu.largest_fitting(lambda b: b <= 11, 11)
    assert (best, tried) == (11, [[11, True]])
    assert gpu.largest_fitting(lambda b: b <= 7, 12)[0] == 7
    with pytest.raises(RunFailure, match="not even a micro-batch of 1 fits"):
        gpu.largest_fitting(lambda b: False, 8)


def test_an_out_of_memory_error_means_the_batch_does_not_fit():
    def step() -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert gpu.trial_fits(step, torch.device("cpu"), 0.9) is False
    assert gpu.trial_fits(lambda: None, torch.device("cpu"), 0.9) is True


def test_the_round_clock_stops_a_round_only_past_its_limit():
    clock = gpu.RoundClock(limit_s=3600.0)
    with clock(10) as advance:
        advance(4)
        advance(6)
    assert clock.fraction == 1.0
    clock = gpu.RoundClock(limit_s=0.0)
    with pytest.raises(gpu.RoundCut), clock(10) as advance:
        advance(4)
    assert clock.fraction == 0.4
    clock = gpu.RoundClock(limit_s=0.0)  # a mode that reports once, at the end, is cut there
    with pytest.raises(gpu.RoundCut), clock(10) as advance:
        advance(10)
    assert clock.fraction == 1.0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--memory_fraction", "0"], r"--memory_fraction must be in \(0, 1\], got 0.0"),
        (["--memory_fraction", "1.5"], r"--memory_fraction must be in \(0, 1\], got 1.5"),
        (["--round_limit_s", "-1"], r"--round_limit_s and --deadline_s must be >= 0"),
        (["--scoring", "exact"], r"argument --scoring: invalid choice: 'exact'"),
    ],
)
def test_bad_options_are_one_line_errors(argv, message):
    with pytest.raises(InputError, match=message):
        gpu.parse_args(argv)


def test_smoke_run_goes_through_every_setup(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu.py"), "--smoke", "--json", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env=dict(os.environ, **OFFLINE, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["smoke"] and results["device"] == "cpu" and results["skipped"] == []
    assert results["scoring"] == TrainConfig().scoring  # the trainer's default at run time
    assert results["matmul_tflops"] > 0
    assert set(results["micro_batch"]) == {"64", "16"}
    assert all(m["chosen"] == gpu.SMOKE.max_micro_batch for m in results["micro_batch"].values())
    rows = {(r["seq_len"], r["method"], r["zero_stage"]): r for r in results["runs"]}
    assert list(rows) == [
        (64, "peft", None), (64, "lora", 2), (64, "alora", 2), (64, "lora", 3), (64, "alora", 3),
        (16, "peft", None), (16, "lora", 2), (16, "lora", 3),
    ]  # fmt: skip
    for row in rows.values():
        assert "error" not in row, row
        assert row["micro_batch"] == 4 and row["step_s"] > 0 and row["tokens_per_s"] > 0
        assert 0 < row["mfu"] <= 1 and row["peak_memory_gib"] > 0
        assert row["flops_per_step"]["total"] == pytest.approx(
            row["model_tflops"] * 1e12 * row["step_s"]
        )
    # LoRA and peft train the same number of parameters (rank 2 on the 14 modules).
    assert rows[64, "peft", None]["adapter_params"] == rows[64, "lora", 3]["adapter_params"] == 4096
    complete, cut = rows[64, "alora", 2]["round"], rows[64, "alora", 3]["round"]
    assert complete["complete"] and complete["scored_fraction"] == 1.0
    assert complete["round_s"] > complete["scoring_s"] > 0
    # The smoke run cuts its ZeRO-3 round at its first progress report (all of it, for a mode
    # that reports once); the rebuild still runs.
    assert not cut["complete"] and 0 < cut["scored_fraction"] <= 1 and cut["round_s"] is None
    assert cut["scoring_estimate_s"] >= cut["scoring_s"]
    for round_ in (complete, cut):
        assert round_["b_val"] == [TrainConfig().val_examples, gpu.SMOKE.val_len]
        assert round_["pruned"] == round_["added"] == TrainConfig().prune_per_round
        assert round_["rebuild_s"] > 0 and round_["scoring_in_lora_steps"] > 0
    assert len(results["checks"]) == 10
    assert all(isinstance(c["met"], bool) and c["value"] > 0 for c in results["checks"])
    assert "seq method ZeRO micro" in result.stdout  # the table
