"""Exact AB-LoRA scores at a fraction of the direct cost (docs/method.md section 6).

Three exact savings over two full forwards per rank:

1. Prefix caching. Switching a rank off in layer l changes nothing before layer l. Per chunk of
   the validation batch, one pass with every rank on (M) and one with every rank off (the start
   of every M_r) record the hidden states entering each layer and the states after each layer's
   attention half; a candidate then runs only from its own layer (from the MLP half for
   gate/up/down candidates) to the end.
2. Candidate batching. Several candidates share one forward: the rows of a batch are
   candidates x examples and each row carries its own gate vector (GatedLoRALinear.row_gates),
   up to `max_rows` rows per forward.
3. The LM head (and the final norm) run only at supervised positions: the loss needs nothing
   else, and both act on each position alone.

Work is shared out over processes by a fixed layout: each group of candidates (same layer, same
half) is split into equal padded shares, so every process runs the same layers in the same order
(ZeRO-3 forwards are collective) with its own candidates. This file is plain torch; the caller
passes a `gather` function for the collective (alora_ds.runtime).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from alora_ds.core.inject import gated_modules
from alora_ds.core.layer import GatedLoRALinear
from alora_ds.scoring.direct import (
    Batch,
    Candidate,
    CandidateProgress,
    Gather,
    Progress,
    RankScores,
    all_candidates,
    assemble_scores,
    eval_mode,
)

ATTENTION, MLP = 0, 1  # the two halves of a LLaMA decoder layer
_OFF, _ON = 0, 1  # modes: M \ r (everything on, one rank off) and M_r (everything off, one on)


@dataclass
class ScoringStats:
    """Work done, for the benchmark: decoder-layer calls (a half counts 0.5) and layer passes
    (one layer over one validation chunk for one candidate: the unit the naive path pays
    2 x layers per candidate)."""

    layer_calls: float = 0.0
    layer_passes: float = 0.0
    forwards: int = 0
    max_rows: int = 0


class LlamaStack:
    """Direct access to the pieces of a LLaMA-family causal LM: embeddings, decoder layers in
    two halves, final norm and head. Other architectures use the direct path."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.inner = model.model
        self.layers = list(self.inner.layers)
        self.norm = self.inner.norm
        self.head = model.lm_head

    @staticmethod
    def supports(model: nn.Module) -> bool:
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if inner is None or layers is None or not hasattr(model, "lm_head"):
            return False
        needed = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
        return all(hasattr(layer, n) for layer in layers for n in needed) and hasattr(
            inner, "rotary_emb"
        )

    def context(self, batch: Batch) -> dict:
        from transformers.masking_utils import create_causal_mask

        embeds = self.inner.embed_tokens(batch["input_ids"])  # (E, T, H)
        length = embeds.shape[1]
        position_ids = torch.arange(length, device=embeds.device).unsqueeze(0)  # (1, T)
        mask = create_causal_mask(
            config=self.inner.config,
            inputs_embeds=embeds,
            attention_mask=batch["attention_mask"],
            position_ids=position_ids,
            **{_cache_argument(create_causal_mask): None},  # no cache: every position is new
        )
        # cos / sin of shape (1, T, d): they broadcast over any number of rows.
        rotary = self.inner.rotary_emb(embeds, position_ids=position_ids)
        return {"embeds": embeds, "mask": mask, "rotary": rotary, "position_ids": position_ids}

    def attention_half(
        self, layer: nn.Module, h: torch.Tensor, ctx: dict, repeat: int
    ) -> torch.Tensor:
        mask = ctx["mask"]
        if isinstance(mask, torch.Tensor) and repeat > 1:
            mask = mask.repeat(repeat, *([1] * (mask.dim() - 1)))
        attended, _ = layer.self_attn(
            hidden_states=layer.input_layernorm(h),
            attention_mask=mask,
            position_ids=ctx["position_ids"],
            position_embeddings=ctx["rotary"],
        )
        return h + attended

    @staticmethod
    def mlp_half(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def loss_sums(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-row sum of next-token cross-entropy (fp32) over supervised positions only."""
        targets = labels[:, 1:]  # (N, T-1)
        rows, positions = (targets != -100).nonzero(as_tuple=True)
        logits = self.head(self.norm(h[:, :-1][rows, positions])).float()  # (S, V)
        losses = F.cross_entropy(logits, targets[rows, positions], reduction="none")  # (S,)
        return torch.zeros(h.shape[0], dtype=torch.float64, device=h.device).index_add_(
            0, rows, losses.double()
        )


@functools.cache
def _cache_argument(create_causal_mask: Callable) -> str:
    """The name create_causal_mask gives its cache argument: `cache` from transformers 5.24,
    where `past_key_values` is deprecated (removed in 5.40), `past_key_values` before."""
    parameters = inspect.signature(create_causal_mask).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def even_blocks(count: int, largest: int) -> list[tuple[int, int]]:
    """[start, stop) ranges that cover `count` candidates in as few blocks of at most `largest`
    as possible, of sizes that differ by at most one: 12 by 8 is 6 + 6, not 8 + 4 (the same
    work, with smaller activations)."""
    blocks = -(-count // largest) if count else 0
    bounds = [count * i // blocks for i in range(blocks + 1)] if blocks else [0]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _layer_of(name: str, layer_names: Sequence[str]) -> int:
    for index, prefix in enumerate(layer_names):
        if name.startswith(prefix + "."):
            return index
    raise ValueError(f"gated module {name} is not inside a decoder layer")


def candidate_groups(
    modules: Mapping[str, GatedLoRALinear],
    layer_names: Sequence[str],
    candidates: Sequence[Candidate] | None = None,
) -> list[tuple[int, int, list[Candidate]]]:
    """Candidates (default: every live rank) grouped by (layer, half), in layer order: the
    groups share their prefix."""
    groups: dict[tuple[int, int], list[Candidate]] = {}
    for name, index in all_candidates(modules) if candidates is None else candidates:
        layer = _layer_of(name, layer_names)
        half = ATTENTION if ".self_attn." in name[len(layer_names[layer]) :] else MLP
        groups.setdefault((layer, half), []).append((name, index))
    return [(layer, half, cands) for (layer, half), cands in sorted(groups.items())]


def share_layout(
    groups: Sequence[tuple[int, int, list[Candidate]]], world_size: int
) -> list[list[list[Candidate | None]]]:
    """layout[group][process] = that process's candidates in the group, padded with None so
    every process holds the same number (and so runs the same forwards)."""
    layout = []
    for _, _, candidates in groups:
        per_process = -(-len(candidates) // world_size)
        shares = []
        for rank in range(world_size):
            share: list[Candidate | None] = list(candidates[rank::world_size])
            shares.append(share + [None] * (per_process - len(share)))
        layout.append(shares)
    return layout


def _set_mode(
    modules: Mapping[str, GatedLoRALinear],
    saved_gates: Mapping[str, torch.Tensor],
    mode: int,
    running: Sequence[Candidate] = (),
) -> None:
    """Every live rank on (M \\ r's default) or every rank off (M_r's). With every gate off a
    module's delta is exactly zero, so it is not computed at all (adapter_off), except in the
    modules of the `running` candidates: they get per-row gates, and every process keeps the
    same adapters on because under ZeRO-3 running one gathers its weights, a collective, while
    each process's block holds candidates of its own modules."""
    keep = {name for name, _ in running}
    for name, module in modules.items():
        module.lora_gate.copy_(saved_gates[name] if mode == _OFF else 0)
        module.adapter_off = mode == _ON and name not in keep


@contextmanager
def _row_gates(
    modules: Mapping[str, GatedLoRALinear], gates: Mapping[str, torch.Tensor]
) -> Iterator[None]:
    try:
        for name, value in gates.items():
            modules[name].row_gates = value
        yield
    finally:
        for name in gates:
            modules[name].row_gates = None


def fast_ablation_scores(
    model: nn.Module,
    batches: Sequence[Batch],
    *,
    max_rows: int = 256,
    rank: int = 0,
    world_size: int = 1,
    gather: Gather | None = None,
    stats: ScoringStats | None = None,
    start_of_pass: Callable[[], None] | None = None,
    progress: Progress | None = None,
) -> RankScores:
    """AB-LoRA scores of every live rank, exact, with prefix caching and candidate batching.

    With world_size > 1 every process must call this with the same batches; `gather` returns
    every process's tensor (an all-gather) and is called once. `start_of_pass` runs before each
    pass through the layers, which never goes through the model's own forward (ZeRO-3 resets
    its parameter-fetch bookkeeping there). `progress` is called after each block of
    candidates with counts that add up to the number of live ranks (of all processes: see
    CandidateProgress).
    """
    modules = gated_modules(model)
    ordered = all_candidates(modules)
    s_m, s_base, results = fast_candidate_scores(
        model, batches, ordered, max_rows=max_rows, rank=rank, world_size=world_size,
        gather=gather, stats=stats, start_of_pass=start_of_pass, progress=progress,
    )  # fmt: skip
    return assemble_scores(modules, s_m, s_base, ordered, [results[c] for c in ordered])


@torch.no_grad()
def fast_candidate_scores(
    model: nn.Module,
    batches: Sequence[Batch],
    candidates: Sequence[Candidate],
    *,
    max_rows: int = 256,
    rank: int = 0,
    world_size: int = 1,
    gather: Gather | None = None,
    stats: ScoringStats | None = None,
    start_of_pass: Callable[[], None] | None = None,
    progress: Progress | None = None,
) -> tuple[float, float, dict[Candidate, tuple[float, float]]]:
    """S(M), S(base) and (S(M \\ r), S(M_r)) of each of `candidates` (live ranks, the same on
    every process), exact, the fast way (see fast_ablation_scores); `progress` counts add up to
    len(candidates)."""
    start_of_pass = start_of_pass or (lambda: None)
    if not LlamaStack.supports(model):
        raise ValueError(f"fast scoring needs a LLaMA-style model, got {type(model).__name__}")
    stack = LlamaStack(model)
    modules = gated_modules(model)
    layer_names = [n for n, m in model.named_modules() if any(m is layer for layer in stack.layers)]
    groups = candidate_groups(modules, layer_names, candidates)
    layout = share_layout(groups, world_size)
    mine = [shares[rank] for shares in layout]  # this process's padded share of each group
    stats = stats if stats is not None else ScoringStats()
    slots = sum(len(share) for share in mine)
    # Work units: every slot (padding too: it costs the same forwards) in both modes, per chunk.
    counter = CandidateProgress(progress, 2 * slots * len(batches), len(candidates))
    loss_sums = torch.zeros(slots, 2, dtype=torch.float64)  # (slot, mode)
    reference = torch.zeros(2, dtype=torch.float64)  # S(M), S(base) loss sums
    total_tokens = 0
    saved_gates = {name: m.lora_gate.clone() for name, m in modules.items()}
    num_layers = len(stack.layers)

    with eval_mode(model):
        try:
            for batch in batches:
                start_of_pass()
                ctx = stack.context(batch)
                labels = batch["labels"]
                rows_per_candidate = labels.shape[0]
                total_tokens += int((labels[:, 1:] != -100).sum())
                per_block = max(1, max_rows // rows_per_candidate)
                stats.max_rows = max(stats.max_rows, per_block * rows_per_candidate)

                # Prefix passes: states entering every layer and after every attention half.
                cache: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
                for mode in (_OFF, _ON):
                    _set_mode(modules, saved_gates, mode)
                    start_of_pass()
                    h, states = ctx["embeds"], []
                    for layer in stack.layers:
                        mid = stack.attention_half(layer, h, ctx, 1)
                        states.append((h, mid))
                        h = stack.mlp_half(layer, mid)
                    stats.layer_calls += num_layers
                    stats.layer_passes += num_layers
                    reference[mode] += float(stack.loss_sums(h, labels).sum())
                    cache[mode] = states

                slot = 0
                for (layer_index, half, group), share in zip(groups, mine, strict=True):
                    for mode in (_OFF, _ON):
                        # M \ r runs with every live rank on, M_r with every rank off; the
                        # candidates' own modules (the whole group's) get per-row gates.
                        _set_mode(modules, saved_gates, mode, running=group)
                        for start, stop in even_blocks(len(share), per_block):
                            start_of_pass()
                            block = share[start:stop]
                            losses = _run_block(
                                stack, modules, layer_index, half, mode, block,
                                cache[mode][layer_index][half], ctx, labels, saved_gates, stats,
                            )  # fmt: skip
                            loss_sums[slot + start : slot + stop, mode] += losses
                            counter.advance(len(block))
                    slot += len(share)
        finally:
            for name, module in modules.items():
                module.lora_gate.copy_(saved_gates[name])
                module.row_gates = None
                module.adapter_off = False

    everyone = gather(loss_sums) if gather is not None else [loss_sums]
    results: dict[Candidate, tuple[float, float]] = {}
    for group_index, shares in enumerate(layout):
        offset = sum(len(layout[g][0]) for g in range(group_index))
        for process, share in enumerate(shares):
            for position, candidate in enumerate(share):
                if candidate is not None:
                    row = everyone[process][offset + position]
                    results[candidate] = (
                        -float(row[_OFF]) / total_tokens,
                        -float(row[_ON]) / total_tokens,
                    )
    assert len(results) == len(set(candidates))
    return -float(reference[_OFF]) / total_tokens, -float(reference[_ON]) / total_tokens, results


def _run_block(
    stack: LlamaStack,
    modules: Mapping[str, GatedLoRALinear],
    layer_index: int,
    half: int,
    mode: int,
    block: Sequence[Candidate | None],
    start_state: torch.Tensor,
    ctx: dict,
    labels: torch.Tensor,
    saved_gates: Mapping[str, torch.Tensor],
    stats: ScoringStats,
) -> torch.Tensor:
    """Loss sums of a block of candidates (None = padding) that start at the same place."""
    count = len(block)
    examples = start_state.shape[0]
    # Row gates for the modules that hold candidates: default everywhere (the mode's gates),
    # the candidate's rank flipped on its own rows. Rows are candidate-major: c * E + e.
    gates: dict[str, torch.Tensor] = {}
    for position, candidate in enumerate(block):
        if candidate is None:
            continue
        name, index = candidate
        if name not in gates:
            default = saved_gates[name] if mode == _OFF else torch.zeros_like(saved_gates[name])
            gates[name] = default.unsqueeze(0).repeat(count * examples, 1)  # (N, r)
        rows = slice(position * examples, (position + 1) * examples)
        gates[name][rows, index] = 0 if mode == _OFF else saved_gates[name][index]
    h = start_state.repeat(count, 1, 1)  # (c * E, T, H)
    layer = stack.layers[layer_index]
    with _row_gates(modules, gates):
        if half == ATTENTION:
            h = stack.attention_half(layer, h, ctx, count)
        h = stack.mlp_half(layer, h)
    for later in stack.layers[layer_index + 1 :]:
        h = stack.mlp_half(later, stack.attention_half(later, h, ctx, count))
    run = len(stack.layers) - layer_index - (0.5 if half == MLP else 0.0)
    stats.layer_calls += run
    stats.layer_passes += run * count
    stats.forwards += 1
    per_row = stack.loss_sums(h, labels.repeat(count, 1))  # (c * E,)
    return per_row.view(count, examples).sum(dim=1).cpu()


def naive_layer_passes(num_candidates: int, num_layers: int, num_chunks: int) -> float:
    """Layer passes of the direct path, for the same accounting: S(M), S(base) and two full
    forwards per candidate, per validation chunk."""
    return float((2 + 2 * num_candidates) * num_layers * num_chunks)


def default_max_rows(batches: Sequence[Batch]) -> int:
    """A cap that keeps a block's activations near those of a few training micro-batches."""
    return max_rows_for_length(max(int(b["input_ids"].shape[1]) for b in batches))


def max_rows_for_length(longest: int) -> int:
    """default_max_rows for batches whose longest row has `longest` tokens."""
    return max(8, 16_384 // max(longest, 1))


__all__ = [
    "LlamaStack",
    "ScoringStats",
    "candidate_groups",
    "default_max_rows",
    "even_blocks",
    "fast_ablation_scores",
    "fast_candidate_scores",
    "max_rows_for_length",
    "naive_layer_passes",
    "share_layout",
]
