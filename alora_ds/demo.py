"""`make demo`: the ALoRA core on a tiny LLaMA, in seconds, on a CPU.

Trains a gated LoRA adapter briefly on a synthetic next-token task, scores every rank with
AB-LoRA on a validation batch, computes one allocation round and rebuilds the adapters.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from alora_ds.core.allocation import plan_round, pruned_by_module
from alora_ds.core.inject import count_parameters, inject_gated_lora, rank_map
from alora_ds.core.surgery import apply_plan
from alora_ds.io.examples import make_batches
from alora_ds.io.models import build_random_llama, tiny_llama_config
from alora_ds.scoring.direct import ab_lora_scores, eval_mode, validation_score

SEED = 0
VOCAB = 128


def synthetic_examples(n: int, length: int, generator: torch.Generator) -> list[dict]:
    """Sequences that follow t_{i+1} = (5 t_i + 3) mod V after a random start; the second half is
    supervised. A small adapter learns this; the base model cannot."""
    rows = []
    for _ in range(n):
        token = int(torch.randint(3, VOCAB, (1,), generator=generator))
        ids = [token]
        for _ in range(length - 1):
            token = (5 * token + 3) % VOCAB
            ids.append(token)
        half = length // 2
        rows.append({"input_ids": ids, "labels": [-100] * half + ids[half:]})
    return rows


def module_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def main() -> None:
    start = time.perf_counter()
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    model = build_random_llama(tiny_llama_config(initializer_range=0.3), seed=SEED)
    modules = inject_gated_lora(model, rank_budget=56, lora_alpha=16, seed=SEED)
    print(f"tiny LLaMA: {len(modules)} gated modules, r_init = 4; {count_parameters(model)}")

    train = make_batches(synthetic_examples(256, 16, generator), batch_size=16)
    val = make_batches(synthetic_examples(32, 16, generator), batch_size=32)  # |B_val| = 32
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for epoch in range(3):
        for batch in train:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with eval_mode(model):
            print(
                f"epoch {epoch}: train loss {loss.item():.3f}, dev S(M) {validation_score(model, val):.3f}"
            )

    scores = ab_lora_scores(model, val)
    importance = scores.importance
    print(
        f"\nAB-LoRA on {val[0]['input_ids'].shape[0]} validation examples: "
        f"S(M) = {scores.S_M:.4f}, S(base) = {scores.S_base:.4f}"
    )
    print(f"{'module':<34} {'IS per rank (S(M) - S(M without r) + S(M_r))'}")
    for name, values in importance.items():
        print(f"{name:<34} " + " ".join(f"{v:+.4f}" for v in values))

    plan = plan_round(importance, n_prune=7)
    apply_plan(modules, pruned_by_module(plan.pruned), plan.added, seed=SEED, round_index=1)
    assert rank_map(model) == plan.ranks_after

    print(
        f"\nround 1: pruned {len(plan.pruned)} ranks: "
        + ", ".join(f"{n.removeprefix('model.layers.')}[{i}]" for n, i in plan.pruned)
    )
    print(
        "added: "
        + ", ".join(f"{n.removeprefix('model.layers.')} +{k}" for n, k in plan.added.items())
    )
    by_type: dict[str, list[int]] = defaultdict(list)
    for name, r in plan.ranks_after.items():
        by_type[module_type(name)].append(r)
    print(
        "ranks per module type after the round (layer 0, layer 1): "
        + ", ".join(f"{t} {v}" for t, v in by_type.items())
    )
    print(
        f"budget: {sum(plan.ranks_before.values())} ranks before, "
        f"{sum(plan.ranks_after.values())} after; {count_parameters(model)}"
    )
    print(f"done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
