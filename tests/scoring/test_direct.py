"""AB-LoRA scores against brute-force references: our own layer's gates, and peft's LoRA layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from alora_ds.core.inject import inject_gated_lora
from alora_ds.io.examples import collate, make_batches
from alora_ds.io.models import build_random_llama, tiny_llama_config
from alora_ds.scoring.direct import (
    ab_lora_scores,
    ablation_scores,
    all_candidates,
    validation_score,
)
from tests.helpers import TARGETS, random_examples


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


def peft_twin(modules, seed: int = 0):
    """The same base (same seed) with peft's own LoRA layers holding our A and B (gates 1):
    s = lora_alpha / r_init = 16 / 2 on both sides. Nothing of ours computes its forward."""
    base = build_random_llama(tiny_llama_config(), seed=seed)
    twin = get_peft_model(base, LoraConfig(r=2, lora_alpha=16, target_modules=TARGETS))
    layers = {
        name.removeprefix("base_model.model."): module
        for name, module in twin.named_modules()
        if isinstance(module, LoraLayer)
    }
    assert layers.keys() == modules.keys()
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A["default"].weight.copy_(modules[name].lora_A)
            layer.lora_B["default"].weight.copy_(modules[name].lora_B)
    return twin.eval(), layers


def test_scores_equal_ablations_of_a_peft_model(tiny_model):
    """S(M), S_base, S(M \\ r) and S(M_r) against peft's LoRA with rank r's row of A zeroed
    (or every other rank's): an independent computation of every number the scorer returns."""
    modules = adapted(tiny_model)
    examples = random_examples(6)
    scores = ab_lora_scores(tiny_model, make_batches(examples, 4))
    twin, layers = peft_twin(modules)
    full = collate(examples)  # one batch: HF's mean is then the per-token mean over all rows
    saved = {name: layer.lora_A["default"].weight.clone() for name, layer in layers.items()}

    def restore() -> None:
        with torch.no_grad():
            for name, layer in layers.items():
                layer.lora_A["default"].weight.copy_(saved[name])

    assert scores.S_M == pytest.approx(hf_score(twin, full), rel=1e-5)
    with twin.disable_adapter():
        assert scores.S_base == pytest.approx(hf_score(twin, full), rel=1e-5)
    for name, layer in layers.items():
        for r in range(2):
            with torch.no_grad():
                layer.lora_A["default"].weight[r] = 0  # rank r contributes nothing
            without = hf_score(twin, full)
            with torch.no_grad():
                for other in layers.values():
                    other.lora_A["default"].weight.zero_()
                layer.lora_A["default"].weight[r] = saved[name][r]  # rank r alone
            only = hf_score(twin, full)
            restore()
            assert scores.S_without[name][r] == pytest.approx(without, rel=1e-5), (name, r)
            assert scores.S_only[name][r] == pytest.approx(only, rel=1e-5), (name, r)
    # Every rank moved the score: the comparisons above could have failed.
    assert all(abs(w - scores.S_M) > 1e-5 for values in scores.S_without.values() for w in values)


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
    """A bf16 model's forwards run in bf16 and its loss is summed in fp32: S equals the fp32
    cross-entropy of the bf16 logits, computed here, and neither the cross-entropy taken in bf16
    nor the fp32 model's score."""
    adapted(tiny_model)
    examples = random_examples(4)
    full = collate(examples)
    fp32_score = hf_score(tiny_model, full)
    tiny_model.to(torch.bfloat16)
    scores = ab_lora_scores(tiny_model, make_batches(examples, 4))
    with torch.no_grad():
        logits = tiny_model(input_ids=full["input_ids"], attention_mask=full["attention_mask"])
    logits = logits.logits[:, :-1]  # (B, T-1, V), bf16
    assert logits.dtype == torch.bfloat16
    logits, targets = logits.reshape(-1, logits.shape[-1]), full["labels"][:, 1:].reshape(-1)
    in_fp32 = -float(F.cross_entropy(logits.float(), targets, ignore_index=-100))
    in_bf16 = -float(F.cross_entropy(logits, targets, ignore_index=-100))
    assert scores.S_M == pytest.approx(in_fp32, rel=1e-6)
    assert abs(scores.S_M - in_bf16) > 1e-3  # what a bf16 loss would have given
    assert abs(scores.S_M - fp32_score) > 1e-5  # the forwards did run in bf16
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
