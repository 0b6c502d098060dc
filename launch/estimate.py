"""How much GPU memory an ALoRA run needs per process, before you ask the cluster for it.

    python -m launch.estimate --config configs/llama2-7b-alora.yaml --ds_config zero3_bf16.json \\
        --nodes 1 --gpus_per_node 8 [--max_seq_length N ...] [--json estimate.json]
    python -m launch.estimate --model_name_or_path meta-llama/Llama-2-7b-hf --nodes 1 \\
        --gpus_per_node 8 --zero_stage 3 --rank_budget 1792 --seq_len 2048 --micro_batch 2 \\
        [--offload] [--dtype bf16] [--json estimate.json]

A recipe (--config) and a ds config are read as training reads them: the recipe gives the model,
budget, targets, sequence length, micro batch, scoring chunk and gradient checkpointing, the ds
config the ZeRO stage, dtype, offload and reduce bucket; the command line overrides both, under
the training option names or the estimator's own (--seq_len, --micro_batch, --scoring_rows).

Per process (one per GPU), in GB (10^9 bytes):

- frozen weights: the base model in --dtype; ZeRO-3 shards it over every process, and with
  --offload (ZeRO-Offload, ds_configs/zero3_offload.json) it lives in CPU memory instead.
- gathered weights (ZeRO-3 only): the working set of full weights a forward holds at once, the
  largest module plus one prefetch bucket (DeepSpeed's default stage3_prefetch_bucket_size).
- adapters, gradients, optimizer states: LoRA's A and B in --dtype; their gradients in --dtype
  plus DeepSpeed's fp32 gradient partition; an fp32 master copy and Adam's two moments (12 bytes).
  Sharded as ZeRO shards them (optimizer from stage 1, gradients from 2, weights at 3). DeepSpeed's
  own estimator for the same trainable parameters is printed beside them as a cross-check.
- gradient bucket (ZeRO-2/3 with contiguous_gradients, as in ds_configs/): DeepSpeed allocates
  reduce_bucket_size elements in --dtype up front, whatever the trainable size.
- activations: what autograd keeps for the backward pass of one micro-batch, counted tensor by
  tensor for transformers' LLaMA with sdpa/flash attention (no attention matrix is stored), plus
  the loss's transient fp32 logits; with gradient checkpointing only each layer's input is kept
  and one layer is recomputed at a time.
- scoring buffers: an AB-LoRA round runs forwards under no_grad over B_val; the prefix cache of
  alora_ds.scoring.fast holds every layer's input and post-attention state for M and for the
  LoRA-free network, for one chunk of --scoring_rows rows, plus one forward of a block of
  candidates (the full LM head: an upper bound, since the fast scorer runs the head only at
  supervised positions).

The peak per GPU is the larger of a training step's and a scoring round's: the resident states
plus the gathered weights plus either the step's activations or the round's buffers. Given the
run's --gradient_checkpointing, the table says which one sets the peak.

Every count comes from the model's config on the meta device (exact parameter numbers, the
adapted modules' shapes); nothing is loaded. tests/test_estimate.py checks the activation and
scoring figures against the measured peak of the tensors a CPU step allocates, and the model
states against a ZeRO-3 run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

# Runnable as `python launch/estimate.py` too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig

from alora_ds.config import load_ds_config, read_config_file, resolve_ds_config
from alora_ds.core.inject import LLAMA_TARGET_MODULES, find_target_modules, initial_rank
from alora_ds.errors import ArgumentParser, InputError, run_cli
from alora_ds.io.hub import check_hub_reachable
from alora_ds.io.models import read_model_config
from alora_ds.io.pretrained import resolve_model_alias
from alora_ds.runtime.zero import deepspeed_model_states_estimate, model_dtype, zero_stage

GB = 1e9
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# DeepSpeed's defaults (elements), which our ds configs keep: stage3_prefetch_bucket_size, and
# reduce_bucket_size, the gradient bucket ZeRO-2/3 allocate whole when contiguous_gradients is on
# (1 GB per GPU in bf16, however few parameters are trainable).
PREFETCH_BUCKET = int(5e7)
REDUCE_BUCKET = int(5e8)
# Rows x tokens of one scoring forward: alora_ds.scoring.fast.default_max_rows batches candidates
# up to max(8 rows, 16,384 tokens).
SCORING_BLOCK_TOKENS = 16_384
# Bytes per trainable parameter beyond its weight: fp32 master copy + Adam's exp_avg, exp_avg_sq.
OPTIMIZER_BYTES = 12

# The LLaMA-2 architectures, so that the recipes can be sized offline (no hub access needed).
# Values from the models' config.json files.
_LLAMA2 = dict(
    vocab_size=32000,
    rms_norm_eps=1e-5,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    hidden_act="silu",
)
KNOWN_CONFIGS: dict[str, dict] = {
    "meta-llama/Llama-2-7b-hf": dict(
        _LLAMA2,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
    "meta-llama/Llama-2-13b-hf": dict(
        _LLAMA2,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
    ),
    "meta-llama/Llama-2-70b-hf": dict(
        _LLAMA2,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
    ),
}


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a LLaMA-family model that memory depends on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    total_params: int  # base model, tied weights counted once
    largest_module_params: int  # the most parameters one module holds itself (DeepSpeed's "layer")
    adapter_params: int  # A and B of every adapted module at r_init
    adapter_ranks_per_layer: int  # sum of r_init over one layer's adapted modules
    largest_adapter_params: int
    num_adapted: int
    r_init: int


@dataclass(frozen=True)
class Estimate:
    """Bytes per process (GPU) unless the name says otherwise."""

    frozen_weights: int
    gathered_weights: int
    adapters: int
    gradients: int
    optimizer_states: int
    gradient_bucket: int
    activations: int
    activations_checkpointed: int
    scoring_buffers: int
    training_peak: int  # resident + gathered + activations
    training_peak_checkpointed: int
    scoring_peak: int  # resident + gathered + scoring buffers
    peak: int  # max(training step, scoring round) without gradient checkpointing
    peak_checkpointed: int
    cpu_per_node: int  # CPU memory the offloaded states need on each node
    deepspeed_trainable_states: int  # DeepSpeed's estimator for the adapters' model states


def load_model_config(name_or_path: str) -> PretrainedConfig:
    """A config.json file, a directory holding one, a LLaMA-2 hub id (known offline), or any
    other hub id (needs the hub)."""
    if name_or_path in KNOWN_CONFIGS:
        return LlamaConfig(**KNOWN_CONFIGS[name_or_path])
    path = Path(name_or_path)
    if path.exists():
        return read_model_config(path)
    if name_or_path.startswith((".", "/")) or path.suffix:
        raise InputError(f"model config {name_or_path} does not exist")
    check_hub_reachable(name_or_path)
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        known = ", ".join(KNOWN_CONFIGS)
        raise InputError(
            f"cannot read the config of {name_or_path!r} (offline?); give a config.json or "
            f"directory, or one of {known}"
        ) from exc


def model_shape(
    config: PretrainedConfig,
    rank_budget: int | None = None,
    target_modules: Sequence[str] = LLAMA_TARGET_MODULES,
) -> ModelShape:
    """Exact parameter counts from the architecture built on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    unique = {id(p): p.numel() for p in model.parameters()}
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    names = find_target_modules(model, target_modules)
    budget = rank_budget or 8 * len(names)
    r = initial_rank(budget, len(names))
    modules = [model.get_submodule(n) for n in names]
    per_module = [r * (m.in_features + m.out_features) for m in modules]
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    return ModelShape(
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        layers=layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab=config.vocab_size,
        total_params=sum(unique.values()),
        largest_module_params=largest,
        adapter_params=sum(per_module),
        adapter_ranks_per_layer=r * len(names) // layers,
        largest_adapter_params=max(per_module),
        num_adapted=len(names),
        r_init=r,
    )


# ---- activations, per token (bytes) -------------------------------------------------------------
# Counted from transformers' LlamaDecoderLayer with the base frozen and LoRA on its linears:
#   each RMSNorm keeps its input in fp32 and the rsqrt (4 h + 4); the q/k/v inputs (one tensor,
#   d h) and the MLP input (d h); q, k, v after RoPE (d (h + 2 kv_dim)), the attention output
#   (d h, which o_proj reads without a copy) and its fp32 log-sum-exp (4 heads); the MLP's gate,
#   SiLU, up and product (4 d i); each adapter's rank-sized hidden (d r). A frozen linear keeps no
#   input (its weight needs no gradient), so LoRA adds only the rank-sized tensors.


def _norm_bytes(s: ModelShape) -> int:
    return 4 * s.hidden + 4


def layer_activation_bytes(s: ModelShape, d: int) -> int:
    kv_dim = s.kv_heads * s.head_dim
    return (
        2 * _norm_bytes(s)
        + d * s.hidden  # q/k/v input
        + d * (s.heads * s.head_dim + 2 * kv_dim)  # q, k, v
        + d * s.hidden  # attention output (o_proj input)
        + 4 * s.heads  # log-sum-exp
        + d * s.hidden  # MLP input
        + 4 * d * s.intermediate  # gate, SiLU(gate), up, SiLU(gate) * up
        + d * s.adapter_ranks_per_layer  # LoRA hiddens
    )


def _loss_bytes(s: ModelShape) -> int:
    # The final norm, log-softmax output (fp32) and the int64 labels kept for the backward.
    return _norm_bytes(s) + 4 * s.vocab + 8


def _loss_transient_bytes(s: ModelShape, d: int) -> int:
    # At the loss: fp32 logits next to their log-softmax (or its gradient), and a few hiddens.
    return 8 * s.vocab + 4 * d * s.hidden


def activation_bytes(s: ModelShape, d: int, tokens: int) -> int:
    """Peak activation memory of one training micro-batch (forward + backward).

    The first layer's input norm keeps nothing (nothing before it needs a gradient)."""
    kept = s.layers * layer_activation_bytes(s, d) - _norm_bytes(s) + _loss_bytes(s)
    return tokens * (kept + _loss_transient_bytes(s, d))


def checkpointed_activation_bytes(s: ModelShape, d: int, tokens: int) -> int:
    """The same with gradient checkpointing: each layer's input is kept, and the backward
    recomputes one layer at a time."""
    kept = s.layers * d * s.hidden + _loss_bytes(s)
    transient = max(_loss_transient_bytes(s, d), layer_activation_bytes(s, d) + 4 * d * s.hidden)
    return tokens * (kept + transient)


def nograd_forward_bytes(s: ModelShape, d: int, tokens: int) -> int:
    """Peak of one forward under no_grad with the loss: the logits (in d and fp32) and their
    log-softmax dominate LLaMA's vocabulary; else one MLP's intermediates."""
    logits = (8 + (d if d < 4 else 0)) * s.vocab
    return tokens * max(logits, 3 * d * s.intermediate) + tokens * 4 * d * s.hidden


def scoring_bytes(s: ModelShape, d: int, rows: int, seq_len: int) -> int:
    """One AB-LoRA chunk of `rows` examples: the prefix cache (each layer's input and
    post-attention state, for M and for the LoRA-free network) plus one no_grad forward over a
    block of candidates x examples."""
    cache = 2 * 2 * s.layers * rows * seq_len * d * s.hidden
    block_tokens = max(8 * seq_len, SCORING_BLOCK_TOKENS // seq_len * seq_len)
    return cache + nograd_forward_bytes(s, d, block_tokens)


# ---- model states -------------------------------------------------------------------------------


def estimate(
    s: ModelShape,
    *,
    nodes: int,
    gpus_per_node: int,
    zero_stage: int,
    seq_len: int,
    micro_batch: int,
    dtype: str = "bf16",
    offload: bool = False,
    scoring_rows: int = 8,
    prefetch_bucket: int = PREFETCH_BUCKET,
    reduce_bucket: int = REDUCE_BUCKET,
) -> Estimate:
    """Per-process memory of an ALoRA run (see the module docstring for each term)."""
    d = DTYPE_BYTES[dtype]
    world = nodes * gpus_per_node
    frozen = s.total_params  # the adapters come on top; the base weights are all frozen
    a = s.adapter_params
    grad_bytes = d + (4 if d < 4 else 0)  # DeepSpeed reduces into an fp32 partition

    def shard(numel_bytes: int, from_stage: int) -> int:
        return numel_bytes // world if zero_stage >= from_stage else numel_bytes

    frozen_bytes = shard(frozen * d, 3)
    gathered = min(frozen, s.largest_module_params + prefetch_bucket) * d if zero_stage == 3 else 0
    adapters = shard(a * d, 3)
    gradients = shard(a * grad_bytes, 2)
    optimizer = shard(a * OPTIMIZER_BYTES, 1)
    bucket = reduce_bucket * d if zero_stage >= 2 else 0
    cpu = 0
    if offload:  # ZeRO-Offload of parameters and optimizer (stage 3): the states live in CPU RAM
        cpu = (frozen_bytes + adapters + gradients + optimizer) * gpus_per_node
        frozen_bytes = adapters = optimizer = 0
        gradients = 0
    tokens = micro_batch * seq_len
    resident = frozen_bytes + adapters + gradients + optimizer + bucket + gathered
    acts = activation_bytes(s, d, tokens)
    acts_ckpt = checkpointed_activation_bytes(s, d, tokens)
    scoring = scoring_bytes(s, d, scoring_rows, seq_len)

    ds_cpu, ds_gpu = deepspeed_model_states_estimate(
        zero_stage, a, s.largest_adapter_params, gpus_per_node, nodes, offload=offload
    )
    return Estimate(
        frozen_weights=frozen_bytes,
        gathered_weights=gathered,
        adapters=adapters,
        gradients=gradients,
        optimizer_states=optimizer,
        gradient_bucket=bucket,
        activations=acts,
        activations_checkpointed=acts_ckpt,
        scoring_buffers=scoring,
        training_peak=resident + acts,
        training_peak_checkpointed=resident + acts_ckpt,
        scoring_peak=resident + scoring,
        peak=resident + max(acts, scoring),
        peak_checkpointed=resident + max(acts_ckpt, scoring),
        cpu_per_node=cpu,
        deepspeed_trainable_states=int(ds_gpu),
    )


def format_table(e: Estimate, title: str, checkpointing: bool | None = None) -> str:
    """The table the command prints; `checkpointing` (the run's --gradient_checkpointing, when
    known) picks which peak is the run's."""
    rows = [
        ("frozen weights", e.frozen_weights),
        ("gathered weights (ZeRO-3 working set)", e.gathered_weights),
        ("adapters (A, B)", e.adapters),
        ("adapter gradients", e.gradients),
        ("optimizer states (fp32 master + Adam)", e.optimizer_states),
        ("gradient bucket (reduce_bucket_size)", e.gradient_bucket),
        ("activations", e.activations),
        ("activations, gradient checkpointing", e.activations_checkpointed),
        ("AB-LoRA scoring buffers", e.scoring_buffers),
        ("peak per GPU, a training step", e.training_peak),
        ("peak per GPU, a training step, checkpointing", e.training_peak_checkpointed),
        ("peak per GPU, a scoring round", e.scoring_peak),
        ("peak per GPU", e.peak),
        ("peak per GPU, gradient checkpointing", e.peak_checkpointed),
    ]
    if e.cpu_per_node:
        rows.append(("CPU memory per node (offloaded states)", e.cpu_per_node))
    width = max(len(name) for name, _ in rows)
    lines = [title, f"{'':{width}}  {'GB':>9}"]
    lines += [f"{name:{width}}  {value / GB:9.3f}" for name, value in rows]
    lines.append(
        "The peak per GPU is the larger of a training step's and a scoring round's: both hold the "
        "resident states and the gathered weights, the step its activations, the round its "
        "prefix cache and one block of candidates."
    )
    if checkpointing is not None:
        training = e.training_peak_checkpointed if checkpointing else e.training_peak
        peak = e.peak_checkpointed if checkpointing else e.peak
        larger = "a training step" if training >= e.scoring_peak else "a scoring round"
        lines.append(
            f"This run (gradient checkpointing {'on' if checkpointing else 'off'}): "
            f"{peak / GB:.1f} GB per GPU, set by {larger} (training step {training / GB:.1f}, "
            f"scoring round {e.scoring_peak / GB:.1f})."
        )
    lines.append(
        f"(cross-check: DeepSpeed's estimator puts the adapters' model states at "
        f"{e.deepspeed_trainable_states / GB:.3f} GB per GPU)"
    )
    return "\n".join(lines)


# The estimator's own option names, the training option (a recipe's key) that means the same,
# and the default when neither is given.
SHARED_OPTIONS: dict[str, tuple[str, object]] = {
    "seq_len": ("max_seq_length", 2048),
    "micro_batch": ("per_device_train_batch_size", 1),
    "scoring_rows": ("scoring_batch_size", 8),
}
# What the ds config decides, and the default without one.
ENGINE_DEFAULTS: dict[str, object] = {
    "zero_stage": 3,
    "dtype": "bf16",
    "offload": False,
    "reduce_bucket_size": float(REDUCE_BUCKET),
}


def _bool(text: str) -> bool:
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if text.lower() not in words:
        raise argparse.ArgumentTypeError(f"not a bool: {text!r}")
    return words[text.lower()]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m launch.estimate", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        help="a training recipe (configs/*.yaml): its model, budget, sequence length, micro "
        "batch, scoring chunk and gradient checkpointing; the options below override it",
    )
    parser.add_argument(
        "--model_name_or_path",
        help="config.json, a model directory, the alias smollm2, or a LLaMA-2 hub id ("
        + ", ".join(KNOWN_CONFIGS)
        + ")",
    )
    parser.add_argument(
        "--ds_config",
        help="the run's ds config (ds_configs/*.json): ZeRO stage, dtype, offload, reduce bucket",
    )
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus_per_node", type=int, default=8)
    parser.add_argument(
        "--zero_stage", type=int, choices=(0, 1, 2, 3), help="default: the ds config's, or 3"
    )
    parser.add_argument(
        "--rank_budget", type=int, default=None, help="total LoRA ranks; default 8 per module"
    )
    parser.add_argument(
        "--target_modules", help="comma-separated module names or regular expressions "
        f"(default: {','.join(LLAMA_TARGET_MODULES)})"
    )  # fmt: skip
    for name, (training, default) in SHARED_OPTIONS.items():
        what = {"seq_len": "tokens per example", "micro_batch": "examples per GPU per forward",
                "scoring_rows": "validation rows per scoring chunk"}[name]  # fmt: skip
        parser.add_argument(
            f"--{name}", f"--{training}", dest=name, type=int, help=f"{what} (default {default})"
        )
    parser.add_argument(
        "--gradient_checkpointing", nargs="?", const=True, type=_bool,
        help="whether the run recomputes activations (picks which peak is the run's)",
    )  # fmt: skip
    parser.add_argument("--dtype", choices=tuple(DTYPE_BYTES), help="default: the ds config's")
    parser.add_argument(
        "--offload", action="store_true", default=None,
        help="ZeRO-3 with parameters and optimizer on the CPU (default: the ds config's)",
    )  # fmt: skip
    parser.add_argument(
        "--reduce_bucket_size",
        type=float,
        help="zero_optimization.reduce_bucket_size (default: the ds config's, or DeepSpeed's 5e8)",
    )
    parser.add_argument("--json", default=None, help="also write the numbers (bytes) here")
    return parser


def engine_settings(path: str) -> dict[str, object]:
    """zero_stage, dtype, offload and reduce_bucket_size as a ds config sets them."""
    ds = load_ds_config(resolve_ds_config(path))
    zero = ds.get("zero_optimization", {})
    offloaded = [
        part for part in ("offload_param", "offload_optimizer")
        if (zero.get(part) or {}).get("device") in ("cpu", "nvme")
    ]  # fmt: skip
    if len(offloaded) == 1:
        raise InputError(
            f"ds config {path}: only {offloaded[0]} is offloaded; the estimate models ZeRO-Offload "
            "of both the parameters and the optimizer"
        )
    dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(model_dtype(ds), "fp32")
    bucket = zero.get("reduce_bucket_size", REDUCE_BUCKET)
    return {
        "zero_stage": zero_stage(ds),
        "dtype": dtype,
        "offload": bool(offloaded),
        "reduce_bucket_size": float(bucket if isinstance(bucket, (int, float)) else REDUCE_BUCKET),
    }


def resolve_options(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every option left unset: from the ds config (the engine's), then the recipe (the
    training options), then the defaults. The command line wins over both."""
    recipe = read_config_file(args.config) if args.config else {}
    for name in ("model_name_or_path", "rank_budget", "gradient_checkpointing", "ds_config"):
        if getattr(args, name) is None:
            setattr(args, name, recipe.get(name))
    if args.target_modules is None:
        args.target_modules = ",".join(recipe.get("target_modules", LLAMA_TARGET_MODULES))
    for name, (training, default) in SHARED_OPTIONS.items():
        if getattr(args, name) is None:
            setattr(args, name, recipe.get(training, default))
    engine = engine_settings(args.ds_config) if args.ds_config else ENGINE_DEFAULTS
    for name, value in engine.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.model_name_or_path is None:
        raise InputError("give --model_name_or_path, or a --config recipe that names the model")
    args.model_name_or_path = resolve_model_alias(args.model_name_or_path)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = resolve_options(build_parser().parse_args(argv))
    for name in ("nodes", "gpus_per_node", "seq_len", "micro_batch", "scoring_rows"):
        if getattr(args, name) <= 0:
            raise InputError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.offload and args.zero_stage != 3:
        raise InputError(f"--offload needs --zero_stage 3, got {args.zero_stage}")
    config = load_model_config(args.model_name_or_path)
    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    shape = model_shape(config, args.rank_budget, targets)
    result = estimate(
        shape,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        zero_stage=args.zero_stage,
        seq_len=args.seq_len,
        micro_batch=args.micro_batch,
        dtype=args.dtype,
        offload=args.offload,
        scoring_rows=args.scoring_rows,
        reduce_bucket=int(args.reduce_bucket_size),
    )
    world = args.nodes * args.gpus_per_node
    title = (
        f"{args.model_name_or_path}: {shape.total_params / 1e9:.2f}B params, "
        f"{shape.num_adapted} adapted modules x r_init {shape.r_init} = "
        f"{shape.adapter_params / 1e6:.1f}M adapter params; {args.nodes} node(s) x "
        f"{args.gpus_per_node} GPUs = {world}, ZeRO-{args.zero_stage}"
        f"{' + offload' if args.offload else ''}, {args.dtype}, micro batch {args.micro_batch} x "
        f"{args.seq_len} tokens, scoring chunks of {args.scoring_rows} rows"
    )
    print(format_table(result, title, args.gradient_checkpointing))
    if args.json:
        payload = {"arguments": vars(args), "shape": asdict(shape), "bytes": asdict(result)}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
