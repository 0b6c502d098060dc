"""Rank surgery (alora_ds.core.surgery): one implementation for training, the demo and the
tests; survivors keep their exact values and moments, new ranks follow footnote 3."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from alora_ds.core.inject import inject_gated_lora, module_generator
from alora_ds.core.layer import GatedLoRALinear, GateKind
from alora_ds.core.surgery import (
    ADAM_STATE_KEYS,
    append_ranks,
    apply_plan,
    module_state,
    plan_states,
    remove_ranks,
    resize,
)
from alora_ds.io.models import build_random_llama, tiny_llama_config
from tests.helpers import randomise_adapters


def make_layer(r=4, d_in=16, d_out=12, **kwargs) -> GatedLoRALinear:
    torch.manual_seed(0)
    return GatedLoRALinear(
        nn.Linear(d_in, d_out), r, alpha=8.0, generator=torch.Generator().manual_seed(1), **kwargs
    )


def randomise_b(layer: GatedLoRALinear, seed: int = 2) -> None:
    with torch.no_grad():
        b = torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(seed))
        layer.lora_B.copy_(b)


def test_remove_then_append_keeps_survivors_bit_exact():
    layer = make_layer(r=6)
    randomise_b(layer)
    a_before, b_before = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    remove_ranks(layer, [1, 4])
    keep = [0, 2, 3, 5]
    assert layer.r == 4
    assert torch.equal(layer.lora_A, a_before[keep])
    assert torch.equal(layer.lora_B, b_before[:, keep])

    x = torch.randn(4, 16)
    out_before_append = layer(x)
    append_ranks(layer, 3, module_generator(0, 1, "m"))
    assert layer.r == 7
    assert torch.equal(layer.lora_A[:4], a_before[keep])
    assert torch.equal(layer.lora_B[:, :4], b_before[:, keep])
    assert torch.all(layer.lora_B[:, 4:] == 0)
    assert torch.all(layer.lora_gate == 1)
    assert torch.all(layer.lora_A[4:] != 0)
    # B = 0 for the new ranks: the output does not move.
    assert torch.equal(layer(x), out_before_append)
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert layer.scale == 8.0 / 6  # the scale never follows the rank


def test_append_is_deterministic_per_generator():
    one, two = make_layer(r=2), make_layer(r=2)
    append_ranks(one, 2, module_generator(7, 3, "layers.0.q_proj"))
    append_ranks(two, 2, module_generator(7, 3, "layers.0.q_proj"))
    assert torch.equal(one.lora_A, two.lora_A)
    three = make_layer(r=2)
    append_ranks(three, 2, module_generator(7, 4, "layers.0.q_proj"))
    assert not torch.equal(one.lora_A[2:], three.lora_A[2:])


def test_remove_all_ranks_then_grow_back():
    layer = make_layer(r=2)
    x = torch.randn(3, 16)
    remove_ranks(layer, [0, 1])
    assert layer.r == 0
    assert torch.equal(layer(x), layer.base_layer(x))
    append_ranks(layer, 1, torch.Generator().manual_seed(0))
    assert layer.r == 1
    assert torch.equal(layer(x), layer.base_layer(x))


def test_resize_keeps_survivors_and_their_moments_and_zeroes_new_ones():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, generator=generator), torch.randn(5, 4, generator=generator)
    logits = torch.randn(4, generator=generator)
    state = module_state(make_layer(r=4, d_in=6, d_out=5, gate_kind=GateKind.RELAXED))
    state.values.update(lora_A=a, lora_B=b, gate_logits=logits)
    state.moments = {
        name: {key: torch.full_like(value, i + 1.0) for i, key in enumerate(ADAM_STATE_KEYS)}
        for name, value in state.values.items()
    }
    new_a = torch.randn(2, 6, generator=generator)
    out = resize(state, [1, 3], new_a, new_logit=0.0)
    keep = [0, 2]
    assert torch.equal(out.values["lora_A"], torch.cat([a[keep], new_a]))
    assert torch.equal(out.values["lora_B"], torch.cat([b[:, keep], torch.zeros(5, 2)], dim=1))
    assert torch.equal(out.values["gate_logits"], torch.cat([logits[keep], torch.zeros(2)]))
    assert torch.equal(out.gate, torch.ones(4))
    for name in state.values:
        for i, key in enumerate(ADAM_STATE_KEYS):
            moment = out.moments[name][key]
            rank_axis = 1 if name == "lora_B" else 0
            kept, new = moment.split([2, 2], dim=rank_axis)
            assert torch.all(kept == i + 1.0) and torch.all(new == 0), (name, key)


def test_the_plan_on_modules_is_the_plan_on_states():
    """apply_plan (demo, tests) and plan_states (training, through the engine) are one
    implementation: the same plan gives bitwise the same adapters."""
    model = build_random_llama(tiny_llama_config(), seed=0)
    modules = inject_gated_lora(model, 28, seed=0)
    randomise_adapters(modules, seed=3)
    states = {name: module_state(m) for name, m in modules.items()}
    pruned = {"model.layers.0.self_attn.q_proj": [1], "model.layers.1.mlp.up_proj": [0, 1]}
    added = {"model.layers.0.self_attn.k_proj": 2, "model.layers.1.mlp.down_proj": 1}
    planned = plan_states(states, pruned, added, seed=5, round_index=2)
    apply_plan(modules, pruned, added, seed=5, round_index=2)
    for name, module in modules.items():
        assert torch.equal(module_state(module).values["lora_A"], planned[name].values["lora_A"])
        assert torch.equal(module_state(module).values["lora_B"], planned[name].values["lora_B"])
    expected = torch.Generator()
    new_a = module_state(modules["model.layers.0.self_attn.k_proj"]).values["lora_A"][2:]
    draw = module_generator(5, 2, "model.layers.0.self_attn.k_proj")
    bound = 1 / 64**0.5
    assert torch.equal(new_a, torch.empty(2, 64).uniform_(-bound, bound, generator=draw))
    del expected
    with pytest.raises(ValueError, match="not adapted: \\['model.nope'\\]"):
        plan_states(states, {"model.nope": [0]}, {}, seed=5, round_index=2)


@pytest.mark.parametrize("kind, logit", [(GateKind.RELAXED, 0.0), (GateKind.IDENTITY, 1.0)])
def test_new_ranks_of_trained_gates_start_at_gate_one(kind, logit):
    layer = make_layer(r=2, gate_kind=kind)
    with torch.no_grad():
        layer.gate_logits.fill_(0.3)
    append_ranks(layer, 2, torch.Generator().manual_seed(0))
    assert torch.equal(layer.gate_logits[2:].detach(), torch.full((2,), logit))
    assert torch.equal(layer.gate_values()[2:].detach(), torch.ones(2))
