"""Injection into a Hugging Face LLaMA: targets, budget, freezing, counts."""

from __future__ import annotations

import pytest
import torch

from alora_ds.core.inject import (
    count_parameters,
    find_target_modules,
    initial_rank,
    inject_gated_lora,
    rank_map,
)
from alora_ds.core.layer import GatedLoRALinear
from alora_ds.errors import InputError


def test_wrapped_model_equals_base_at_init(tiny_model):
    x = torch.randint(0, 128, (2, 9))
    before = tiny_model(input_ids=x).logits
    modules = inject_gated_lora(tiny_model, rank_budget=28)
    assert len(modules) == 14  # 7 modules x 2 layers
    assert all(m.r == 2 for m in modules.values())
    assert torch.equal(tiny_model(input_ids=x).logits, before)
    assert "model.layers.1.mlp.down_proj" in modules
    assert isinstance(tiny_model.get_submodule("model.layers.0.self_attn.q_proj"), GatedLoRALinear)


def test_trainable_set_is_exactly_the_adapters(tiny_model):
    inject_gated_lora(tiny_model, rank_budget=14)
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    expected = {f"{name}.{leaf}" for name in rank_map(tiny_model) for leaf in ("lora_A", "lora_B")}
    assert trainable == expected
    counts = count_parameters(tiny_model)
    # r = 1 on 14 modules: sum of (d_in + d_out) per module.
    # q, o: 64 -> 64; k, v: 64 -> 32 (2 KV heads); gate, up: 64 -> 128; down: 128 -> 64.
    per_layer = (64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3
    assert counts.trainable == 2 * per_layer
    assert counts.total == sum(p.numel() for p in tiny_model.parameters())
    assert "trainable params: 2,048" in str(counts)


def test_targets_by_suffix_and_regex(tiny_model):
    assert find_target_modules(tiny_model, ["q_proj", "self_attn.v_proj"]) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    assert find_target_modules(tiny_model, [r"model\.layers\.1\.mlp\..*_proj"]) == [
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj",
    ]
    modules = inject_gated_lora(tiny_model, 8, target_modules=["q_proj", "v_proj"], lora_alpha=8)
    assert {m.scale for m in modules.values()} == {4.0}
    # A wrapped layer is not an nn.Linear any more, nor is its base_layer a target: no double wrap.
    with pytest.raises(InputError, match="target module 'q_proj' matches no nn.Linear"):
        find_target_modules(tiny_model, ["q_proj"])


def test_validation_messages(tiny_model):
    with pytest.raises(
        InputError, match="rank_budget 30 does not divide evenly over 14 .* e.g. 28 or 42"
    ):
        inject_gated_lora(tiny_model, 30)
    with pytest.raises(
        InputError, match="rank_budget 7 is smaller than the number of adapted modules \\(14\\)"
    ):
        inject_gated_lora(tiny_model, 7)
    with pytest.raises(InputError, match="target module 'qproj' matches no nn.Linear"):
        inject_gated_lora(tiny_model, 14, target_modules=["q_proj", "qproj"])
    with pytest.raises(InputError, match="target_modules is empty"):
        find_target_modules(tiny_model, [])
    with pytest.raises(InputError, match="target module pattern '\\(q' is not a valid regex"):
        find_target_modules(tiny_model, ["(q"])
    with pytest.raises(InputError, match="no module to adapt"):
        initial_rank(8, 0)
