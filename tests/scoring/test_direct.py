"""AB-LoRA scores against a brute-force reference and pinned numbers."""

from __future__ import annotations

import pytest
import torch

from alora_ds.core.inject import inject_gated_lora
from alora_ds.io.examples import collate, make_batches
from alora_ds.scoring.direct import (
    ab_lora_scores,
    ablation_scores,
    all_candidates,
    validation_score,
)
from tests.helpers import random_examples


def adapted(model, budget=28, seed=123):
    """Inject and give B random values, so every rank changes the output."""
    modules = inject_gated_lora(model, budget, seed=0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules.values():
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.5)
    return modules


def hf_score(model, batch) -> float:
    """S from Hugging Face's own loss (mean CE over supervised tokens, causal shift)."""
    with torch.no_grad():
        return -float(model(**batch).loss)


def test_scores_equal_brute_force_reference(tiny_model):
    modules = adapted(tiny_model)
    examples = random_examples(6)
    scores = ab_lora_scores(tiny_model, make_batches(examples, 4))
    full = collate(examples)  # one batch: HF's mean is then the per-token mean over all rows

    s_m = hf_score(tiny_model, full)
    assert scores.S_M == pytest.approx(s_m, rel=1e-6)
    for name, module in modules.items():
        for r in range(module.r):
            module.lora_gate[r] = 0
            without = hf_score(tiny_model, full)
            module.lora_gate[r] = 1
            saved = {n: m.lora_gate.clone() for n, m in modules.items()}
            for other in modules.values():
                other.lora_gate.zero_()
            module.lora_gate[r] = 1
            only = hf_score(tiny_model, full)
            for n, m in modules.items():
                m.lora_gate.copy_(saved[n])
            assert scores.S_without[name][r] == pytest.approx(without, rel=1e-6)
            assert scores.S_only[name][r] == pytest.approx(only, rel=1e-6)
            assert scores.importance[name][r] == pytest.approx(s_m - without + only, rel=1e-6)


def test_pinned_numbers(tiny_model):
    adapted(tiny_model)
    scores = ab_lora_scores(tiny_model, make_batches(random_examples(6), 4))
    assert scores.S_M == pytest.approx(-4.867872686947093, rel=1e-5)
    assert scores.S_base == pytest.approx(-4.850547678330365, rel=1e-5)
    imp = scores.importance
    assert imp["model.layers.0.self_attn.q_proj"] == pytest.approx(
        [-4.857454187729779, -4.827822404749253], rel=1e-5
    )
    assert imp["model.layers.1.mlp.down_proj"] == pytest.approx(
        [-4.875031976138844, -4.860401265761431], rel=1e-5
    )
    assert len(imp) == 14 and all(len(v) == 2 for v in imp.values())


def test_micro_batching_does_not_change_the_score(tiny_model):
    adapted(tiny_model)
    examples = random_examples(7)
    one = validation_score(tiny_model, make_batches(examples, 7))
    many = validation_score(tiny_model, make_batches(examples, 2))
    assert one == pytest.approx(many, rel=1e-6)


def test_gates_restored_after_an_exception(tiny_model):
    modules = adapted(tiny_model)
    batches = make_batches(random_examples(4), 4)
    calls = {"n": 0}
    original_forward = tiny_model.forward

    def failing_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # in the middle of the ablations
            raise RuntimeError("boom")
        return original_forward(*args, **kwargs)

    tiny_model.forward = failing_forward
    tiny_model.train()
    with pytest.raises(RuntimeError, match="boom"):
        ab_lora_scores(tiny_model, batches)
    assert all(torch.all(m.lora_gate == 1) for m in modules.values())
    assert tiny_model.training  # the mode is restored too


def test_scores_in_bf16_are_computed_in_fp32(tiny_model):
    adapted(tiny_model)
    tiny_model.to(torch.bfloat16)
    scores = ab_lora_scores(tiny_model, make_batches(random_examples(4), 4))
    assert isinstance(scores.S_M, float)
    # bf16 forwards, fp32 loss: close to the fp32 figure, not identical.
    assert scores.S_M == pytest.approx(-4.87, abs=0.1)
    assert all(len(v) == 2 for v in scores.importance.values())


def test_no_supervised_token_is_an_error(tiny_model):
    adapted(tiny_model)
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}])
    with pytest.raises(ValueError, match="no supervised token"):
        validation_score(tiny_model, [batch])
    tiny_model_without = type(tiny_model)(tiny_model.config)
    with pytest.raises(ValueError, match="no gated LoRA module to score"):
        ab_lora_scores(tiny_model_without, [batch])


def test_progress_adds_up_to_the_live_ranks_and_changes_no_score(tiny_model):
    modules = adapted(tiny_model)
    batches = make_batches(random_examples(6), 4)
    calls: list[int] = []
    scores = ab_lora_scores(tiny_model, batches, progress=calls.append)
    assert scores == ab_lora_scores(tiny_model, batches)  # bit-identical
    assert sum(calls) == 28 and all(n > 0 for n in calls)
    # One process's padded share of a 3-process round stands for the whole round: it runs in
    # lockstep with the others.
    candidates = all_candidates(modules)
    share = candidates[1::3]
    share += [None] * (-(-len(candidates) // 3) - len(share))
    calls.clear()
    ablation_scores(tiny_model, batches, share, progress=calls.append)
    assert sum(calls) == len(candidates)
