"""Run under `deepspeed --num_gpus 2`: ZeRO-3 takes a bitsandbytes nf4 base (QLoRA). The packed
weights are partitioned by the engine; the first loss and the fast AB-LoRA scores equal the
single-process ones written by the test (same base, same adapters); a round's rebuild, more
training steps and the gathered export all work.

    argv: DS_CONFIG TMP_DIR (holding base/ and ref.json)
"""

import json
import sys
from pathlib import Path

sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import bitsandbytes as bnb
import torch

from alora_ds.core.allocation import plan_round, pruned_by_module
from alora_ds.core.inject import inject_gated_lora, rank_map
from alora_ds.io.examples import make_batches
from alora_ds.io.models import load_base_model
from alora_ds.runtime import process as P
from alora_ds.runtime import zero
from alora_ds.runtime.engine import Engine
from tests.helpers import random_examples

ds = json.loads(Path(sys.argv[1]).read_text())
tmp = Path(sys.argv[2])
reference = json.loads((tmp / "ref.json").read_text())
info = P.init_distributed(60)
ds.update(
    train_micro_batch_size_per_gpu=4,
    gradient_accumulation_steps=1,
    train_batch_size=4 * info.world_size,
)
model, _ = load_base_model(
    str(tmp / "base"),
    None,
    dtype=torch.float32,
    attn_implementation="sdpa",
    seed=0,
    loading_context=zero.partitioned_loading(ds),
    load_in_4bit=True,
)
model.config.use_cache = False
modules = inject_gated_lora(model, 28, seed=0)
generator = torch.Generator().manual_seed(1)
with torch.no_grad():  # the same B on every process and in the test's reference
    for module in modules.values():
        module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.1)
q_proj = model.model.layers[0].self_attn.q_proj.base_layer
assert isinstance(q_proj, bnb.nn.Linear4bit)
# transformers never partitions a quantised model while loading: every process holds all of it
# (64 x 64 nf4 values packed into fp32 storage: 512 elements) until the engine shards it.
assert not zero.is_partitioned(q_proj.weight) and q_proj.weight.numel() == 64 * 64 // 8
engine = Engine(model, ds, zero.OptimizerSettings(0.0, (0.9, 0.999), 1e-8, 0.0), info)
assert zero.is_partitioned(q_proj.weight) and q_proj.weight.numel() == 0  # sharded by ZeRO-3

batches = make_batches(random_examples(8, seed=3), 4)
loss = engine.loss(batches[0])  # lr 0: the first step moves nothing
assert abs(float(loss) - reference["loss"]) < 1e-5, (float(loss), reference["loss"])
engine.backward(loss)
engine.step()

scores = engine.ab_lora_scores(batches, mode="fast")
worst = 0.0
for key, values in (("S_without", scores.S_without), ("S_only", scores.S_only)):
    for name in values:
        for got, want in zip(values[name], reference[key][name], strict=True):
            worst = max(worst, abs(got - want) / abs(want))
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
