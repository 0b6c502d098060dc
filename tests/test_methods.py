"""The ALoRA variants of the paper's Table 6 in the same trainer: ALoRA-Sensi and ALoRA-DNAS."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from alora_ds.adalora import AdaLoraSchedule
from alora_ds.allocation import plan_round
from alora_ds.lora import GatedLoRALinear
from alora_ds.schedule import bilevel_split
from alora_ds.sensitivity import SensitivityTracker
from tests.test_train import BUDGET, PARAM_BUDGET, RANK_COSTS, read_rounds, run_train


def test_sensitivity_matches_a_hand_computed_case():
    tracker = SensitivityTracker(beta1=0.5, beta2=0.5)
    a, b = torch.tensor([[1.0, -2.0], [0.5, 0.0]]), torch.tensor([[2.0, 1.0]])  # r = 2
    ga, gb = torch.tensor([[1.0, 1.0], [2.0, 3.0]]), torch.tensor([[0.5, -1.0]])
    tracker.update({"m": {"lora_A": (a, ga), "lora_B": (b, gb)}})
    # I = |w g|: A [[1, 2], [1, 0]], B [[1, 1]]. I_bar = 0.5 I; U_bar = 0.5 |I - I_bar| = 0.25 I.
    # s = I_bar U_bar = 0.125 I^2: A [[.125, .5], [.125, 0]], B [[.125, .125]].
    # rank 0: mean(.125, .5) + .125 = 0.4375; rank 1: mean(.125, 0) + .125 = 0.1875.
    assert tracker.rank_scores({"m": 2})["m"] == pytest.approx([0.4375, 0.1875])
    tracker.update({"m": {"lora_A": (a, ga), "lora_B": (b, gb)}})
    # Second step, same I: I_bar = 0.75 I; U_bar = 0.5 * 0.25 I + 0.5 * 0.25 I = 0.25 I.
    # s = 0.1875 I^2: rank 0: mean(.1875, .75) + .1875 = 0.65625.
    assert tracker.rank_scores({"m": 2})["m"][0] == pytest.approx(0.65625)

    tracker.apply_plan({"m": [0]}, {"m": 2})  # rank 0 pruned, two new ranks at zero
    scores = tracker.rank_scores({"m": 3})["m"]
    # old rank 1 is now rank 0: mean(.1875 * [1, 0]) + .1875 * 1 = 0.28125
    assert scores[0] == pytest.approx(0.28125) and scores[1:] == [0.0, 0.0]
    restored = SensitivityTracker(beta1=0.5, beta2=0.5)
    restored.load_state_tensors(tracker.state_tensors())
    assert restored.rank_scores({"m": 3}) == tracker.rank_scores({"m": 3})


def test_dnas_steps_train_only_their_part():
    torch.manual_seed(0)
    layer = GatedLoRALinear(nn.Linear(6, 5), r=3, alpha=6.0, relaxed_gates=True)
    with torch.no_grad():
        layer.lora_B.normal_()  # B = 0 at init would give A no gradient in any case
    x = torch.randn(4, 6)
    for part, trained, frozen in (
        ("weights", ("lora_A", "lora_B"), ("gate_logits",)),
        ("gates", ("gate_logits",), ("lora_A", "lora_B")),
    ):
        layer.zero_grad(set_to_none=True)
        layer.train_only = part
        layer(x).square().sum().backward()
        for name in trained:
            assert getattr(layer, name).grad.abs().sum() > 0, (part, name)
        for name in frozen:  # in the graph (ZeRO sees a gradient) but exactly zero
            assert torch.equal(getattr(layer, name).grad, torch.zeros_like(getattr(layer, name)))
    layer.train_only = None
    reference = layer(x)
    layer.train_only = "gates"
    assert torch.equal(layer(x), reference)  # the forward value never changes


def test_bilevel_split_is_disjoint_and_covers_the_training_set():
    d1, d2 = bilevel_split(47, seed=3)
    assert not set(d1) & set(d2) and sorted(d1 + d2) == list(range(47))
    assert abs(len(d1) - len(d2)) <= 1 and bilevel_split(47, seed=3) == (d1, d2)


@pytest.mark.parametrize("method", ["alora-sensi", "alora-dnas"])
def test_variant_runs_under_zero3_within_its_budget(method, tmp_path):
    out = tmp_path / method
    result = run_train(out, "--method", method, "--report_to", "none")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rounds = read_rounds(out)
    assert [r["round"] for r in rounds] == [1, 2]
    costs = {
        n: RANK_COSTS[n.rsplit(".", 1)[1]] + (method == "alora-dnas") for n in rounds[0]["scores"]
    }
    budget = PARAM_BUDGET + (BUDGET if method == "alora-dnas" else 0)
    for record in rounds:
        assert record["S_M"] is None  # no ablations: the scores come from elsewhere
        scores = record["scores"]
        assert all(len(scores[n]) == r for n, r in record["ranks_before"].items())
        if method == "alora-dnas":  # gate values 2 sigmoid(a), trained away from their init 1
            values = [v for s in scores.values() for v in s]
            assert all(0 < v < 2 for v in values) and len(set(values)) > 1
        else:
            assert all(v >= 0 for s in scores.values() for v in s) and any(
                v > 0 for s in scores.values() for v in s
            )
        plan = plan_round(scores, 7, rank_costs=costs, param_budget=budget)
        assert [list(p) for p in plan.pruned] == record["pruned"]
        assert plan.added == record["added"]
        assert sum(record["ranks_after"].values()) <= BUDGET
    summary = json.loads((out / "summary.json").read_text())
    assert summary["adapter_params_end"] <= summary["adapter_params_peak"] == budget
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"]


def test_sora_starts_at_twice_the_rank_and_ends_at_the_budget(tmp_path):
    out = tmp_path / "sora"
    result = run_train(out, "--method", "sora", "--sora_lambda", "2", "--report_to", "none")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert read_rounds(out) == []  # no allocation rounds: the L1 step on the gates decides
    final = json.loads((out / "allocation" / "final_prune.json").read_text())
    gates = final["gates"]
    assert all(len(g) == 4 for g in gates.values())  # r_init 2 x 2 on each of 14 modules
    assert sum(final["ranks_after"].values()) == BUDGET
    # The pruned ranks are those with the smallest |g|, ties by (module, index).
    ranked = sorted((abs(g), n, i) for n, values in gates.items() for i, g in enumerate(values))
    assert sorted(final["pruned"]) == sorted([n, i] for _, n, i in ranked[: 2 * BUDGET - BUDGET])
    assert any(g != 1.0 for values in gates.values() for g in values)  # the gates were trained
    summary = json.loads((out / "summary.json").read_text())
    start = 2 * (PARAM_BUDGET + BUDGET)  # every rank also holds its gate
    assert summary["adapter_params_start"] == summary["adapter_params_peak"] == start
    assert summary["total_ranks_end"] == BUDGET
    assert not (out / "best_adapter").exists()


def test_adalora_masks_the_least_important_triplets_to_the_budget():
    schedule = AdaLoraSchedule(["a", "b"], init_r=2, target_r=1, total_step=4, tinit=0, tfinal=1)
    ones = torch.ones
    # Module a: rank 1 important; module b: rank 0 important (large |w * g| on A, B and g).
    observed = {
        "a": {"lora_A": (ones(2, 3), torch.tensor([[0.1] * 3, [5.0] * 3])),
              "lora_B": (ones(4, 2), torch.tensor([[0.1, 5.0]] * 4)),
              "gate_logits": (ones(2), torch.tensor([0.1, 5.0]))},
        "b": {"lora_A": (ones(2, 3), torch.tensor([[3.0] * 3, [0.2] * 3])),
              "lora_B": (ones(4, 2), torch.tensor([[3.0, 0.2]] * 4)),
              "gate_logits": (ones(2), torch.tensor([3.0, 0.2]))},
    }  # fmt: skip
    for step in (1, 2):
        schedule.observe(step, observed)
    gates = {"a": [1.0, 1.0], "b": [1.0, 1.0]}
    assert schedule.mask(0, gates) is None  # within tinit: nothing masked
    assert schedule.mask(4, gates) == {"a": [0.0, 1.0], "b": [1.0, 0.0]}  # budget 2 of 4


def test_adalora_runs_under_zero3_and_its_allocation_changes(tmp_path):
    out = tmp_path / "adalora"
    result = run_train(out, "--method", "adalora", "--report_to", "none")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert read_rounds(out) == []  # AdaLoRA's own schedule, no ALoRA rounds
    final = json.loads((out / "allocation" / "final_prune.json").read_text())
    assert sum(final["ranks_after"].values()) == BUDGET
    assert len(set(final["ranks_after"].values())) > 1  # not a uniform LoRA in disguise
    zeros = sum(g == 0 for values in final["gates"].values() for g in values)
    assert zeros >= BUDGET  # AdaLoRA's masks had reached the budget before the final prune
    summary = json.loads((out / "summary.json").read_text())
    assert summary["adapter_params_peak"] == 2 * (PARAM_BUDGET + BUDGET)
    assert summary["total_ranks_end"] == BUDGET


def test_gated_variants_rebuild_under_zero2(tmp_path):
    """ZeRO-1/2 link Adam's state to a parameter group only after its first step; the gates'
    own group must still be readable at a rebuild (a DNAS round) and a checkpoint."""
    out = tmp_path / "dnas"
    result = run_train(
        out, "--method", "alora-dnas", "--report_to", "none", "--save_steps", "3", ds="zero2",
        procs=1,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [r["round"] for r in read_rounds(out)] == [1, 2]
    assert (out / "checkpoints" / "latest").is_file()
