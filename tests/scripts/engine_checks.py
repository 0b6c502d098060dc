"""Run under `deepspeed --num_gpus 2`: the Engine checks that need real processes, one launch for
all of them (the start-up of a launch costs more than most checks). Each check builds its own
model and engine and destroys the engine after; each prints `rank R: <what> ok ...` when every
assertion in it held, and the first failure ends the launch with its traceback.

- scoring: under ZeRO-3, fast AB-LoRA scores equal naive ones (1e-5 relative, fp32) and the
  single-process reference, and give the same allocation; screened scores give the
  single-process screened plan, and the processes agree.
- qlora: ZeRO-3 takes a bitsandbytes nf4 base (QLoRA): the packed weights are partitioned by the
  engine; the first loss and the fast scores equal the single-process ones; a round's rebuild,
  more training steps and the gathered export all work.
- rebuild-zero3, rebuild-zero2, rebuild-zero2-gates: a rebuild keeps surviving ranks' fp32 values
  and Adam moments exactly, gives new ranks zero moments, and training goes on, under ZeRO-3
  and ZeRO-2; the last with trained gates in their own parameter group (DNAS), which ZeRO-2 gives
  Adam state only after that group's first step (the `exp_avg not found` crash of BENCHMARKS.md).

    argv: INPUTS_DIR [CHECK ...]  (default: every check, in the order above)

INPUTS_DIR holds what tests/helpers.py `write_engine_check_inputs` wrote: scoring/ and qlora/,
each a base checkpoint and the reference computed by one plain process (ref.json).
"""

import hashlib
import json
import sys
import time
from pathlib import Path

sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import bitsandbytes as bnb
import torch
from transformers import AutoModelForCausalLM

from alora_ds.core.allocation import plan_round, pruned_by_module
from alora_ds.core.inject import gated_modules, inject_gated_lora, rank_map
from alora_ds.core.layer import GateKind
from alora_ds.core.surgery import ADAM_STATE_KEYS
from alora_ds.io.examples import make_batches
from alora_ds.io.models import load_base_model, tiny_llama_config
from alora_ds.runtime import process as P
from alora_ds.runtime import zero
from alora_ds.runtime.engine import Engine
from tests.helpers import random_examples, randomise_adapters


def ds_config(name: str, world_size: int) -> dict:
    ds = json.loads((REPO / "ds_configs" / f"{name}.json").read_text())
    ds.update(
        train_micro_batch_size_per_gpu=4,
        gradient_accumulation_steps=1,
        train_batch_size=4 * world_size,
    )
    return ds


def relative_error(got: dict, want: dict) -> float:
    """Largest relative difference over {module: [values]} pairs."""
    return max(
        abs(g - w) / abs(w) for name in want for g, w in zip(got[name], want[name], strict=True)
    )


def check_scoring(inputs: Path, info: P.DistInfo) -> None:
    reference = json.loads((inputs / "ref.json").read_text())
    ds = ds_config("zero3", info.world_size)
    with zero.partitioned_loading(ds):  # the test's model, partitioned while loading
        model = AutoModelForCausalLM.from_pretrained(inputs / "base")
    modules = inject_gated_lora(model, 42, seed=0)
    randomise_adapters(modules, seed=1, uneven=True)  # as the reference: same values everywhere
    engine = Engine(model, ds, zero.OptimizerSettings(0.0, (0.9, 0.999), 1e-8, 0.0), info)
    batches = make_batches(random_examples(10, seed=3), 4)
    # A first training step (lr 0: nothing moves), as in a real run: ZeRO-3 prefetching is set
    # up by the first forward after initialize.
    engine.backward(engine.loss(batches[0]))
    engine.step()

    naive = engine.ab_lora_scores(batches, mode="naive")
    fast = engine.ab_lora_scores(batches, mode="fast", max_rows=12)
    worst = max(
        relative_error(getattr(scores, key), reference[key])
        for scores in (naive, fast)
        for key in ("S_without", "S_only")
    )
    for key in ("S_without", "S_only"):
        worst = max(worst, relative_error(getattr(fast, key), getattr(naive, key)))
    assert worst < 1e-5, worst
    assert plan_round(naive.importance, 7) == plan_round(fast.importance, 7)
    assert plan_round(fast.importance, 7).to_json() == reference["plan"]
    assert len(gated_modules(model)) == 21
    print(f"rank {info.rank}: fast == naive, max rel err {worst:.2e}", flush=True)

    screened = engine.screened_scores(batches, 7, candidates=7)
    expected = reference["screened"]
    assert screened.exact == expected["exact"], "a different exact set than one process"
    for name, values in expected["importance"].items():
        for got, want in zip(screened.importance[name], values, strict=True):
            assert abs(got - want) <= 1e-5 * max(abs(want), 1e-3), (name, got, want)
    assert plan_round(screened.importance, 7).to_json() == expected["plan"]
    # Every process holds the same scores: their checksum is all-gathered and compared.
    text = json.dumps(screened.importance, sort_keys=True).encode()
    digest = torch.tensor([int.from_bytes(hashlib.sha256(text).digest()[:7], "little")])
    assert len({int(t) for t in P.all_gather_tensor(digest)}) == 1, "processes disagree"
    print(
        f"rank {info.rank}: screened == 1 process, {screened.record['exact_ranks']} exact",
        flush=True,
    )
    zero.destroy_engine(engine.ds, model)


def check_qlora(inputs: Path, info: P.DistInfo) -> None:
    reference = json.loads((inputs / "ref.json").read_text())
    ds = ds_config("zero3", info.world_size)
    model, _ = load_base_model(
        str(inputs / "base"), None, dtype=torch.float32, attn_implementation="sdpa", seed=0,
        loading_context=zero.partitioned_loading(ds), load_in_4bit=True,
    )  # fmt: skip
    model.config.use_cache = False
    modules = inject_gated_lora(model, 28, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the same B on every process and in the test's reference
        for module in modules.values():
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.1)
    q_proj = model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    # transformers never partitions a quantised model while loading: every process holds all of
    # it (64 x 64 nf4 values packed into fp32 storage: 512 elements) until the engine shards it.
    assert not zero.is_partitioned(q_proj.weight) and q_proj.weight.numel() == 64 * 64 // 8
    engine = Engine(model, ds, zero.OptimizerSettings(0.0, (0.9, 0.999), 1e-8, 0.0), info)
    assert zero.is_partitioned(q_proj.weight) and q_proj.weight.numel() == 0  # sharded by ZeRO-3

    batches = make_batches(random_examples(8, seed=3), 4)
    loss = engine.loss(batches[0])  # lr 0: the first step moves nothing
    assert abs(float(loss) - reference["loss"]) < 1e-5, (float(loss), reference["loss"])
    engine.backward(loss)
    engine.step()

    scores = engine.ab_lora_scores(batches, mode="fast")
    worst = max(
        relative_error(getattr(scores, key), reference[key]) for key in ("S_without", "S_only")
    )
    assert worst < 1e-5, worst

    plan = plan_round(scores.importance, 7)
    engine.settings = zero.OptimizerSettings(1e-2, (0.9, 0.999), 1e-8, 0.0)  # the rebuilt AdamW's
    engine.rebuild(pruned_by_module(plan.pruned), plan.added, seed=0, round_index=1)
    assert rank_map(model) == plan.ranks_after
    losses = []
    for i in range(3):
        loss = engine.loss(batches[i % 2])
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses))), losses
    exported = engine.adapter_tensors()
    assert {n: a.lora_A.shape[0] for n, a in exported.items()} == plan.ranks_after
    P.barrier()
    print(f"rank {info.rank}: qlora zero3 ok, max rel err {worst:.2e}, losses {losses}", flush=True)
    zero.destroy_engine(engine.ds, model)


def rank_dim(tensor_name: str) -> int:
    """The dimension that indexes ranks: B's columns, A's rows, the gate logits' only one."""
    return 1 if tensor_name == "lora_B" else 0


def check_rebuild(stage: str, gate_kind: GateKind, info: P.DistInfo) -> None:
    ds = ds_config(stage, info.world_size)
    with zero.partitioned_loading(ds):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_llama_config())
    inject_gated_lora(model, 28, seed=0, gate_kind=gate_kind)
    engine = Engine(model, ds, zero.OptimizerSettings(1e-2, (0.9, 0.999), 1e-8, 0.0), info)
    batches = make_batches(random_examples(8, seed=info.rank), 4)
    for i in range(3):
        engine.backward(engine.loss(batches[i % 2]))
        engine.step()

    scores = engine.ab_lora_scores(make_batches(random_examples(8, seed=99), 8))
    plan = plan_round(scores.importance, 7)
    pruned = pruned_by_module(plan.pruned)
    before = engine.read_states()
    engine.rebuild(pruned, plan.added, seed=0, round_index=1)
    after = engine.read_states()
    assert rank_map(model) == plan.ranks_after
    assert engine.optimizer_step_count() == 3
    tensors = {"lora_A", "lora_B"} | ({"gate_logits"} if gate_kind.trained else set())
    for name, old in before.items():
        assert set(old.values) == tensors, (name, sorted(old.values))
        keep = torch.tensor(
            [i for i in range(old.r) if i not in pruned.get(name, [])], dtype=torch.long
        )
        n, new = len(keep), after[name]
        assert new.r == new.values["lora_A"].shape[0] == plan.ranks_after[name], name
        for tensor in tensors:
            dim = rank_dim(tensor)
            # Survivors: their exact fp32 masters and both Adam moments, in their new places.
            survivors = new.values[tensor].narrow(dim, 0, n)
            assert torch.equal(survivors, old.values[tensor].index_select(dim, keep)), (name, tensor)  # fmt: skip
            for key in ADAM_STATE_KEYS:
                moved = old.moments[tensor][key].index_select(dim, keep)
                assert torch.equal(new.moments[tensor][key].narrow(dim, 0, n), moved), (name, tensor, key)  # fmt: skip
                # New ranks start with zero moments.
                assert torch.all(new.moments[tensor][key].narrow(dim, n, new.r - n) == 0), (name, tensor, key)  # fmt: skip
        assert torch.all(new.values["lora_B"][:, n:] == 0), name  # new ranks add nothing yet
        if gate_kind.trained:  # a new rank's gate starts at 1
            assert torch.all(new.values["gate_logits"][n:] == gate_kind.initial_logit), name
    for i in range(2):
        loss = engine.loss(batches[i % 2])
        engine.backward(loss)
        engine.step()
    assert torch.isfinite(loss)
    assert engine.optimizer_step_count() == 5
    print(
        f"rank {info.rank}: rebuild ok under {stage}, {gate_kind.value} gates, "
        f"{sum(plan.ranks_after.values())} ranks",
        flush=True,
    )
    zero.destroy_engine(engine.ds, model)


CHECKS = {
    "scoring": lambda inputs, info: check_scoring(inputs / "scoring", info),
    "qlora": lambda inputs, info: check_qlora(inputs / "qlora", info),
    "rebuild-zero3": lambda inputs, info: check_rebuild("zero3", GateKind.HARD, info),
    "rebuild-zero2": lambda inputs, info: check_rebuild("zero2", GateKind.HARD, info),
    "rebuild-zero2-gates": lambda inputs, info: check_rebuild("zero2", GateKind.RELAXED, info),
}

if __name__ == "__main__":
    inputs, asked = Path(sys.argv[1]), sys.argv[2:] or list(CHECKS)
    unknown = sorted(set(asked) - set(CHECKS))
    assert not unknown, f"unknown checks {unknown}; known: {list(CHECKS)}"
    info = P.init_distributed(60)
    for check in asked:
        started = time.perf_counter()
        CHECKS[check](inputs, info)
        print(f"rank {info.rank}: {check} took {time.perf_counter() - started:.1f}s", flush=True)
