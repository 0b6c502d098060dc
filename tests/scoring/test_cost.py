"""The cost of a scoring round, counted before it runs (alora_ds.scoring.cost), against what the
scorers really run: the fast scorer's own ScoringStats, the naive path's count, screened
scoring's first exact set."""

from __future__ import annotations

import pytest

from alora_ds.core.inject import gated_modules
from alora_ds.io.examples import make_batches
from alora_ds.scoring.cost import ModuleSite, Pass, describe, round_cost, seconds, site_of
from alora_ds.scoring.direct import all_candidates
from alora_ds.scoring.fast import ScoringStats, fast_candidate_scores, naive_layer_passes
from alora_ds.scoring.screened import screened_scores
from tests.helpers import random_examples, scored_model

CHUNKS = [4, 4, 2]  # 10 examples in chunks of 4


def sites(model) -> list[ModuleSite]:
    layers = {id(layer) for layer in model.model.layers}
    prefixes = [name for name, module in model.named_modules() if id(module) in layers]
    layer_of = {prefix: index for index, prefix in enumerate(prefixes)}
    return [ModuleSite(*site_of(name, layer_of), m.r) for name, m in gated_modules(model).items()]


@pytest.mark.parametrize(("max_rows", "world_size"), [(4, 1), (12, 1), (1000, 1), (12, 2), (8, 3)])
def test_the_fast_count_is_what_the_fast_scorer_runs(max_rows, world_size):
    model, _ = scored_model(uneven=True)  # ranks differ between modules, one module has none
    batches = make_batches(random_examples(10, seed=3), 4)
    assert [len(b["input_ids"]) for b in batches] == CHUNKS
    stats = ScoringStats()  # process 0's share of the work
    fast_candidate_scores(
        model, batches, all_candidates(gated_modules(model)), max_rows=max_rows, rank=0,
        world_size=world_size, gather=lambda t: [t] * world_size, stats=stats,
    )  # fmt: skip
    cost = round_cost(
        "fast", sites(model), num_layers=3, chunk_rows=CHUNKS, world_size=world_size,
        max_rows=max_rows,
    )  # fmt: skip
    assert cost.ranks == sum(m.r for m in gated_modules(model).values())
    assert cost.layer_passes == stats.layer_passes
    assert cost.forwards == stats.forwards + 2 * len(CHUNKS)  # the blocks and 2 prefix passes


def test_the_naive_count_and_the_screened_first_exact_set():
    model, _ = scored_model(uneven=True)
    batches = make_batches(random_examples(10, seed=3), 4)
    ranks = sum(m.r for m in gated_modules(model).values())
    naive = round_cost("naive", sites(model), num_layers=3, chunk_rows=CHUNKS)
    assert naive.layer_passes == naive_layer_passes(ranks, 3, len(CHUNKS))
    assert naive.forwards == (2 + 2 * ranks) * len(CHUNKS)
    assert naive.forward_equivalents == 2 + 2 * ranks  # a forward over every example per config
    # Two processes halve the ablations, not S(M) and S(base).
    halved = round_cost("naive", sites(model), num_layers=3, chunk_rows=CHUNKS, world_size=2)
    assert halved.forwards == (2 + 2 * -(-ranks // 2)) * len(CHUNKS)

    screened = screened_scores(model, batches, n_prune=2, max_rows=12)
    cost = round_cost(
        "screened", sites(model), num_layers=3, chunk_rows=CHUNKS, max_rows=12, exact_ranks=2
    )
    assert cost.exact_ranks == screened.record["candidates"] == 2  # n_A first
    assert cost.gradient_passes == 2 * len(CHUNKS)  # with every rank on, then off
    fast = round_cost("fast", sites(model), num_layers=3, chunk_rows=CHUNKS, max_rows=12)
    assert cost.layer_passes < fast.layer_passes


def test_the_time_and_the_line():
    cost = round_cost(
        "fast", [ModuleSite(0, 0, 4), ModuleSite(1, 1, 2)], num_layers=2, chunk_rows=[8],
        max_rows=64,
    )  # fmt: skip
    # Per chunk: 2 prefix passes; layer 0's attention group (4 ranks, both modes, from layer 0:
    # all of the layers) in 1 block each; layer 1's MLP group (2 ranks, the last half layer).
    assert cost.passes == (Pass(2, 1.0, 8), Pass(2, 1.0, 32.0), Pass(2, 0.25, 16.0))
    assert cost.layer_passes == 2 * 2 + 2 * 4 * 2 + 2 * 2 * 0.5
    # 1 s per call through every layer, 0.1 s per row.
    assert seconds(cost, 1.0, 0.1) == pytest.approx(2 * 1.8 + 2 * 4.2 + 2 * 0.25 * 2.6)
    naive = round_cost("naive", [ModuleSite(0, 0, 4), ModuleSite(1, 1, 2)], num_layers=2,
                       chunk_rows=[8])  # fmt: skip
    assert describe(cost, naive) == (
        "scoring (fast): each round scores 6 ranks on 8 dev examples (1 chunk); per process 6 "
        "forwards, the work of 11.0 forwards of B_val (naive: 14.0)"
    )
