"""QLoRA: a bitsandbytes nf4 base under the gated LoRA adapters, on CPU."""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
from torch import nn

from alora_ds.core.inject import count_parameters, gated_modules, inject_gated_lora
from alora_ds.core.layer import GatedLoRALinear
from alora_ds.errors import InputError
from alora_ds.io.examples import make_batches
from alora_ds.io.models import build_random_llama, load_base_model, tiny_llama_config
from alora_ds.io.peft_write import adapter_tensors_from_model
from alora_ds.scoring.direct import ab_lora_scores
from alora_ds.scoring.fast import fast_ablation_scores
from tests.helpers import assert_every_process_said, load_4bit, random_examples

BUDGET = 28  # 14 modules x r_init 2


@pytest.fixture(scope="module")
def bnb():
    return pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    build_random_llama(tiny_llama_config(), seed=0).save_pretrained(path)
    return path


def load(path, load_in_4bit: bool, dtype=torch.float32):
    if load_in_4bit:
        return load_4bit(path, dtype)
    return load_base_model(
        str(path), None, dtype=dtype, attn_implementation="sdpa", seed=0,
        loading_context=contextlib.nullcontext(), load_in_4bit=False,
    )  # fmt: skip


def with_random_b(model, seed: int = 5):
    """Inject, then give B random values so every rank changes the output (same values for
    the same module names, whatever the base)."""
    modules = inject_gated_lora(model, BUDGET, seed=0, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules.values():
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.1)
    return modules


def batch():
    return make_batches(random_examples(4, seed=7), 4)[0]


def test_4bit_base_trains_only_the_adapters(checkpoint, bnb):
    model, random_init = load(checkpoint, load_in_4bit=True)
    assert not random_init
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, bnb.nn.Linear4bit)
    assert isinstance(layer.mlp.down_proj, bnb.nn.Linear4bit)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)  # the head stays in the run's dtype
    modules = with_random_b(model)
    assert len(modules) == 14
    for module in modules.values():
        assert isinstance(module.base_layer, bnb.nn.Linear4bit)
        assert module.lora_A.dtype == torch.float32
    k_proj = modules["model.layers.0.self_attn.k_proj"]
    assert (k_proj.in_features, k_proj.out_features) == (64, 32)  # not the packed weight's shape
    assert k_proj.lora_B.shape == (32, 2)

    model.train()
    loss = model(**batch()).loss
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{p}" for n in modules for p in ("lora_A", "lora_B")}
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if n in trainable)  # fmt: skip
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_4bit_loss_is_close_to_the_fp32_loss(checkpoint, bnb):
    full, _ = load(checkpoint, load_in_4bit=False)
    quantised, _ = load(checkpoint, load_in_4bit=True)
    with_random_b(full)
    with_random_b(quantised)
    with torch.no_grad():
        loss_full = float(full(**batch()).loss)
        loss_4bit = float(quantised(**batch()).loss)
    assert loss_4bit != loss_full  # the base really is quantised
    assert loss_4bit == pytest.approx(loss_full, abs=0.02)
    # The adapters and what is exported from them do not depend on the base's storage.
    exported_full = adapter_tensors_from_model(full)
    exported_4bit = adapter_tensors_from_model(quantised)
    for name, adapter in exported_4bit.items():
        assert torch.equal(adapter.lora_A, exported_full[name].lora_A)
        assert torch.equal(adapter.lora_B, exported_full[name].lora_B)
        assert adapter.lora_A.dtype == torch.float32
    # Parameter counts are the model's, not the packed storage's.
    assert count_parameters(quantised).total == count_parameters(full).total


def test_ab_lora_scoring_runs_on_a_4bit_base(checkpoint, bnb):
    model, _ = load(checkpoint, load_in_4bit=True)
    # A few candidates keep the direct path short: 2 modules x 2 layers x r 1.
    modules = inject_gated_lora(model, 4, target_modules=("q_proj", "down_proj"), seed=0)
    with torch.no_grad():
        for module in modules.values():
            module.lora_B.normal_(generator=torch.Generator().manual_seed(5))
    batches = make_batches(random_examples(4, seed=3), 4)
    naive = ab_lora_scores(model, batches)
    fast = fast_ablation_scores(model, batches, max_rows=8)
    assert sorted(naive.S_without) == sorted(modules)
    for name in naive.S_without:
        assert fast.S_without[name] == pytest.approx(naive.S_without[name], rel=1e-5)
        assert fast.S_only[name] == pytest.approx(naive.S_only[name], rel=1e-5)
        assert naive.S_without[name][0] != naive.S_M  # every rank matters


def test_adapter_dtype_is_the_compute_dtype_never_the_storage_dtype(bnb):
    base = bnb.nn.Linear4bit(
        64,
        32,
        bias=False,
        compute_dtype=torch.bfloat16,
        quant_type="nf4",
        quant_storage=torch.float32,
    ).to("cpu")  # fmt: skip  (moving it quantises it)
    assert base.weight.dtype == torch.float32 and base.weight.shape == (256, 1)  # packed
    module = GatedLoRALinear(base, 4, alpha=8)
    assert module.adapter_dtype == torch.bfloat16
    assert module.lora_A.shape == (4, 64) and module.lora_B.shape == (32, 4)
    out = module(torch.randn(2, 64, dtype=torch.bfloat16))
    assert out.shape == (2, 32)
    plain = GatedLoRALinear(nn.Linear(64, 32).to(torch.bfloat16), 4, alpha=8)
    assert plain.adapter_dtype == torch.bfloat16


def test_bf16_run_keeps_adapters_in_bf16(checkpoint, bnb):
    model, _ = load(checkpoint, load_in_4bit=True, dtype=torch.bfloat16)
    modules = inject_gated_lora(model, BUDGET, seed=0)  # dtype from the base layers
    assert {m.lora_A.dtype for m in modules.values()} == {torch.bfloat16}
    assert {m.base_layer.compute_dtype for m in gated_modules(model).values()} == {torch.bfloat16}
    loss = model(**batch()).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_4bit_needs_a_checkpoint(bnb):
    with pytest.raises(InputError, match=r"^load_in_4bit quantises a pretrained checkpoint"):
        load(None, load_in_4bit=True)


def test_4bit_needs_bitsandbytes(checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` fails
    with pytest.raises(InputError, match=r"^load_in_4bit needs bitsandbytes"):
        load(checkpoint, load_in_4bit=True)


def test_zero3_on_two_processes_takes_a_4bit_base(engine_checks):
    """ZeRO-3 partitions the packed nf4 weights; the loss and scores equal one process's, and a
    round (fast scoring, rebuild, training, export) runs (asserted in
    tests/scripts/engine_checks.py, check `qlora`, against the reference written here)."""
    assert_every_process_said(engine_checks, "qlora zero3 ok")
