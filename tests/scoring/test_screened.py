"""Screened AB-LoRA (alora_ds.scoring.screened): estimates from the gates' gradients, exact
scores where they decide the round, and a plan equal to the exact one."""

from __future__ import annotations

import pytest
import torch

from alora_ds.core.allocation import plan_round
from alora_ds.core.inject import inject_gated_lora
from alora_ds.demo import synthetic_examples
from alora_ds.io.examples import make_batches
from alora_ds.io.models import build_random_llama, tiny_llama_config
from alora_ds.scoring.direct import eval_mode, validation_score
from alora_ds.scoring.fast import fast_ablation_scores
from alora_ds.scoring.screened import gate_gradients, screened_scores, spearman
from tests.helpers import random_examples, randomise_adapters


@pytest.fixture(scope="module")
def trained():
    """The demo's tiny LLaMA with its adapters trained one epoch on the demo's task (a small
    perturbation, as trained adapters are), and its B_val."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = build_random_llama(tiny_llama_config(initializer_range=0.3), seed=0)
    inject_gated_lora(model, rank_budget=56, lora_alpha=16, seed=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for batch in make_batches(synthetic_examples(256, 16, generator), 16):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, make_batches(synthetic_examples(32, 16, generator), 8)


def test_the_gradient_is_the_slope_of_the_score(trained):
    """dS/dg at M, checked against a finite difference of the score itself."""
    model, batches = trained
    grads = gate_gradients(model, batches)
    name, rank, eps = "model.layers.1.mlp.up_proj", 2, 1e-3
    module = dict(model.named_modules())[name]
    with eval_mode(model), torch.no_grad():
        s_m = validation_score(model, batches)
        module.lora_gate[rank] = 1 - eps
        lowered = validation_score(model, batches)
        module.lora_gate[rank] = 1
    assert grads.s_m == pytest.approx(s_m, rel=1e-6)
    assert float(grads.grad_on[name][rank]) == pytest.approx((s_m - lowered) / eps, rel=2e-2)


def test_screened_prunes_what_exact_prunes_and_marks_what_it_scored(trained):
    model, batches = trained
    exact = fast_ablation_scores(model, batches)
    screened = screened_scores(model, batches, 7)
    estimates = [v for n in exact.importance for v in screened.estimates[n]]
    assert spearman(estimates, [v for n in exact.importance for v in exact.importance[n]]) > 0.95
    assert plan_round(screened.importance, 7) == plan_round(exact.importance, 7)
    flags = [f for values in screened.exact.values() for f in values]
    record = screened.record
    assert record["exact_ranks"] == sum(flags) and record["live_ranks"] == len(flags) == 56
    assert 7 <= sum(flags) < 56  # the n_A candidates at least, not every rank
    for name, values in exact.importance.items():
        for index, value in enumerate(values):
            if screened.exact[name][index]:
                assert screened.importance[name][index] == pytest.approx(value, rel=1e-5)
            else:
                assert screened.importance[name][index] == screened.estimates[name][index]
    assert record["spearman"] > 0.95 and record["largest_error"] >= 0


def test_exact_means_make_the_added_ranks_the_exact_plans_too(trained):
    """--screen_exact_means: the receivers whose means decide where the remainder of the new
    ranks goes are scored exactly, and the whole plan (pruned and added) is the exact one. The
    modules scored for their means do not widen the prune cut: their first-order errors are the
    largest and say nothing about the ranks near it."""
    model, batches = trained
    exact = plan_round(fast_ablation_scores(model, batches).importance, 7)
    cheap = screened_scores(model, batches, 7)
    means = screened_scores(model, batches, 7, exact_means=True)
    assert plan_round(means.importance, 7) == exact
    checked = means.record["modules_scored_for_means"]
    assert checked and cheap.record["modules_scored_for_means"] == []
    assert all(means.exact[name] == [True] * len(means.exact[name]) for name in checked)
    assert means.record["widenings"] == cheap.record["widenings"]
    assert means.record["largest_error"] == cheap.record["largest_error"]


def test_a_misjudged_cut_is_widened_until_the_exact_plan_is_recovered():
    """Large random adapters: first order misjudges the ranks (their Spearman with the exact
    scores is poor); starting from only the n_A lowest estimates, the widening rule still ends
    with the exact plan."""
    model = build_random_llama(tiny_llama_config(num_hidden_layers=3), seed=0)
    randomise_adapters(inject_gated_lora(model, 84, seed=0), 1, scale=1.0)
    batches = make_batches(random_examples(16, length=16, seed=3), 8)
    exact = fast_ablation_scores(model, batches)
    screened = screened_scores(model, batches, 7, candidates=7)
    flat = [(n, i) for n, values in exact.importance.items() for i in range(len(values))]
    rho = spearman([screened.estimates[n][i] for n, i in flat],
                   [exact.importance[n][i] for n, i in flat])  # fmt: skip
    assert rho < 0.8
    assert screened.record["widenings"] >= 1
    assert plan_round(screened.importance, 7) == plan_round(exact.importance, 7)


def test_spearman():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [5, 6, 7]) == pytest.approx(0.8660254)
    assert spearman([1, 1], [2, 3]) is None and spearman([1], [2]) is None
