"""GPU check: LLaMA-2-7B-shaped training on one GPU, our trainer's LoRA and ALoRA under ZeRO-3
and ZeRO-2 against a plain PEFT loop, in one process.

    python bench/gpu.py [--json FILE]           # the GPU run (BENCHMARKS.md has the command line)
    python bench/gpu.py --smoke [--json FILE]   # a tiny LLaMA (CPU here) through every code path

The model is built from LLaMA-2-7B's config (hidden 4096, 32 layers, 32 heads, MLP 11008, vocab
32000) with random bf16 weights, since speed does not depend on the values; sdpa attention. For
each sequence length (2048, then 512), in this order:

1. the micro-batch: the largest that fits both our adapters and peft's on the plain model
   (`largest_fitting`: cap first, then doubling from 1, then bisection; a trial fits when a
   forward and backward raise no out-of-memory error and peak memory stays under
   --memory_fraction of the GPU, the rest left for DeepSpeed's buffers). Every trainer is then
   measured on that same batch;
2. the peer: peft's get_peft_model (rank 8 on the 7 module types, peft's defaults) with
   torch.optim.AdamW and gradient clipping at the ds config's value, no DeepSpeed;
3. ours under ZeRO-2, then ZeRO-3 (ds_configs/zero2.json and zero3.json in bf16), exactly as
   launch/train.py builds it (load_base_model, inject_gated_lora, Engine) and stepping it as its
   train_step does: LoRA's steps, then (first sequence length only) ALoRA's round as its
   allocation_round runs it (method.round_scores with the default scoring mode of TrainConfig,
   plan_round, Engine.rebuild) and ALoRA's steps after it. Before its first round ALoRA trains
   exactly as LoRA does (same adapters, hard gates, no hooks), so one engine serves both.

A round that outlasts --round_limit_s is cut (`RoundClock`): the share it scored gives an
estimate, and the rebuild is still measured with a plan from equal scores (its cost depends on
how many ranks move, not which). Each setup that fails is recorded and the others still run: the
GPU check is one run. --deadline_s skips what would start too late for the device's time limit.
Model FLOPs are written out in `step_flops`; MFU divides them by a bf16 matmul rate measured in
the same run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.metadata
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig

from alora_ds.config import TrainConfig, load_ds_config, resolve_batch_sizes
from alora_ds.core.allocation import (
    check_scores,
    plan_round,
    pruned_by_module,
    resolve_prune_count,
)
from alora_ds.core.inject import count_parameters, find_target_modules, inject_gated_lora
from alora_ds.core.schedule import Schedule
from alora_ds.errors import ArgumentParser, InputError, RunFailure, run_cli
from alora_ds.io.examples import collate
from alora_ds.io.files import atomic_write_json
from alora_ds.io.models import load_base_model
from alora_ds.methods import Method, build_method
from alora_ds.methods.base import RoundInputs
from alora_ds.runtime import process as P
from alora_ds.runtime import zero
from alora_ds.runtime.cpu import keep_freed_memory
from alora_ds.runtime.engine import Engine
from alora_ds.scoring import SCORING_MODES
from launch.prepare import method_settings

GIB = 2**30

LLAMA2_7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
    rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)  # fmt: skip
TINY = dict(LLAMA2_7B, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip


@dataclass(frozen=True)
class Size:
    """What one invocation runs: the model, the sequence lengths and how long each measure is."""

    model: dict
    rank: int  # LoRA's rank on every module (r_init); the rank budget is rank x modules
    seq_lens: tuple[int, ...]
    val_len: int  # tokens of each B_val example (|B_val| is TrainConfig's val_examples)
    warmup_steps: int  # untimed steps first (ZeRO-3 records its prefetch trace in the first)
    steps: int  # timed steps
    max_micro_batch: int
    matmul_n: int  # the timed matmul is (n, n) @ (n, n)


FULL = Size(LLAMA2_7B, rank=8, seq_lens=(2048, 512), val_len=512, warmup_steps=2, steps=8,
            max_micro_batch=256, matmul_n=8192)  # fmt: skip
# Rank 2 and short rows: the scoring round's cost grows with ranks x |B_val| x tokens.
SMOKE = Size(TINY, rank=2, seq_lens=(64, 16), val_len=16, warmup_steps=1, steps=2,
             max_micro_batch=4, matmul_n=512)  # fmt: skip


@dataclass(frozen=True)
class Setup:
    """One measured configuration."""

    seq_len: int
    trainer: str  # "ours" (LoRA, then ALoRA when round_limit_s is set) or "peft"
    stage: int | None  # ZeRO stage (ours only)
    round_limit_s: float | None = None  # ALoRA's round and its time limit; None: LoRA alone


def plan_setups(size: Size, round_limit_s: float, smoke: bool) -> list[Setup]:
    """PEFT, ZeRO-2, ZeRO-3 at each length; ALoRA's round at the first length only (B_val is the
    same at every length). The smoke run cuts its ZeRO-3 round at once, so the cut path runs."""
    setups = []
    for seq_len in size.seq_lens:
        first = seq_len == size.seq_lens[0]
        setups += [
            Setup(seq_len, "peft", None),
            Setup(seq_len, "ours", 2, round_limit_s if first else None),
            Setup(seq_len, "ours", 3, (0.0 if smoke else round_limit_s) if first else None),
        ]
    return setups


@dataclass(frozen=True)
class Bench:
    """What every setup of one invocation shares."""

    size: Size
    cfg: TrainConfig  # the trainer's defaults, with the scoring mode asked for
    info: P.DistInfo  # the process group of one and its device
    dtype: torch.dtype
    config_file: Path  # the LLaMA config.json the base models are built from
    shape: ModelShape
    matmul_tflops: float  # the measured ceiling MFU is relative to
    memory_fraction: float  # of the GPU a micro-batch may peak at in the search

    @property
    def device(self) -> torch.device:
        return self.info.device


# ---- model FLOPs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    layers: int  # L
    hidden: int  # h
    kv_hidden: int  # h_kv = h * kv_heads / heads (k_proj and v_proj's output)
    intermediate: int  # f
    vocab: int  # V

    @classmethod
    def of(cls, config: LlamaConfig) -> ModelShape:
        kv = config.hidden_size * config.num_key_value_heads // config.num_attention_heads
        return cls(config.num_hidden_layers, config.hidden_size, kv, config.intermediate_size,
                   config.vocab_size)  # fmt: skip

    @property
    def frozen_matmul_params(self) -> int:
        """P: weights the frozen matmuls multiply by, per token (the embedding is a lookup)."""
        h, kv, f = self.hidden, self.kv_hidden, self.intermediate
        per_layer = h * h + 2 * h * kv + h * h + 3 * h * f  # q; k, v; o; gate, up, down
        return self.layers * per_layer + self.vocab * h  # + lm_head


def step_flops(shape: ModelShape, adapter_params: int, micro: int, seq: int) -> dict[str, float]:
    """Model FLOPs of one training step on `micro` sequences of `seq` tokens, N = micro * seq
    tokens; a multiply-add is 2 FLOPs, so x (N, d_in) @ W^T (d_in, d_out) is 2 N d_in d_out.

    frozen forward    2 P N           every frozen linear layer and the LM head (P above)
    input gradients   2 P N - 2 N h (h + 2 h_kv + 2 f)
                                      dx (N, d_in) = dy (N, d_out) @ W for every frozen layer
                                      whose input needs a gradient: all but layer 0's q, k, v, gate
                                      and up, which read the frozen embedding. No weight gradient:
                                      W is frozen
    adapters          6 A N           A = sum of r (d_in + d_out) over adapted modules: x @ A^T
                                      (N, r) and (N, r) @ B^T forward, then A's and B's gradients
                                      and the input gradients (6 per trained parameter per token)
    attention         6 L micro seq^2 h
                                      per layer, Q K^T (seq, seq) and P V cost 2 seq^2 h each over
                                      the causal half of the scores (sdpa's flash kernel skips the
                                      masked half); the backward's four products cost twice the
                                      forward. The flash backward's recomputation is not counted
                                      (model FLOPs, not hardware FLOPs)

    Norms, RoPE, softmax, SiLU and the loss are not matmuls and are not counted.
    """
    n = micro * seq
    p, h = shape.frozen_matmul_params, shape.hidden
    layer0_no_input_grad = h * (h + 2 * shape.kv_hidden + 2 * shape.intermediate)
    terms = {
        "frozen_forward": 2.0 * p * n,
        "input_gradients": 2.0 * p * n - 2.0 * n * layer0_no_input_grad,
        "adapters": 6.0 * adapter_params * n,
        "attention": 6.0 * shape.layers * micro * seq**2 * h,
    }
    return {**terms, "total": sum(terms.values())}


def matmul_tflops(
    device: torch.device, dtype: torch.dtype, n: int, reps: int = 10, trials: int = 3
) -> float:
    """The rate of a large (n, n) @ (n, n) matmul in `dtype`, the ceiling MFU is measured
    against: the best of `trials` timings of `reps` products (a ceiling, so a trial slowed by
    another process on a shared machine does not lower it)."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    for _ in range(3):
        torch.matmul(a, b)
    best = float("inf")
    for _ in range(trials):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * reps / best / 1e12


# ---- device helpers -----------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def release_memory(device: torch.device) -> float | None:
    """Free what the last setup left; GiB still allocated (a leak shows here), None on CPU."""
    gc.collect()
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated(device) / GIB


def under_ceiling(device: torch.device, fraction: float) -> bool:
    """Whether the peak since the last reset leaves 1 - fraction of the GPU free (CPU: always)."""
    if device.type != "cuda":
        return True
    total = torch.cuda.get_device_properties(device).total_memory
    return torch.cuda.max_memory_allocated(device) <= fraction * total


# ---- data, models and configs -------------------------------------------------------------------


def random_examples(count: int, length: int, vocab: int, seed: int) -> list[dict]:
    """Token rows with the first half as prompt (labels -100) and the second half supervised."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2 :]})
    return rows


def training_batch(bench: Bench, micro: int, seq: int) -> dict:
    """The one batch every trainer steps on at this length (speed does not depend on the data)."""
    model = bench.size.model
    rows = random_examples(micro, seq, model["vocab_size"], seed=seq)
    return {k: v.to(bench.device) for k, v in collate(rows, model["pad_token_id"]).items()}


def ds_config(stage: int, micro: int, dtype: torch.dtype) -> dict:
    """ds_configs/zero{stage}.json in `dtype`, its batch fields resolved as the trainer does."""
    path = str(REPO / "ds_configs" / f"zero{stage}.json")
    config = load_ds_config(path)
    config["bf16"] = {"enabled": dtype == torch.bfloat16}
    cfg = dataclasses.replace(TrainConfig(), per_device_train_batch_size=micro)
    return resolve_batch_sizes(config, cfg, 1, path)


def build_base(bench: Bench, ds: dict | None = None) -> torch.nn.Module:
    """The random base model as launch/prepare.py start() loads it: under ZeRO-3 (`ds`)
    partitioned as it is built; otherwise built directly on the device (a 7B model initialised
    on the CPU would take minutes)."""
    loading = zero.partitioned_loading(ds) if ds is not None else torch.device(bench.device)
    model, _ = load_base_model(None, str(bench.config_file), dtype=bench.dtype,
                               attn_implementation="sdpa", seed=bench.cfg.seed,
                               loading_context=loading)  # fmt: skip
    model.config.use_cache = False
    return model


def optimizer_settings(cfg: TrainConfig) -> zero.OptimizerSettings:
    return zero.OptimizerSettings(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)  # fmt: skip


def inject_ours(bench: Bench, model: torch.nn.Module, method: Method) -> dict:
    """Our gated adapters as start() injects them: the rank on every target module."""
    cfg = bench.cfg
    budget = bench.size.rank * len(find_target_modules(model, cfg.target_modules))
    return inject_gated_lora(model, budget, target_modules=cfg.target_modules,
                             lora_alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, seed=cfg.seed,
                             gate_kind=method.gate_kind, dtype=bench.dtype)  # fmt: skip


def remove_ours(model: torch.nn.Module, modules: dict) -> None:
    """Put every wrapped linear layer back (the plain model again, for peft)."""
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module.base_layer)


def apply_peft(bench: Bench, model: torch.nn.Module) -> torch.nn.Module:
    """peft's LoRA as its users apply it: the same rank on the same modules, peft's defaults
    otherwise (its adapters are kept in fp32 on a bf16 model: autocast_adapter_dtype)."""
    cfg = bench.cfg
    lora = LoraConfig(r=bench.size.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")  # fmt: skip
    return get_peft_model(model, lora)


# ---- the micro-batch search ---------------------------------------------------------------------


def largest_fitting(fits: Callable[[int], bool], cap: int) -> tuple[int, list[list]]:
    """The largest micro-batch b <= cap with fits(b), fitting being monotone in b: cap first
    (often the answer when a smaller search ran before), then doubling from 1 until one does not
    fit, then bisection between the last that fit and the first that did not. Returns b and the
    trials as [b, fitted] pairs."""
    tried: list[list] = []

    def trial(b: int) -> bool:
        fitted = fits(b)
        tried.append([b, fitted])
        return fitted

    if trial(cap):
        return cap, tried
    good, bad, b = 0, cap, 1
    while b < bad:
        if not trial(b):
            bad = b
            break
        good, b = b, 2 * b
    while bad - good > 1:
        middle = (good + bad) // 2
        if trial(middle):
            good = middle
        else:
            bad = middle
    if good == 0:
        raise RunFailure("not even a micro-batch of 1 fits on this device")
    return good, tried


def trial_fits(step: Callable[[], None], device: torch.device, fraction: float) -> bool:
    """Whether one forward and backward (`step`) fits: no out-of-memory error, and a peak under
    `fraction` of the device. The error's frames hold the activations: they are released (the
    except block ends) before the cache is emptied."""
    reset_peak_memory(device)
    try:
        step()
        fitted = under_ceiling(device, fraction)
    except torch.cuda.OutOfMemoryError:
        fitted = False
    release_memory(device)
    return fitted


def search_micro_batch(bench: Bench, seq: int) -> dict:
    """The largest micro-batch that fits both our adapters and peft's, on the plain model (no
    DeepSpeed: --memory_fraction leaves room for its buffers)."""
    model = build_base(bench)
    modules = inject_ours(bench, model, build_method("lora", method_settings(bench.cfg)))

    def fits(m: torch.nn.Module, micro: int) -> bool:
        def forward_backward() -> None:
            m(**training_batch(bench, micro, seq)).loss.backward()
            m.zero_grad(set_to_none=True)

        return trial_fits(forward_backward, bench.device, bench.memory_fraction)

    ours, ours_tried = largest_fitting(lambda b: fits(model, b), bench.size.max_micro_batch)
    remove_ours(model, modules)
    peft_model = apply_peft(bench, model)
    chosen, peft_tried = largest_fitting(lambda b: fits(peft_model, b), ours)
    return {"chosen": chosen, "ours": {"largest": ours, "tried": ours_tried},
            "peft": {"largest_up_to_ours": chosen, "tried": peft_tried}}  # fmt: skip


# ---- measuring ----------------------------------------------------------------------------------


def timed_steps(step: Callable[[int], None], first: int, size: Size, device: torch.device) -> float:
    """Seconds per step over size.steps steps after size.warmup_steps untimed ones, `step`
    taking the 0-based step index, from `first` on."""
    for index in range(first, first + size.warmup_steps):
        step(index)
    synchronize(device)
    start = time.perf_counter()
    for index in range(first + size.warmup_steps, first + size.warmup_steps + size.steps):
        step(index)
    synchronize(device)
    return (time.perf_counter() - start) / size.steps


def our_step(engine: Engine, method: Method, batch: dict, lr: float, step: int) -> None:
    """Optimizer step `step` (0-based) as launch/train.py train_step runs it with one
    micro-batch: the method's part, forward, the finiteness agreement, backward, hooks, step."""
    part = method.step_part(step)
    engine.model.train()
    engine.set_trained_part(part.trains)
    engine.set_learning_rates(lr * (part.trains != "gates"), lr * (part.trains != "weights"))
    loss = engine.loss(batch)
    if not P.all_agree(bool(torch.isfinite(loss.detach())), engine.info.device):
        raise RunFailure(f"the loss is not finite at step {step + 1}")
    engine.backward(loss)
    method.after_backward(step + 1, engine)
    engine.step()
    method.after_step(step + 1, lr, engine)


def result_row(bench: Bench, setup: Setup, method: str, micro: int, step_s: float,
               adapter_params: int) -> dict:  # fmt: skip
    """One line of the table; the peak memory is the one since the last reset."""
    flops = step_flops(bench.shape, adapter_params, micro, setup.seq_len)
    tflops = flops["total"] / step_s / 1e12
    peak = P.peak_memory_bytes(bench.info)[0]
    return {
        "seq_len": setup.seq_len, "method": method, "zero_stage": setup.stage,
        "micro_batch": micro, "step_s": step_s, "tokens_per_s": micro * setup.seq_len / step_s,
        "model_tflops": tflops, "mfu": tflops / bench.matmul_tflops, "peak_memory_gib": peak / GIB,
        "adapter_params": adapter_params, "flops_per_step": flops,
    }  # fmt: skip


def run_peft(bench: Bench, setup: Setup, micro: int) -> list[dict]:
    """The peer: a plain loop over peft's model, torch's AdamW, clipping as our ds config does."""
    cfg = bench.cfg
    model = apply_peft(bench, build_base(bench))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)  # fmt: skip
    clip = ds_config(2, micro, bench.dtype)["gradient_clipping"]
    batch = training_batch(bench, micro, setup.seq_len)
    model.train()

    def step(_: int) -> None:
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset_peak_memory(bench.device)
    step_s = timed_steps(step, 0, bench.size, bench.device)
    adapter_params = sum(p.numel() for p in params)
    return [result_row(bench, setup, "peft", micro, step_s, adapter_params)]


def run_ours(bench: Bench, setup: Setup, micro: int) -> list[dict]:
    """Our trainer's LoRA, then (with a round limit) ALoRA's round and ALoRA's steps after it."""
    cfg, size, device = bench.cfg, bench.size, bench.device
    ds = ds_config(setup.stage, micro, bench.dtype)
    lora = build_method("lora", method_settings(cfg))
    alora = build_method("alora", method_settings(cfg))
    assert lora.gate_kind == alora.gate_kind  # the same adapters: one engine serves both
    model = build_base(bench, ds if setup.stage == 3 else None)
    modules = inject_ours(bench, model, lora)
    model.to(device)
    engine = Engine(model, ds, optimizer_settings(cfg), bench.info)
    try:
        rank_costs = {name: m.params_per_rank for name, m in modules.items()}
        steps = size.warmup_steps + size.steps
        rounds = (steps,) if setup.round_limit_s is not None else ()
        for method in (lora, alora):
            method.setup(list(modules), size.rank, Schedule(2 * steps, 2 * steps, 0, rounds))
        batch = training_batch(bench, micro, setup.seq_len)
        reset_peak_memory(device)
        step_s = timed_steps(lambda i: our_step(engine, lora, batch, cfg.learning_rate, i), 0,
                             size, device)  # fmt: skip
        params = count_parameters(model).trainable
        rows = [result_row(bench, setup, "lora", micro, step_s, params)]
        if setup.round_limit_s is None:
            return rows
        # ALoRA's peak spans its steps before the round (LoRA's), the round and the steps after.
        round_ = allocation_round(bench, engine, alora, rank_costs, setup.round_limit_s)
        step_s = timed_steps(lambda i: our_step(engine, alora, batch, cfg.learning_rate, i),
                             steps, size, device)  # fmt: skip
        params = count_parameters(model).trainable
        row = result_row(bench, setup, "alora", micro, step_s, params)
        lora_step_s = rows[0]["step_s"]
        round_["scoring_in_lora_steps"] = round_["scoring_estimate_s"] / lora_step_s
        round_["round_in_lora_steps"] = (
            round_["scoring_estimate_s"] + round_["rebuild_s"]
        ) / lora_step_s
        return [*rows, {**row, "round": round_}]
    finally:
        zero.destroy_engine(engine.ds, model)


class RoundCut(Exception):
    """A scoring round stopped at its time limit."""


class RoundClock:
    """A round's progress display (RoundInputs.progress) that counts the ranks scored and stops
    the round at the first report after `limit_s` (0: the first report, whatever the mode)."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s, self.done, self.total, self.start = limit_s, 0, 0, time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, total: int) -> Iterator[Callable[[int], None]]:
        self.total, self.start = total, time.perf_counter()
        yield self.advance

    def advance(self, ranks: int) -> None:
        self.done += ranks
        if time.perf_counter() - self.start > self.limit_s:
            raise RoundCut

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


def allocation_round(
    bench: Bench, engine: Engine, method: Method, rank_costs: dict, limit_s: float
) -> dict:
    """One round as launch/train.py allocation_round runs it (scores, check, plan, rebuild),
    timed; a round past `limit_s` is cut and its scoring time estimated from the share done."""
    cfg, size, device = bench.cfg, bench.size, bench.device
    dev = random_examples(cfg.val_examples, size.val_len, size.model["vocab_size"], seed=1)
    clock = RoundClock(limit_s)
    synchronize(device)
    started = time.perf_counter()
    try:
        inputs = RoundInputs(1, engine, dev, size.model["pad_token_id"], device, progress=clock)
        round_scores = method.round_scores(inputs)
        scores, note = round_scores.importance, round_scores.note
        check_scores(scores)
        complete = True
    except RoundCut:
        scores = {name: [0.0] * r for name, r in engine.rank_map().items()}
        note, complete = "cut at the time limit; planned from equal scores", False
    live = sum(len(v) for v in scores.values())
    plan = plan_round(scores, resolve_prune_count(cfg.prune_per_round, live), rank_costs=rank_costs)
    scored_s = time.perf_counter() - started
    pruned = pruned_by_module(plan.pruned)
    engine.rebuild(pruned, plan.added, seed=cfg.seed, round_index=1)
    method.after_rebuild(pruned, plan.added)
    assert engine.rank_map() == plan.ranks_after
    synchronize(device)
    round_s = time.perf_counter() - started
    estimate = scored_s / max(clock.fraction, 1e-9)
    return {
        "scoring": method.settings.scoring, "b_val": [cfg.val_examples, size.val_len],
        "complete": complete, "scored_fraction": clock.fraction, "scoring_s": scored_s,
        # Cut: the time per rank scored so far, times every rank (for the fast path, whose
        # early layers cost most, an upper bound).
        "scoring_estimate_s": scored_s if complete else estimate,
        "rebuild_s": round_s - scored_s, "round_s": round_s if complete else None,
        "pruned": len(plan.pruned), "added": sum(plan.added.values()), "note": note,
    }  # fmt: skip


# ---- the run ------------------------------------------------------------------------------------


def checks(runs: Sequence[dict], first_len: int) -> list[dict]:
    """The issue's targets, each with its measured value (whether met or not)."""
    by = {(r["seq_len"], r["method"], r["zero_stage"]): r for r in runs if "error" not in r}
    out = []

    def check(name: str, value: float, target: str, met: bool) -> None:
        out.append({"check": name, "value": value, "target": target, "met": met})

    peft = by.get((first_len, "peft", None))
    for stage in (3, 2):
        lora, alora = by.get((first_len, "lora", stage)), by.get((first_len, "alora", stage))
        if lora is None:
            continue
        check(
            f"LoRA MFU, ZeRO-{stage}, seq {first_len}", lora["mfu"], ">= 0.40", lora["mfu"] >= 0.4
        )
        if peft is not None:
            ratio = lora["tokens_per_s"] / peft["tokens_per_s"]
            check(f"LoRA / PEFT tokens/s, ZeRO-{stage}", ratio, ">= 0.95", ratio >= 0.95)
        if alora is None:
            continue
        ratio = alora["tokens_per_s"] / lora["tokens_per_s"]
        check(f"ALoRA / LoRA tokens/s, ZeRO-{stage}", ratio, ">= 0.98 (as fast, within noise)",
              ratio >= 0.98)  # fmt: skip
        ratio = alora["peak_memory_gib"] / lora["peak_memory_gib"]
        check(f"ALoRA / LoRA peak memory, ZeRO-{stage}", ratio, "<= 1.03", ratio <= 1.03)
        steps = alora["round"]["scoring_in_lora_steps"]
        check(f"scoring round in LoRA steps, ZeRO-{stage}", steps, "<= 30", steps <= 30)
    return out


def print_table(results: dict) -> None:
    print(f"\n{results['device']}, {results['dtype']}, matmul {results['matmul_tflops']:.3g} "
          f"TFLOP/s measured; scoring mode {results['scoring']}")  # fmt: skip
    print(f"{'seq':>5} {'method':<6} {'ZeRO':>4} {'micro':>5} {'tokens/s':>10} {'TFLOP/s':>8} "
          f"{'MFU':>6} {'peak GiB':>9} {'step s':>8}  round")  # fmt: skip
    for r in results["runs"]:
        stage = "-" if r.get("zero_stage") is None else str(r["zero_stage"])
        if "error" in r:
            print(f"{r['seq_len']:>5} {r['method']:<6} {stage:>4}  {r['error']}")
            continue
        line = (f"{r['seq_len']:>5} {r['method']:<6} {stage:>4} {r['micro_batch']:>5} "
                f"{r['tokens_per_s']:>10.0f} {r['model_tflops']:>8.1f} {r['mfu']:>6.1%} "
                f"{r['peak_memory_gib']:>9.2f} {r['step_s']:>8.3f}")  # fmt: skip
        if "round" in r:
            rd = r["round"]
            line += (f"  scoring {rd['scoring_estimate_s']:.1f}s"
                     f"{'' if rd['complete'] else ' (estimated, cut)'} = "
                     f"{rd['scoring_in_lora_steps']:.1f} steps, rebuild {rd['rebuild_s']:.2f}s")  # fmt: skip
        print(line)
    for c in results["checks"]:
        print(
            f"{'met' if c['met'] else 'NOT MET':>8}  {c['check']}: {c['value']:.3f} ({c['target']})"
        )


def parse_args(argv: Sequence[str] | None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny LLaMA through every path")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--scoring", choices=SCORING_MODES, default=TrainConfig().scoring,
                        help="ALoRA's scoring mode (default: the trainer's, %(default)s)")  # fmt: skip
    parser.add_argument("--round_limit_s", type=float, default=60.0,
                        help="cut a scoring round after this many seconds (default 60)")  # fmt: skip
    parser.add_argument("--deadline_s", type=float, default=380.0,
                        help="start no setup after this many seconds (default 380)")  # fmt: skip
    parser.add_argument("--memory_fraction", type=float, default=0.88,
                        help="a micro-batch fits when its peak is under this share of the GPU")  # fmt: skip
    args = parser.parse_args(argv)
    if not 0 < args.memory_fraction <= 1:
        raise InputError(f"--memory_fraction must be in (0, 1], got {args.memory_fraction}")
    if args.round_limit_s < 0 or args.deadline_s < 0:
        raise InputError("--round_limit_s and --deadline_s must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    size = SMOKE if args.smoke else FULL
    # The trainer's defaults (|B_val|, alpha, AdamW, seed, ...) and the scoring mode asked for.
    cfg = dataclasses.replace(TrainConfig(), scoring=args.scoring)
    if not torch.cuda.is_available():
        keep_freed_memory()  # as launch/prepare.py start() does on CPU
    info = P.init_distributed(cfg.dist_timeout)  # a group of one: ZeRO needs a process group
    # bf16 on a GPU; fp32 on a CPU, where bf16 matmuls have no hardware and run ~50x slower.
    device = info.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    llama = LlamaConfig(**size.model)
    shape = ModelShape.of(llama)
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "smoke": args.smoke, "dtype": str(dtype).removeprefix("torch."), "scoring": cfg.scoring,
        "versions": {name: importlib.metadata.version(name)
                     for name in ("torch", "transformers", "peft", "deepspeed")},
        "model": {**size.model, "frozen_matmul_params": shape.frozen_matmul_params},
        "matmul_tflops": matmul_tflops(device, dtype, size.matmul_n),
        "micro_batch": {}, "runs": [], "skipped": [], "checks": [],
    }  # fmt: skip
    print(f"{results['device']}: {results['dtype']} matmul {results['matmul_tflops']:.3f} TFLOP/s",
          flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "config.json"
        config_file.write_text(json.dumps(llama.to_dict()))
        bench = Bench(size, cfg, info, dtype, config_file, shape, results["matmul_tflops"],
                      args.memory_fraction)  # fmt: skip
        for setup in plan_setups(size, args.round_limit_s, args.smoke):
            label = {"seq_len": setup.seq_len, "method": setup.trainer, "zero_stage": setup.stage}
            if time.perf_counter() - started > args.deadline_s:
                results["skipped"].append(label)
                continue
            # One GPU run is all there is: a setup that fails is recorded, the others still run.
            try:
                key = str(setup.seq_len)
                if key not in results["micro_batch"]:
                    results["micro_batch"][key] = search_micro_batch(bench, setup.seq_len)
                    release_memory(device)  # the search's model is gone once it returns
                micro = results["micro_batch"][key]["chosen"]
                runner = run_peft if setup.trainer == "peft" else run_ours
                rows = runner(bench, setup, micro)
            except Exception as exc:  # noqa: BLE001 (recorded, printed, and the exit status is 1)
                traceback.print_exc()
                rows = [{**label, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}]
            left = release_memory(device)
            for row in rows:
                print(
                    json.dumps({k: v for k, v in row.items() if k != "flops_per_step"}), flush=True
                )
                results["runs"].append({**row, "memory_left_gib": left})
            results["checks"] = checks(results["runs"], size.seq_lens[0])
            results["wall_s"] = time.perf_counter() - started
            if args.json:  # after every setup: a run cut short still leaves its figures
                atomic_write_json(args.json, results)
    print_table(results)
    failed = [r for r in results["runs"] if "error" in r]
    return 1 if failed or results["skipped"] else 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
