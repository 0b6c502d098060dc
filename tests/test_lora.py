"""GatedLoRALinear: init, forward formula, rank surgery, dtypes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from alora_ds.inject import module_generator
from alora_ds.lora import GatedLoRALinear


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


def test_remove_then_append_keeps_survivors_bit_exact():
    layer = make_layer(r=6)
    randomise_b(layer)
    a_before, b_before = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    layer.remove_ranks([1, 4])
    keep = [0, 2, 3, 5]
    assert layer.r == 4
    assert torch.equal(layer.lora_A, a_before[keep])
    assert torch.equal(layer.lora_B, b_before[:, keep])

    x = torch.randn(4, 16)
    out_before_append = layer(x)
    layer.append_ranks(3, module_generator(0, 1, "m"))
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
    one.append_ranks(2, module_generator(7, 3, "layers.0.q_proj"))
    two.append_ranks(2, module_generator(7, 3, "layers.0.q_proj"))
    assert torch.equal(one.lora_A, two.lora_A)
    three = make_layer(r=2)
    three.append_ranks(2, module_generator(7, 4, "layers.0.q_proj"))
    assert not torch.equal(one.lora_A[2:], three.lora_A[2:])


def test_remove_all_ranks_then_grow_back():
    layer = make_layer(r=2)
    x = torch.randn(3, 16)
    layer.remove_ranks([0, 1])
    assert layer.r == 0
    assert torch.equal(layer(x), layer.base_layer(x))
    layer.append_ranks(1, torch.Generator().manual_seed(0))
    assert layer.r == 1
    assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    layer = make_layer(dtype=dtype)
    assert layer.lora_A.dtype == dtype and layer.lora_B.dtype == dtype
    assert layer.lora_gate.dtype == dtype
    randomise_b(layer)
    x = torch.randn(2, 16, dtype=dtype)
    out = layer(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    layer.remove_ranks([0])
    layer.append_ranks(2, torch.Generator().manual_seed(0))
    assert layer.lora_A.dtype == dtype and layer.r == 5


def test_explicit_adapter_dtype():
    base = nn.Linear(8, 8, dtype=torch.bfloat16)
    layer = GatedLoRALinear(base, 2, alpha=2.0, dtype=torch.float32)
    assert layer.lora_A.dtype == torch.float32
    assert layer(torch.randn(1, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_relaxed_gates_start_at_one_and_train():
    layer = make_layer(relaxed_gates=True)
    randomise_b(layer)
    assert torch.equal(layer.gate_values(), torch.ones(4))
    x = torch.randn(5, 16)
    layer(x).sum().backward()
    assert layer.gate_logits.grad is not None and layer.gate_logits.grad.abs().sum() > 0
    layer.remove_ranks([0])
    layer.append_ranks(1)
    assert layer.gate_logits.shape == (4,)


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
        layer.remove_ranks([3])
    with pytest.raises(ValueError, match="cannot append a negative number of ranks"):
        layer.append_ranks(-1)


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


def test_cpu_runs_keep_freed_memory_for_the_next_op():
    """glibc here: mallopt accepts every setting (see alora_ds/cpu.py for the measured cost)."""
    import platform

    from alora_ds.cpu import keep_freed_memory

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert keep_freed_memory()
