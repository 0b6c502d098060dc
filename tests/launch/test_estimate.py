"""launch/estimate.py: LLaMA-2 numbers, and the formulas against memory measured on tiny models.

How memory is measured here (CPU, no GPU): torch's profiler with profile_memory=True records
every allocation and free of torch's CPU allocator, with address and size. Replaying them gives
the bytes of tensors alive at each moment of the profiled region (what was allocated before it is
not counted); the peak is exact for what torch allocates, which RSS is not (glibc's allocator
keeps freed memory and rounds). A GPU run would read torch.cuda.max_memory_allocated instead;
the tensors are the same.

- A training step (forward + backward, plain torch, base frozen, LoRA on every linear) against
  `activation_bytes` and `checkpointed_activation_bytes`, fp32 and bf16.
- A no_grad forward with the loss (what scoring runs) against `nograd_forward_bytes`.
- ZeRO-3 with 2 processes (gloo): each process's share of the frozen weights, and the peak of a
  steady training step, against the whole estimate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from alora_ds.core.inject import inject_gated_lora
from alora_ds.errors import run_cli
from alora_ds.io.models import build_random_llama, tiny_llama_config
from launch import estimate as E
from tests.helpers import REPO, free_port

TOLERANCE = 0.25
# Big enough that every term of the formulas shows (the vocabulary's logits, the MLP, LoRA).
TINY = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, vocab_size=4096,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)  # fmt: skip
BATCH, SEQ, R = 2, 128, 4
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def live_bytes_timeline(prof) -> tuple[list[tuple[float, int]], list[dict]]:
    """(time, bytes alive) after every CPU allocation event of a finished profile, and the
    trace's events. Frees of memory allocated before profiling began are ignored."""
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = sorted(
        (e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
        key=lambda e: e["ts"],
    )
    live: dict[int, int] = {}
    total, timeline = 0, []
    for e in memory:
        address, size = e["args"]["Addr"], e["args"]["Bytes"]
        if size > 0:
            live[address] = size
            total += size
        elif address in live:
            total -= live.pop(address)
        timeline.append((e["ts"], total))
    return timeline, events


def peak_allocated(fn: Callable[[], object]) -> int:
    """The most bytes of tensors `fn` held alive at once."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    timeline, _ = live_bytes_timeline(prof)
    return max(total for _, total in timeline)


def tiny_model(dtype: torch.dtype, checkpointing: bool = False):
    config = tiny_llama_config(**TINY)
    model = build_random_llama(config, seed=0, dtype=dtype).train()
    inject_gated_lora(model, R * 7 * config.num_hidden_layers, dtype=dtype)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    shape = E.model_shape(config, R * 7 * config.num_hidden_layers)
    ids = torch.randint(
        3, config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0)
    )
    return model, shape, {"input_ids": ids, "labels": ids}


def assert_close(estimated: int, measured: int, what: str) -> None:
    assert abs(estimated - measured) <= TOLERANCE * measured, (
        f"{what}: estimated {estimated:,} B, measured {measured:,} B "
        f"({estimated / measured - 1:+.1%})"
    )


# ---- LLaMA-2 ------------------------------------------------------------------------------


def test_llama2_7b_shape_and_sharded_weights():
    shape = E.model_shape(E.load_model_config("meta-llama/Llama-2-7b-hf"))
    assert shape.total_params == 6_738_415_616
    # r_init = 8 on 7 modules x 32 layers: the paper's 20.0M adapter parameters.
    assert (shape.num_adapted, shape.r_init, shape.adapter_params) == (224, 8, 19_988_480)
    assert shape.largest_module_params == 32000 * 4096  # embed_tokens (and lm_head)
    for gpus in (1, 8):
        e = E.estimate(
            shape, nodes=1, gpus_per_node=gpus, zero_stage=3, seq_len=2048, micro_batch=1
        )
        assert e.frozen_weights == pytest.approx(13.48e9 / gpus, rel=1e-3)  # bf16, sharded
        assert e.optimizer_states == 19_988_480 * 12 // gpus
        assert e.gradient_bucket == 1e9  # DeepSpeed's default reduce bucket in bf16
        assert e.activations_checkpointed < e.activations / 5
        assert e.peak == max(e.training_peak, e.scoring_peak)
    # Paper's cost table: ALoRA on one A40 at 18.1 GB; one GPU, ZeRO-0, with checkpointing and a
    # modest sequence lands in that range.
    single = E.estimate(shape, nodes=1, gpus_per_node=1, zero_stage=0, seq_len=512, micro_batch=1)
    assert 13.5e9 < single.training_peak_checkpointed < 20e9
    # ZeRO-Offload moves the states to the CPU: the node holds the whole model once.
    offload = E.estimate(shape, nodes=2, gpus_per_node=8, zero_stage=3, seq_len=2048,
                         micro_batch=1, offload=True)  # fmt: skip
    assert offload.frozen_weights == offload.optimizer_states == 0
    assert offload.cpu_per_node == pytest.approx(13.48e9 / 2 + 19_988_480 * 20 / 2, rel=1e-3)


def test_llama2_70b_uses_grouped_query_attention():
    shape = E.model_shape(E.load_model_config("meta-llama/Llama-2-70b-hf"))
    assert (shape.heads, shape.kv_heads, shape.layers) == (64, 8, 80)
    assert shape.total_params == pytest.approx(68.98e9, rel=1e-3)


# ---- measured on tiny models -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "checkpointing"),
    [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)],
    ids=["fp32", "bf16", "fp32-checkpointing"],
)
def test_training_step_activations(dtype, checkpointing):
    model, shape, batch = tiny_model(dtype, checkpointing)

    def step():
        model(**batch).loss.backward()

    step()  # first call: lazy initialisations do not belong to the step
    model.zero_grad(set_to_none=True)
    measured = peak_allocated(step)
    d = dtype.itemsize
    formula = E.checkpointed_activation_bytes if checkpointing else E.activation_bytes
    assert_close(formula(shape, d, BATCH * SEQ), measured, f"activations {dtype} {checkpointing=}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nograd_forward_of_scoring(dtype):
    model, shape, batch = tiny_model(dtype)
    model.eval()

    def forward():
        with torch.no_grad():
            model(**batch)

    forward()
    measured = peak_allocated(forward)
    assert_close(
        E.nograd_forward_bytes(shape, dtype.itemsize, BATCH * SEQ), measured, "no_grad forward"
    )


# A small reduce bucket, so that DeepSpeed's 2 GB default does not hide the other terms.
ZERO3_REDUCE_BUCKET = 1_000_000


def zero3_worker(out_dir: str) -> None:
    """Run in each of 2 processes (see the test below): for fp32 and bf16, ZeRO-3 over a tiny
    LLaMA with LoRA for two training steps, the second one measured (the first records ZeRO-3's
    prefetch trace); writes out_dir/<dtype>-rank<R>.json."""
    from alora_ds.runtime import process as P

    P.init_distributed(timeout_s=300)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        result = measure_zero3_step(dtype)
        Path(out_dir, f"{name}-rank{result['rank']}.json").write_text(json.dumps(result))


def measure_zero3_step(dtype: torch.dtype) -> dict:
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    ds_config = {
        "train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
        "train_batch_size": BATCH * world, "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                              "stage3_param_persistence_threshold": 0,
                              "reduce_bucket_size": ZERO3_REDUCE_BUCKET},
        "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10**9,
    }  # fmt: skip
    config = tiny_llama_config(**{**TINY, "num_hidden_layers": 4})
    keep_alive = HfDeepSpeedConfig(ds_config)  # partition the weights as they are created
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    del keep_alive
    unset_hf_deepspeed_config()
    inject_gated_lora(model, R * 7 * config.num_hidden_layers, dtype=dtype)
    # The frozen shards were allocated before profiling starts: read their sizes directly.
    shards = sum(
        p.ds_tensor.numel() * p.ds_tensor.element_size()
        for p in model.parameters()
        if not p.requires_grad
    )
    ids = torch.randint(
        3, config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(rank)
    )
    batch = {"input_ids": ids, "labels": ids}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        for step in range(2):
            with record_function(f"step{step}"):
                loss = engine(**batch).loss
                engine.backward(loss)
                engine.step()
                del loss
    timeline, events = live_bytes_timeline(prof)
    start, end = next(
        (e["ts"], e["ts"] + e["dur"])
        for e in events
        if e.get("name") == "step1" and e.get("ph") == "X"
    )
    before = [total for ts, total in timeline if ts < start]
    during = [total for ts, total in timeline if start <= ts <= end]
    engine.destroy()
    return {"rank": rank, "shards": shards, "step_start": before[-1], "step_peak": max(during)}


def test_zero3_two_processes(tmp_path):
    """Each process's measured peak over a steady training step: frozen shard + adapter states +
    gradient bucket + gathered weights + activations, as the estimator adds them."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(free_port()), __file__, str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    config = tiny_llama_config(**{**TINY, "num_hidden_layers": 4})
    shape = E.model_shape(config, R * 7 * config.num_hidden_layers)
    for dtype, rank in [(dtype, rank) for dtype in ("fp32", "bf16") for rank in (0, 1)]:
        e = E.estimate(shape, nodes=1, gpus_per_node=2, zero_stage=3, seq_len=SEQ,
                       micro_batch=BATCH, dtype=dtype, reduce_bucket=ZERO3_REDUCE_BUCKET)  # fmt: skip
        measured = json.loads((tmp_path / f"{dtype}-rank{rank}.json").read_text())
        assert measured["shards"] == e.frozen_weights  # exactly half the frozen model
        assert_close(
            e.training_peak, measured["shards"] + measured["step_peak"], f"{dtype} rank {rank} peak"
        )
        assert_close(e.gathered_weights + e.activations, measured["step_peak"] - measured["step_start"],
                     f"{dtype} rank {rank} step")  # fmt: skip


# ---- command line ---------------------------------------------------------------------------


def test_command_line_table_and_json(tmp_path, capsys):
    out = tmp_path / "e.json"
    argv = ["--model_name_or_path", "meta-llama/Llama-2-13b-hf", "--nodes", "2", "--gpus_per_node", "8",
            "--zero_stage", "3", "--rank_budget", "2240", "--seq_len", "2048", "--micro_batch", "2",
            "--json", str(out)]  # fmt: skip
    assert run_cli(E.main, argv) == 0
    table = capsys.readouterr().out
    assert "ZeRO-3, bf16, micro batch 2 x 2048 tokens" in table and "peak per GPU" in table
    data = json.loads(out.read_text())
    assert data["shape"]["adapter_params"] == 8 * 40 * (4 * 2 * 5120 + 3 * (5120 + 13824))
    assert data["bytes"]["frozen_weights"] == data["shape"]["total_params"] * 2 // 16
    assert f"{data['bytes']['peak'] / 1e9:9.3f}" in table
    # A model directory or config.json works as well as a known hub id.
    config_file = tmp_path / "config.json"
    tiny_llama_config(**TINY).to_json_file(config_file)
    assert run_cli(E.main, ["--model_name_or_path", str(config_file), "--gpus_per_node", "1"]) == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model_name_or_path", "/no/such/dir"], r"model config /no/such/dir does not exist"),
        (["--model_name_or_path", "meta-llama/Llama-2-7b-hf", "--offload", "--zero_stage", "2"],
         r"--offload needs --zero_stage 3, got 2"),
        (["--model_name_or_path", "meta-llama/Llama-2-7b-hf", "--micro_batch", "0"],
         r"--micro_batch must be positive, got 0"),
        (["--model_name_or_path", "meta-llama/Llama-2-7b-hf", "--rank_budget", "300"],
         r"rank_budget 300 does not divide evenly over 224"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line(extra, message, capsys):
    import re

    assert run_cli(E.main, extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert re.search(message, err), err


if __name__ == "__main__":
    zero3_worker(sys.argv[1])
