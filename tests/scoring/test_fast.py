"""Fast AB-LoRA scoring equals the direct reference, on 1 and 2 processes (and screened scoring on
2 processes equals 1 process)."""

from __future__ import annotations

import pytest
import torch

from alora_ds.core.allocation import plan_round
from alora_ds.core.inject import inject_gated_lora
from alora_ds.core.layer import GateKind
from alora_ds.core.surgery import append_ranks, remove_ranks
from alora_ds.io.examples import make_batches
from alora_ds.io.models import build_random_llama, tiny_llama_config
from alora_ds.scoring.direct import ab_lora_scores
from alora_ds.scoring.fast import (
    ScoringStats,
    candidate_groups,
    even_blocks,
    fast_ablation_scores,
    naive_layer_passes,
    share_layout,
)
from tests.helpers import assert_every_process_said, random_examples, scored_model


def max_rel_err(a, b) -> float:
    worst = abs(a.S_M - b.S_M) / abs(a.S_M)
    for name in a.S_without:
        pairs = zip(
            a.S_without[name] + a.S_only[name], b.S_without[name] + b.S_only[name], strict=True
        )
        worst = max([worst, *(abs(x - y) / abs(x) for x, y in pairs)])
    return worst


@pytest.mark.parametrize("max_rows", [4, 12, 1000])
def test_fast_equals_naive_one_process(max_rows):
    model, _ = scored_model()
    batches = make_batches(random_examples(10, seed=3), 4)
    naive = ab_lora_scores(model, batches)
    stats = ScoringStats()
    fast = fast_ablation_scores(model, batches, max_rows=max_rows, stats=stats)
    assert max_rel_err(naive, fast) < 1e-5
    assert fast.S_base == pytest.approx(naive.S_base, rel=1e-6)
    assert plan_round(naive.importance, 7) == plan_round(fast.importance, 7)
    # Prefix caching: fewer layer passes than two full forwards per candidate.
    assert stats.layer_passes < naive_layer_passes(42, 3, len(batches))
    assert all(torch.all(m.lora_gate == 1) and m.row_gates is None and not m.adapter_off
               for m in model.modules() if hasattr(m, "row_gates"))  # fmt: skip


def test_blocks_cover_every_candidate_once_in_near_equal_sizes():
    for count in range(0, 40):
        for largest in (1, 3, 8):
            blocks = even_blocks(count, largest)
            assert [i for a, b in blocks for i in range(a, b)] == list(range(count))
            sizes = [b - a for a, b in blocks]
            assert all(0 < size <= largest for size in sizes)
            assert len(blocks) == -(-count // largest)
            assert not sizes or max(sizes) - min(sizes) <= 1
    assert even_blocks(12, 8) == [(0, 6), (6, 12)]


def test_fast_with_uneven_ranks_a_module_at_zero_and_relaxed_gates():
    model = build_random_llama(tiny_llama_config(num_hidden_layers=2), seed=0)
    modules = inject_gated_lora(model, 28, seed=0, gate_kind=GateKind.RELAXED)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in modules.values():
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator))
            module.gate_logits.copy_(torch.randn(module.r, generator=generator))
    remove_ranks(modules["model.layers.0.self_attn.k_proj"], [0, 1])
    append_ranks(modules["model.layers.1.mlp.up_proj"], 3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        modules["model.layers.1.mlp.up_proj"].lora_B.normal_()
    batches = make_batches(random_examples(6, seed=4), 3)
    naive = ab_lora_scores(model, batches)
    fast = fast_ablation_scores(model, batches, max_rows=9)
    assert max_rel_err(naive, fast) < 1e-5
    assert fast.S_without["model.layers.0.self_attn.k_proj"] == []


def test_share_layout_pads_every_process_to_the_same_work():
    model, modules = scored_model(layers=2)
    layer_names = ["model.layers.0", "model.layers.1"]
    groups = candidate_groups(modules, layer_names)
    assert [(layer, half, len(c)) for layer, half, c in groups] == [
        (0, 0, 8), (0, 1, 6), (1, 0, 8), (1, 1, 6),
    ]  # fmt: skip
    layout = share_layout(groups, 3)
    for (_, _, candidates), shares in zip(groups, layout, strict=True):
        assert len({len(s) for s in shares}) == 1  # same length everywhere
        flat = [c for s in shares for c in s if c is not None]
        assert sorted(flat) == sorted(candidates)


def test_fast_equals_naive_under_zero3_on_two_processes(engine_checks):
    """Under 2-process ZeRO-3, fast scores equal naive ones and this process's direct reference
    (1e-5) and plan the same round; screened scores plan what one process plans (asserted in
    tests/scripts/engine_checks.py, check `scoring`, against the reference written here)."""
    assert_every_process_said(engine_checks, "fast == naive")
    assert_every_process_said(engine_checks, "screened == 1 process")


@pytest.mark.parametrize(("rank", "world_size"), [(0, 1), (0, 2), (1, 2)])
def test_progress_adds_up_to_the_live_ranks_and_changes_no_score(rank, world_size):
    model, _ = scored_model(layers=2)
    batches = make_batches(random_examples(6, seed=3), 3)
    calls: list[int] = []

    def gather(local):  # stands in for the all-gather: only the progress is checked here
        return [local] * world_size

    fast = fast_ablation_scores(
        model, batches, max_rows=6, rank=rank, world_size=world_size, gather=gather,
        progress=calls.append,
    )  # fmt: skip
    assert sum(calls) == 28 and all(n > 0 for n in calls)
    assert len(calls) > 2  # the bar moves during the round, not only at its end
    if world_size == 1:
        assert fast == fast_ablation_scores(model, batches, max_rows=6)  # bit-identical
