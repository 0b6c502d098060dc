"""Run under `deepspeed --num_gpus N`: under ZeRO-3, fast scores equal naive scores (1e-5
relative, fp32) and give the same allocation; they also equal the single-process reference.
Screened scores (every process the same estimates, the same exact set) give the single-process
screened plan, and the processes agree."""

import hashlib
import json
import sys
from pathlib import Path

sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from transformers import AutoModelForCausalLM

from alora_ds.core.allocation import plan_round
from alora_ds.core.inject import gated_modules, inject_gated_lora
from alora_ds.io.examples import make_batches
from alora_ds.runtime import process as P
from alora_ds.runtime import zero
from alora_ds.runtime.engine import Engine
from tests.helpers import random_examples, randomise_adapters

ds = json.loads(Path(sys.argv[1]).read_text())
reference = json.loads((Path(sys.argv[2]) / "ref.json").read_text())
info = P.init_distributed(60)
ds.update(
    train_micro_batch_size_per_gpu=4,
    gradient_accumulation_steps=1,
    train_batch_size=4 * info.world_size,
)
with zero.partitioned_loading(ds):  # the test's model, partitioned while loading
    model = AutoModelForCausalLM.from_pretrained(Path(sys.argv[2]) / "base")
modules = inject_gated_lora(model, 42, seed=0)
randomise_adapters(modules, seed=1, uneven=True)  # as the reference: same values everywhere
engine = Engine(model, ds, zero.OptimizerSettings(0.0, (0.9, 0.999), 1e-8, 0.0), info)
batches = make_batches(random_examples(10, seed=3), 4)
# A first training step (lr 0: nothing moves), as in a real run: ZeRO-3 prefetching is set up
# by the first forward after initialize.
engine.backward(engine.loss(batches[0]))
engine.step()

naive = engine.ab_lora_scores(batches, mode="naive")
fast = engine.ab_lora_scores(batches, mode="fast", max_rows=12)
worst = 0.0
for scores in (naive, fast):
    for name in scores.S_without:
        for key, values in (("S_without", scores.S_without), ("S_only", scores.S_only)):
            for got, want in zip(values[name], reference[key][name], strict=True):
                worst = max(worst, abs(got - want) / abs(want))
for name in naive.S_without:
    for a, b in zip(
        naive.S_without[name] + naive.S_only[name],
        fast.S_without[name] + fast.S_only[name],
        strict=True,
    ):
        worst = max(worst, abs(a - b) / abs(a))
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
    f"rank {info.rank}: screened == 1 process, {screened.record['exact_ranks']} exact", flush=True
)
