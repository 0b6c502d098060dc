"""Run under `deepspeed --num_gpus 2`: a ZeRO-3 rebuild keeps surviving ranks' fp32 values and
Adam moments exactly, gives new ranks zero moments, and training goes on afterwards."""

import json
import sys
from pathlib import Path

sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from transformers import AutoModelForCausalLM

from alora_ds.core.allocation import plan_round, pruned_by_module
from alora_ds.core.inject import inject_gated_lora, rank_map
from alora_ds.core.surgery import ADAM_STATE_KEYS
from alora_ds.io.examples import make_batches
from alora_ds.io.models import tiny_llama_config
from alora_ds.runtime import process as P
from alora_ds.runtime import zero
from alora_ds.runtime.engine import Engine
from tests.helpers import random_examples

ds = json.loads(Path(sys.argv[1]).read_text())
info = P.init_distributed(60)
ds.update(
    train_micro_batch_size_per_gpu=4,
    gradient_accumulation_steps=1,
    train_batch_size=4 * info.world_size,
)
with zero.partitioned_loading(ds):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config())
inject_gated_lora(model, 28, seed=0)
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
for name, old in before.items():
    keep = [i for i in range(old.gate.shape[0]) if i not in pruned.get(name, [])]
    n, new = len(keep), after[name]
    assert torch.equal(new.values["lora_A"][:n], old.values["lora_A"][keep]), name
    assert torch.equal(new.values["lora_B"][:, :n], old.values["lora_B"][:, keep]), name
    for key in ADAM_STATE_KEYS:
        assert torch.equal(new.moments["lora_A"][key][:n], old.moments["lora_A"][key][keep]), name
        assert torch.equal(
            new.moments["lora_B"][key][:, n:].abs().sum(0),
            torch.zeros(new.values["lora_B"].shape[1] - n),
        )
        assert torch.all(new.moments["lora_A"][key][n:] == 0), name
    assert torch.all(new.values["lora_B"][:, n:] == 0), name
    assert new.values["lora_A"].shape[0] == plan.ranks_after[name]
for i in range(2):
    loss = engine.loss(batches[i % 2])
    engine.backward(loss)
    engine.step()
assert torch.isfinite(loss)
assert engine.optimizer_step_count() == 5
print(f"rank {info.rank}: rebuild ok, {sum(plan.ranks_after.values())} ranks", flush=True)
