"""GatedLoRALinear: init, forward formula, gate kinds, dtypes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from alora_ds.core.layer import GatedLoRALinear, GateKind
from alora_ds.core.surgery import append_ranks, remove_ranks


def make_layer(r=4, d_in=16, d_out=12, dtype=torch.float32, **kwargs) -> GatedLoRALinear:
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, dtype=dtype)
    return GatedLoRALinear(base, r, alpha=8.0, generator=torch.Generator().manual_seed(1), **kwargs)


def randomise_b(layer: GatedLoRALinear, seed: int = 2) -> None:
    with torch.no_grad():
        b = torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(seed))
        layer.lora_B.copy_(b)


def test_init_equals_base_and_only_adapter_trainable():
    layer = make_layer()
    x = torch.randn(3, 5, 16)
    assert torch.equal(layer(x), layer.base_layer(x))
    assert torch.all(layer.lora_B == 0)
    assert torch.all(layer.lora_gate == 1)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    assert layer.scale == 2.0  # alpha / r_init
    # A is Kaiming-uniform(a=sqrt(5)): bounded by 1/sqrt(d_in), and not degenerate.
    assert layer.lora_A.abs().max() <= 1 / 16**0.5
    assert layer.lora_A.std() > 0.05


def test_forward_matches_formula():
    layer = make_layer()
    randomise_b(layer)
    with torch.no_grad():
        layer.lora_gate[1] = 0
    x = torch.randn(2, 7, 16)
    expected = layer.base_layer(x) + layer.scale * (
        x @ layer.lora_A.t() @ torch.diag(layer.lora_gate) @ layer.lora_B.t()
    )
    torch.testing.assert_close(layer(x), expected)
    delta = layer.scale * layer.lora_B @ torch.diag(layer.lora_gate) @ layer.lora_A
    torch.testing.assert_close(layer.delta_weight(), delta)


def test_sizes_come_from_layer_attributes():
    # Under ZeRO-3 a partitioned weight is empty; the sizes must come from in/out_features.
    base = nn.Linear(16, 12)
    base.weight = nn.Parameter(torch.empty(0))
    layer = GatedLoRALinear(base, 2, alpha=4.0)
    assert layer.lora_A.shape == (2, 16)
    assert layer.lora_B.shape == (12, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    layer = make_layer(dtype=dtype)
    assert layer.lora_A.dtype == dtype and layer.lora_B.dtype == dtype
    assert layer.lora_gate.dtype == dtype
    randomise_b(layer)
    x = torch.randn(2, 16, dtype=dtype)
    out = layer(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    remove_ranks(layer, [0])
    append_ranks(layer, 2, torch.Generator().manual_seed(0))
    assert layer.lora_A.dtype == dtype and layer.r == 5


def test_explicit_adapter_dtype():
    base = nn.Linear(8, 8, dtype=torch.bfloat16)
    layer = GatedLoRALinear(base, 2, alpha=2.0, dtype=torch.float32)
    assert layer.lora_A.dtype == torch.float32
    assert layer(torch.randn(1, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("kind", [GateKind.RELAXED, GateKind.IDENTITY])
def test_trained_gates_start_at_one_and_train(kind):
    layer = make_layer(gate_kind=kind)
    randomise_b(layer)
    assert torch.equal(layer.gate_values(), torch.ones(4))
    assert layer.trainable_names() == ("lora_A", "lora_B", "gate_logits")
    assert layer.params_per_rank == 16 + 12 + 1
    x = torch.randn(5, 16)
    layer(x).sum().backward()
    assert layer.gate_logits.grad is not None and layer.gate_logits.grad.abs().sum() > 0
    remove_ranks(layer, [0])
    append_ranks(layer, 1)
    assert layer.gate_logits.shape == (4,)
    assert torch.equal(layer.gate_values()[-1:], torch.ones(1))  # the new rank's gate is 1
    with torch.no_grad():
        layer.gate_logits.fill_(0.25)
    expected = 0.25 if kind is GateKind.IDENTITY else 2 * torch.sigmoid(torch.tensor(0.25))
    torch.testing.assert_close(layer.gate_values(), torch.full((4,), float(expected)))


def test_hard_gates_have_no_trained_tensor():
    layer = make_layer()
    assert layer.gate_kind is GateKind.HARD and layer.gate_logits is None
    assert layer.trainable_names() == ("lora_A", "lora_B")
    assert layer.params_per_rank == 16 + 12


def test_dropout_only_on_adapter_path():
    layer = make_layer(dropout=0.5)
    randomise_b(layer)
    x = torch.randn(64, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_validation_messages():
    with pytest.raises(TypeError, match="wraps nn.Linear, got Conv1d"):
        GatedLoRALinear(nn.Conv1d(2, 2, 1), 2, alpha=1.0)
    with pytest.raises(ValueError, match="rank r must be >= 0, got -1"):
        GatedLoRALinear(nn.Linear(2, 2), -1, alpha=1.0)
    with pytest.raises(ValueError, match="r = 0 needs an explicit scale"):
        GatedLoRALinear(nn.Linear(2, 2), 0, alpha=1.0)
    layer = make_layer(r=3)
    with pytest.raises(IndexError, match=r"rank indices \[3\] out of range for a module with 3"):
        remove_ranks(layer, [3])
    with pytest.raises(ValueError, match="cannot append a negative number of ranks"):
        append_ranks(layer, -1)


def test_adapter_off_is_the_base_output_and_gates_off_agree():
    """The fast scorer's shortcut: a module with every gate off skips its adapter, exactly."""
    layer = make_layer()
    randomise_b(layer)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        layer.lora_gate.zero_()
        gated_off = layer(x)
        layer.adapter_off = True
        skipped = layer(x)
    assert torch.equal(skipped, layer.base_layer(x))
    assert torch.equal(gated_off, skipped)
