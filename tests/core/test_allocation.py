"""Allocation rules of Algorithm 1 as pure functions."""

from __future__ import annotations

import random

import pytest

from alora_ds.core.allocation import (
    NonFiniteScore,
    check_scores,
    plan_round,
    pruned_by_module,
    resolve_prune_count,
    select_pruned,
    share_new_ranks,
)


def test_footnote_example_8_over_three_modules():
    shares = share_new_ranks(8, ["m3", "m1", "m2"], {"m1": 0.9, "m2": 0.5, "m3": 0.1})
    assert shares == {"m1": 3, "m2": 3, "m3": 2}


def test_remainder_goes_to_highest_mean_ties_by_name():
    assert share_new_ranks(2, ["b", "a", "c"], {"a": 1.0, "b": 1.0, "c": 1.0}) == {"a": 1, "b": 1}
    assert share_new_ranks(1, ["a", "b"], {"a": 0.0, "b": 2.0}) == {"b": 1}
    assert share_new_ranks(0, ["a"], {"a": 1.0}) == {}
    assert share_new_ranks(3, [], {}) == {}


def test_plan_prunes_lowest_and_gives_to_modules_that_lost_none():
    scores = {
        "m.a": [0.5, -1.0, 0.2],
        "m.b": [-2.0, 0.3],
        "m.c": [0.4, 0.6],
        "m.d": [0.1, 0.1],
    }
    plan = plan_round(scores, 2)
    assert plan.pruned == [("m.a", 1), ("m.b", 0)]
    assert plan.receivers == ["m.c", "m.d"]
    assert plan.added == {"m.c": 1, "m.d": 1}
    assert plan.ranks_before == {"m.a": 3, "m.b": 2, "m.c": 2, "m.d": 2}
    assert plan.ranks_after == {"m.a": 2, "m.b": 1, "m.c": 3, "m.d": 3}
    assert pruned_by_module(plan.pruned) == {"m.a": [1], "m.b": [0]}
    assert plan.to_json()["pruned"] == [["m.a", 1], ["m.b", 0]]

    plan = plan_round(scores, 3)  # remainder 1 of 3 over c (mean 0.5) and d (mean 0.1)
    assert plan.pruned == [("m.a", 1), ("m.b", 0), ("m.d", 0)]
    assert plan.added == {"m.c": 3}


def test_ties_broken_by_module_name_then_rank_index():
    scores = {"z": [0.0, 0.0], "a": [0.0, 0.0], "m": [1.0]}
    assert select_pruned(scores, 1) == [("a", 0)]
    assert select_pruned(scores, 3) == [("a", 0), ("a", 1), ("z", 0)]


def test_every_module_pruned_adds_nothing():
    plan = plan_round({"a": [0.0, 5.0], "b": [0.0, 5.0], "c": [0.0, 5.0]}, 3)
    assert plan.added == {}
    assert plan.ranks_after == {"a": 1, "b": 1, "c": 1}
    assert sum(plan.ranks_after.values()) < sum(plan.ranks_before.values())


def test_rank_never_negative_and_empty_modules_receive_nothing():
    plan = plan_round({"a": [-1.0], "b": [5.0, 6.0], "c": []}, 1)
    assert plan.ranks_after == {"a": 0, "b": 3, "c": 0}
    # A module already at zero is not a receiver, and cannot lose anything more.
    plan = plan_round({"a": [], "b": [1.0, 2.0], "c": [0.0]}, 3)
    assert plan.ranks_after == {"a": 0, "b": 0, "c": 0}
    assert all(r >= 0 for r in plan.ranks_after.values())
    with pytest.raises(ValueError, match="cannot prune 4 ranks: only 3 ranks are live"):
        plan_round({"a": [], "b": [1.0, 2.0], "c": [0.0]}, 4)


def test_same_plan_whatever_the_order_of_modules():
    rng = random.Random(0)
    scores = {
        f"model.layers.{i}.{m}": [rng.choice([0.0, 0.5, 1.0]) for _ in range(4)]
        for i in range(4)
        for m in ("q_proj", "v_proj", "down_proj")
    }
    reference = plan_round(scores, 7)
    for _ in range(5):
        items = list(scores.items())
        rng.shuffle(items)
        assert plan_round(dict(items), 7) == reference
    assert sum(reference.ranks_after.values()) == sum(reference.ranks_before.values())


def test_prune_count_as_int_or_fraction():
    assert resolve_prune_count(7, 448) == 7
    assert resolve_prune_count(7.0, 448) == 7
    assert resolve_prune_count(0.05, 448) == 22
    assert resolve_prune_count(0.001, 448) == 1
    with pytest.raises(ValueError, match=r"fractional prune count must be in \(0, 1\)"):
        resolve_prune_count(1.5, 10)
    with pytest.raises(ValueError, match="must be >= 0, got -1"):
        resolve_prune_count(-1, 10)
    with pytest.raises(ValueError, match="cannot prune 11 ranks: only 10"):
        resolve_prune_count(11, 10)


def test_non_finite_score_names_module_and_rank():
    # One check for every producer of scores (AB-LoRA, Sensi, DNAS): the round's.
    with pytest.raises(NonFiniteScore, match="importance score of m.b rank 1 is nan"):
        plan_round({"m.a": [0.0], "m.b": [1.0, float("nan")]}, 1)
    with pytest.raises(NonFiniteScore, match="importance score of m.a rank 0 is inf"):
        check_scores({"m.b": [1.0], "m.a": [float("inf")]})
    assert issubclass(NonFiniteScore, ValueError)


def test_parameter_budget_withdraws_new_ranks_from_the_least_important_receiver():
    scores = {"k": [-1.0, 1.0], "q": [2.0, 2.0], "up": [3.0, 3.0], "down": [0.5, 0.5]}
    costs = {"k": 96, "q": 128, "up": 192, "down": 192}
    budget = 2 * (96 + 128 + 192 + 192)
    free = plan_round(scores, 1)
    assert free.added == {"up": 1}  # the highest mean among q, up, down takes the remainder
    capped = plan_round(scores, 1, rank_costs=costs, param_budget=budget)
    # k's rank (96 parameters) cannot pay for a rank of up (192): the new rank is withdrawn.
    assert capped.added == {}
    assert capped.ranks_after == {"k": 1, "q": 2, "up": 2, "down": 2}
    scores = {"k": [-1.0, -1.0, 1.0], "q": [2.0], "up": [3.0], "down": [0.5]}
    capped = plan_round(scores, 2, rank_costs=costs, param_budget=3 * 96 + 128 + 2 * 192)
    # 2 x 96 parameters freed; up (highest mean) and q were given one rank each: q, the less
    # important receiver, gives its new rank back, and up's (192) fits exactly.
    assert capped.added == {"up": 1}
    assert sum(r * costs[n] for n, r in capped.ranks_after.items()) <= 3 * 96 + 128 + 2 * 192
