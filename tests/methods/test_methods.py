"""Each method on its own, in one process, through the real Engine the trainer hands it (no
launcher): what it starts with, what it does at each step, what it scores, what it prunes."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from alora_ds import config
from alora_ds.core.layer import GatedLoRALinear, GateKind
from alora_ds.core.schedule import bilevel_split, draw_validation_indices, make_schedule
from alora_ds.errors import InputError
from alora_ds.io.examples import make_batches
from alora_ds.methods import METHODS, MethodSettings, build_method
from alora_ds.methods.adalora import AdaLoraSchedule
from alora_ds.methods.base import RoundInputs, StepPart
from alora_ds.methods.sensitivity import SensitivityTracker
from alora_ds.methods.sora import proximal_l1
from alora_ds.scoring.direct import ab_lora_scores
from tests.helpers import random_examples, train_steps


def round_inputs(engine, round_index=1, dev=None, calls=None) -> RoundInputs:
    @contextlib.contextmanager
    def progress(total):
        yield (calls.append if calls is not None else (lambda n: None))

    dev = dev if dev is not None else random_examples(12, seed=5)
    return RoundInputs(round_index, engine, dev, 0, torch.device("cpu"), progress)


def test_every_method_is_registered_under_the_name_the_options_accept():
    assert set(METHODS) == set(config.METHODS)
    assert all(cls.name == name for name, cls in METHODS.items())


def test_lora_is_the_interface_s_defaults():
    lora = build_method("lora", MethodSettings(num_rounds=8))
    assert (lora.gate_kind, lora.allocates, lora.schedule_rounds()) == (GateKind.HARD, False, 0)
    assert lora.start_budget(56) == 56 and lora.fits_budget_while_training
    assert lora.data_pools(5) == ([0, 1, 2, 3, 4],)
    assert lora.step_part(3) == StepPart(pool=0, pool_step=3, trains=None)
    assert lora.state_tensors() == {} and lora.final_prune(None, 28) is None
    with pytest.raises(NotImplementedError, match="lora runs no allocation rounds"):
        lora.round_scores(None)


@pytest.mark.parametrize("mode", ["naive", "fast"])
def test_alora_scores_its_round_s_b_val_by_ablation(make_engine, mode):
    engine = make_engine()
    settings = MethodSettings(seed=3, val_examples=8, scoring=mode, scoring_batch_size=4)
    alora = build_method("alora", settings)
    assert alora.allocates and alora.schedule_rounds() == 8
    dev, calls = random_examples(12, seed=5), []
    scores = alora.round_scores(round_inputs(engine, 2, dev, calls))
    # B_val: 8 of the 12 dev examples, drawn by (seed, round), the same on every process.
    chosen = [dev[i] for i in draw_validation_indices(12, 8, seed=3, round_index=2)]
    expected = ab_lora_scores(engine.model, make_batches(chosen, 4))
    assert scores.s_m == pytest.approx(expected.S_M, rel=1e-6)
    for name, values in expected.importance.items():
        assert scores.importance[name] == pytest.approx(values, rel=1e-5, abs=1e-7)
    assert sum(calls) == 28  # the progress display counts every live rank once


def test_sensi_observes_every_step_and_follows_the_surgery(make_engine):
    engine = make_engine()
    sensi = build_method("alora-sensi", MethodSettings())
    train_steps(engine, make_batches(random_examples(8, seed=1), 4), 3, sensi)
    scores = sensi.round_scores(round_inputs(engine)).importance
    assert {n: len(v) for n, v in scores.items()} == engine.rank_map()
    assert all(v >= 0 for s in scores.values() for v in s) and any(
        v > 0 for s in scores.values() for v in s
    )
    name = "model.layers.0.self_attn.q_proj"
    sensi.after_rebuild({name: [0]}, {name: 2})
    after = sensi.tracker.rank_scores({**engine.rank_map(), name: 3})[name]
    assert after == pytest.approx([scores[name][1], 0.0, 0.0])
    restored = build_method("alora-sensi", MethodSettings())
    restored.load_state_tensors(sensi.state_tensors())
    assert restored.tracker.rank_scores({name: 3}) == sensi.tracker.rank_scores({name: 3})


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


def test_dnas_alternates_its_two_halves_and_scores_by_gate_values(make_engine):
    dnas = build_method("alora-dnas", MethodSettings(seed=3))
    assert dnas.gate_kind is GateKind.RELAXED and dnas.allocates
    d1, d2 = dnas.data_pools(47)
    assert (d1, d2) == bilevel_split(47, seed=3)
    assert not set(d1) & set(d2) and sorted(d1 + d2) == list(range(47))
    assert abs(len(d1) - len(d2)) <= 1
    parts = [dnas.step_part(step) for step in range(4)]
    assert parts == [
        StepPart(0, 0, "weights"), StepPart(1, 0, "gates"),
        StepPart(0, 1, "weights"), StepPart(1, 1, "gates"),
    ]  # fmt: skip
    engine = make_engine(GateKind.RELAXED)
    assert all(
        v == 1.0 for s in dnas.round_scores(round_inputs(engine)).importance.values() for v in s
    )
    name = "model.layers.1.mlp.up_proj"
    with torch.no_grad():
        engine.modules[name].gate_logits.copy_(torch.tensor([0.5, -1.0]))
    scores = dnas.round_scores(round_inputs(engine)).importance
    assert scores[name] == pytest.approx((2 * torch.sigmoid(torch.tensor([0.5, -1.0]))).tolist())


def test_dnas_steps_train_only_their_part():
    torch.manual_seed(0)
    layer = GatedLoRALinear(nn.Linear(6, 5), r=3, alpha=6.0, gate_kind=GateKind.RELAXED)
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


def test_sora_takes_the_l1_proximal_step_and_keeps_the_largest_gates(make_engine):
    sora = build_method("sora", MethodSettings(sora_lambda=2.0))
    assert (sora.gate_kind, sora.start_budget(28), sora.fits_budget_while_training) == (
        GateKind.IDENTITY, 56, False,
    )  # fmt: skip
    engine = make_engine(GateKind.IDENTITY, rank_budget=56)
    values = torch.tensor([-0.02, -0.005, 0.008, 0.03])
    with torch.no_grad():
        for module in engine.modules.values():
            module.gate_logits.copy_(values)
    sora.after_step(1, 0.005, engine)  # threshold lr x lambda = 0.01
    expected = proximal_l1(values, 0.01)
    assert torch.allclose(expected, torch.tensor([-0.01, 0.0, 0.0, 0.02]), atol=1e-7)
    for gates in engine.gate_values().values():
        assert gates == pytest.approx(expected.tolist(), abs=1e-7)
    prune = sora.final_prune(engine, 28)
    # 14 modules x 4 gates: 28 kept; the two zeros of every module go first (ties by name, index).
    assert len(prune.pruned) == 28 and prune.zero_gates == 28
    assert all(index in (1, 2) for _, index in prune.pruned)


def test_adalora_masks_to_its_schedule_and_prunes_to_the_budget(make_engine):
    with pytest.raises(InputError, match="--num_rounds >= 1"):
        build_method("adalora", MethodSettings(num_rounds=0))
    adalora = build_method("adalora", MethodSettings(num_rounds=2))
    assert adalora.schedule_rounds() == 2 and not adalora.allocates
    engine = make_engine(GateKind.IDENTITY, rank_budget=56)
    schedule = make_schedule(64, 4, num_train_epochs=1, max_steps=8, warmup_ratio=0.0,
                             num_rounds=2, initial_epochs=0, round_epochs=0,
                             initial_steps=2, round_steps=2)  # fmt: skip
    adalora.setup(list(engine.modules), 4, schedule)
    train_steps(engine, make_batches(random_examples(8, seed=1), 4), 8, adalora)
    gates = engine.gate_values()
    # By the end of its window AdaLoRA has masked each module to its target of 2 ranks.
    assert sum(g == 0 for values in gates.values() for g in values) >= 28
    prune = adalora.final_prune(engine, 28)
    assert len(prune.pruned) == 28
    assert adalora.state_tensors().keys() == adalora.schedule.tracker.state_tensors().keys()


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
