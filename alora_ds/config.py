"""The training configuration: typed dataclasses, a YAML file and command-line overrides.

Every field has one default and its help text beside it. `--config FILE.yaml` is read first,
then `--key value` pairs override it; an unknown key (in either place) is an error that names it
and suggests the closest known one. Validation happens in one place, `validate`, and every message
names the bad value. The ds config JSON holds engine settings only (ZeRO stage, precision,
micro-batch): nothing here duplicates it except the batch arithmetic, which is checked at start.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alora_ds.core import LLAMA_TARGET_MODULES
from alora_ds.errors import InputError
from alora_ds.scoring import SCORING_MODES

# The names of alora_ds.methods.METHODS (which imports torch; --help must not), checked equal by
# the tests.
METHODS = ("alora", "lora", "alora-dnas", "alora-sensi", "adalora", "sora")


@dataclass
class TrainConfig:
    # ---- model ---------------------------------------------------------------------------
    model_name_or_path: str | None = None
    """Local checkpoint directory or hub id of the base model. None: build a random model from
    --model_config (the embedded tiny LLaMA when both are None)."""
    model_config: str | None = None
    """A config.json for a randomly initialised model (used when --model_name_or_path is None)."""
    tokenizer_name_or_path: str | None = None
    """Tokenizer; defaults to the model directory, or the embedded tiny tokenizer."""
    attn_implementation: str = "auto"
    """auto (flash_attention_2 when installed, else sdpa), sdpa, eager or flash_attention_2."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, about 30% slower)."""
    load_in_4bit: bool = False
    """QLoRA: load the frozen base in bitsandbytes nf4 (stored in the run's dtype so ZeRO-3 can
    shard it); the adapters stay in the run's dtype."""
    trust_remote_code: bool = False
    """Run Python code shipped with a hub model or tokenizer. Off: only transformers' own code."""

    # ---- data ----------------------------------------------------------------------------
    task: str = "sst2"
    """sst2, rte, qnli, boolq, copa, record, squad, e2e, alpaca (the paper's templates);
    prompt_completion (prompt / completion rows), chat (`messages` rows rendered with the
    tokenizer's chat template, the loss on the assistant turns); or pretokenized."""
    train_file: str | None = None
    """Training data (json, jsonl, csv, parquet); defaults to the task's sample file."""
    validation_file: str | None = None
    """Development data: B_val for the rounds and the dev loss; defaults to the sample file."""
    dataset_name: str | None = None
    """A Hugging Face dataset name instead of local files (needs the hub)."""
    max_seq_length: int = 512
    """Longer examples lose prompt tokens from the left so the response survives (paper: 2048)."""

    # ---- ALoRA -----------------------------------------------------------------------------
    method: str = "alora"
    """alora (AB-LoRA rounds), lora (fixed ranks), alora-dnas (gate values as scores),
    alora-sensi (AdaLoRA's sensitivity as scores), adalora (peft's AdaLoRA) or sora (L1 gates)."""
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_TARGET_MODULES))
    """Module names (suffixes) or regular expressions to adapt."""
    rank_budget: int | None = None
    """Total LoRA ranks over all adapted modules; None: 8 per module (the paper's r = 8)."""
    lora_alpha: float = 16.0
    """LoRA alpha: every module's scale is alpha / r_init and stays fixed when its rank changes."""
    lora_dropout: float = 0.0
    """Dropout on the adapter input."""
    initial_epochs: float = 1.0
    """K1: epochs of training before the first round."""
    round_epochs: float = 0.25
    """K2: epochs of training after each round."""
    initial_steps: int = 0
    """K1 in optimizer steps; overrides initial_epochs when > 0."""
    round_steps: int = 0
    """K2 in optimizer steps; overrides round_epochs when > 0."""
    num_rounds: int = 8
    """N_A: allocation rounds."""
    prune_per_round: float = 7
    """n_A: ranks pruned (and re-added) per round; an integer, or a fraction of the live ranks."""
    sora_lambda: float = 0.1
    """SoRA: strength of the L1 proximal step on the gates (threshold = lr x sora_lambda)."""
    val_examples: int = 32
    """|B_val|: development examples scored per round (drawn anew each round, fixed within it)."""
    cap_parameters: bool = False
    """Beyond the paper: also keep the adapter parameter count at or under its value at the
    start (a rank moved from k_proj to up_proj costs more parameters) by withdrawing new ranks.
    False (the paper, footnote 4): every round shares all n_A new ranks among the modules that
    lost none."""
    scoring_batch_size: int = 8
    """Validation examples per chunk when scoring (the prefix cache holds one chunk)."""
    scoring: str = "fast"
    """fast (prefix caching, candidate batching, head at supervised positions; exact), naive
    (two full forwards per rank: the reference) or screened (beyond the paper: every rank
    estimated from two gradient passes, exact scores only for the ranks that decide the round,
    which the round file marks)."""
    scoring_max_rows: int = 0
    """Rows (candidates x examples) per scoring forward; 0 picks a cap from the sequence length."""
    screen_candidates: int = 0
    """screened: ranks with the lowest estimates scored exactly first (0: n_A); more are
    scored, automatically, until the cut is proven."""
    screen_exact_means: bool = False
    """screened: also score exactly the modules whose mean importance decides where the
    remainder of the new ranks goes (footnote 4), so that the added ranks are the exact plan's
    too; false (the default) leaves those means estimated: the pruned ranks stay exact, and a
    round costs a few times less (the most important modules are scored for their means)."""
    screen_verify: bool = False
    """screened: also score every rank exactly and record in the round file whether the plans
    agree (costs a full fast round; for measuring the estimator)."""

    # ---- optimisation -----------------------------------------------------------------------
    output_dir: str = ""
    """Where the run writes everything (required)."""
    overwrite_output_dir: bool = False
    """Allow writing into an output_dir that holds another run."""
    ds_config: str = ""
    """DeepSpeed config JSON (ZeRO stage, precision, micro-batch size): required. A bare name
    that is not a file here (zero3.json) is one of the repository's ds_configs/."""
    seed: int = 42
    """Seed for the model init, data order, B_val draws and new ranks."""
    learning_rate: float = 1e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    warmup_ratio: float = 0.06
    """Share of the steps with a linear warm-up; linear decay to 0 after it."""
    num_train_epochs: float = 10.0
    """Total epochs (the rounds included)."""
    max_steps: int = -1
    """Total optimizer steps; overrides num_train_epochs when > 0."""
    per_device_train_batch_size: int = 8
    """Micro-batch per process (must match train_micro_batch_size_per_gpu in the ds config)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step (must match the ds config)."""
    eval_steps: int = 200
    """Evaluate the dev loss every this many optimizer steps after the last round."""
    patience: int = 10
    """Early stopping: evaluations without a better dev loss before training stops."""
    logging_steps: int = 10
    """Log to metrics.jsonl every this many optimizer steps."""
    dist_timeout: int = 600
    """Seconds a collective may wait before the run fails instead of hanging."""
    save_steps: int = 0
    """Checkpoint every this many optimizer steps (0: only at round boundaries and the end)."""
    save_total_limit: int = 2
    """Checkpoints kept in output_dir/checkpoints (the newest ones)."""
    resume_from_checkpoint: str | None = None
    """auto (the latest checkpoint in output_dir, if any) or a checkpoint directory."""
    skip_nonfinite: bool = False
    """Skip an optimizer step whose loss is NaN or inf (counted) instead of stopping the run."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Metric sinks besides metrics.jsonl: tensorboard, wandb (when installed), or none."""
    progress_bar: bool = True
    """A tqdm progress bar on rank 0 (loss, lr, tokens/s, ETA; scoring rounds get their own)."""
    local_rank: int = -1
    """Set by the deepspeed launcher; do not set it yourself."""


_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def _coerce(name: str, value: Any, kind: Any, source: str) -> Any:
    """Turn a YAML value or a command-line string into the field's type."""
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        kind = next(a for a in args if a is not type(None))
        origin = typing.get_origin(kind)
    try:
        if origin is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise TypeError
            return [str(v) for v in value]
        if kind is bool:
            if isinstance(value, bool):
                return value
            return _BOOL_WORDS[str(value).lower()]
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            return float(value)
        if kind is str:
            return str(value)
    except (TypeError, ValueError, KeyError):
        pass
    else:
        raise AssertionError(f"unhandled type {kind} for {name}")
    type_name = getattr(kind, "__name__", str(kind))
    raise InputError(f"{source}: {name}={value!r} is not a valid {type_name}")


def _unknown(name: str, source: str) -> InputError:
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return InputError(f"{source}: unknown option {name!r}{hint}")


def parse_args(argv: Sequence[str]) -> TrainConfig:
    """`--config FILE.yaml` plus `--key value` / `--key=value` / `--flag` overrides."""
    types_by_name = _field_types()
    overrides: list[tuple[str, str | None]] = []
    config_file: str | None = None
    items = list(argv)
    i = 0
    while i < len(items):
        token = items[i]
        if not token.startswith("--"):
            raise InputError(
                f"command line: unexpected argument {token!r} (options are --key value)"
            )
        key, eq, value = token[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            has_value = i + 1 < len(items) and not items[i + 1].startswith("--")
            if has_value:
                value = items[i + 1]
                i += 1
            elif types_by_name.get(key) is bool:
                value = "true"
            else:
                raise InputError(f"command line: option --{key} needs a value")
        i += 1
        if key == "config":
            config_file = value
        else:
            overrides.append((key, value))

    values = read_config_file(config_file) if config_file is not None else {}
    for key, value in overrides:
        if key not in types_by_name:
            raise _unknown(key, "command line")
        values[key] = _coerce(key, value, types_by_name[key], "command line")
    config = TrainConfig(**values)
    validate(config)
    return config


def read_config_file(config_file: str) -> dict[str, Any]:
    """The options of a YAML config file (a recipe), typed as TrainConfig's fields; a missing
    file, bad YAML, an unknown key or a value of the wrong type is an InputError naming it."""
    types_by_name = _field_types()
    path = Path(config_file)
    if not path.is_file():
        raise InputError(f"config file {config_file} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(
            f"config file {config_file} is not valid YAML ({exc.__class__.__name__})"
        ) from exc
    if not isinstance(loaded, dict):
        raise InputError(f"config file {config_file}: expected a mapping of option: value")
    values: dict[str, Any] = {}
    for key, value in loaded.items():
        if key not in types_by_name:
            raise _unknown(key, config_file)
        values[key] = _coerce(key, value, types_by_name[key], config_file)
    return values


def validate(config: TrainConfig) -> None:
    """Every check on the configuration alone (files are checked when they are read)."""

    def need(condition: bool, message: str) -> None:
        if not condition:
            raise InputError(message)

    for name, kind in _field_types().items():
        value = getattr(config, name)
        if kind is float and not math.isfinite(value):
            raise InputError(f"--{name} must be a finite number, got {value}")
    need(bool(config.output_dir), "--output_dir is required")
    need(bool(config.ds_config), "--ds_config is required (e.g. ds_configs/zero3.json)")
    need(
        config.method in METHODS,
        f"--method {config.method!r} is not one of {', '.join(METHODS)}",
    )
    need(
        config.scoring in SCORING_MODES,
        f"--scoring {config.scoring!r} is not one of {', '.join(SCORING_MODES)}",
    )
    need(
        config.scoring_max_rows >= 0,
        f"--scoring_max_rows must be >= 0, got {config.scoring_max_rows}",
    )
    need(
        config.screen_candidates >= 0,
        f"--screen_candidates must be >= 0, got {config.screen_candidates}",
    )
    need(
        config.attn_implementation in ("auto", "sdpa", "eager", "flash_attention_2"),
        f"--attn_implementation {config.attn_implementation!r} is not auto, sdpa, eager or "
        "flash_attention_2",
    )
    need(
        config.rank_budget is None or config.rank_budget > 0,
        f"--rank_budget must be positive, got {config.rank_budget}",
    )
    need(config.lora_alpha > 0, f"--lora_alpha must be positive, got {config.lora_alpha}")
    need(
        0 <= config.lora_dropout < 1, f"--lora_dropout must be in [0, 1), got {config.lora_dropout}"
    )
    need(
        config.max_seq_length >= 8,
        f"--max_seq_length must be at least 8, got {config.max_seq_length}",
    )
    need(config.num_rounds >= 0, f"--num_rounds must be >= 0, got {config.num_rounds}")
    need(
        config.prune_per_round >= 0, f"--prune_per_round must be >= 0, got {config.prune_per_round}"
    )
    need(config.sora_lambda >= 0, f"--sora_lambda must be >= 0, got {config.sora_lambda}")
    need(config.val_examples > 0, f"--val_examples must be positive, got {config.val_examples}")
    need(
        config.initial_epochs >= 0 and config.round_epochs >= 0,
        "--initial_epochs and --round_epochs must be >= 0",
    )
    need(config.learning_rate > 0, f"--learning_rate must be positive, got {config.learning_rate}")
    need(
        0 <= config.warmup_ratio < 1, f"--warmup_ratio must be in [0, 1), got {config.warmup_ratio}"
    )
    need(
        config.num_train_epochs > 0 or config.max_steps > 0,
        "--num_train_epochs or --max_steps must be positive",
    )
    need(
        config.per_device_train_batch_size > 0,
        f"--per_device_train_batch_size must be positive, got {config.per_device_train_batch_size}",
    )
    need(
        config.gradient_accumulation_steps > 0,
        f"--gradient_accumulation_steps must be positive, got {config.gradient_accumulation_steps}",
    )
    need(config.eval_steps > 0, f"--eval_steps must be positive, got {config.eval_steps}")
    need(config.patience > 0, f"--patience must be positive, got {config.patience}")
    need(config.logging_steps > 0, f"--logging_steps must be positive, got {config.logging_steps}")
    need(
        config.scoring_batch_size > 0,
        f"--scoring_batch_size must be positive, got {config.scoring_batch_size}",
    )
    need(config.dist_timeout > 0, f"--dist_timeout must be positive, got {config.dist_timeout}")
    need(config.save_steps >= 0, f"--save_steps must be >= 0, got {config.save_steps}")
    need(
        config.save_total_limit > 0,
        f"--save_total_limit must be positive, got {config.save_total_limit}",
    )
    unknown_sinks = sorted(set(config.report_to) - {"tensorboard", "wandb", "none"})
    need(
        not unknown_sinks,
        f"--report_to {','.join(unknown_sinks)} is not tensorboard, wandb or none",
    )


def to_json(config: TrainConfig) -> dict[str, Any]:
    """The resolved configuration as written to output_dir/config.json."""
    data = dataclasses.asdict(config)
    data.pop("local_rank")
    return data


# The engine settings that ship with the repository; `--ds_config zero3.json` names one of them.
DS_CONFIGS_DIR = Path(__file__).resolve().parents[1] / "ds_configs"


def resolve_ds_config(path: str) -> str:
    """The ds config file `path` names: the path itself when it is a file, else, for a bare
    file name (no directory part), the repository's ds_configs/<name> as an absolute path (what
    config.json then records). Anything else comes back unchanged for load_ds_config to refuse."""
    if Path(path).is_file() or Path(path).name != path:
        return path
    shipped = DS_CONFIGS_DIR / path
    if shipped.is_file():
        return str(shipped)
    names = ", ".join(sorted(p.name for p in DS_CONFIGS_DIR.glob("*.json")))
    raise InputError(
        f"ds config {path} does not exist, here or in {DS_CONFIGS_DIR} (which holds: {names})"
    )


def load_ds_config(path: str) -> dict[str, Any]:
    """Read the DeepSpeed config JSON; a missing or malformed file names itself."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"ds config {path} does not exist")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(
            f"ds config {path} is not valid JSON: {exc.msg} at line {exc.lineno}"
        ) from exc
    if not isinstance(data, dict):
        raise InputError(f"ds config {path}: expected a JSON object")
    for section in ("zero_optimization", "bf16", "fp16"):
        if not isinstance(data.get(section, {}), dict):
            raise InputError(
                f"ds config {path}: {section} must be a JSON object, got {data[section]!r}"
            )
    stage = data.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise InputError(
            f"ds config {path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}"
        )
    if data.get("bf16", {}).get("enabled") and data.get("fp16", {}).get("enabled") is True:
        raise InputError(f"ds config {path}: bf16 and fp16 cannot both be enabled")
    if "optimizer" in data or "scheduler" in data:
        raise InputError(
            f"ds config {path}: remove the 'optimizer'/'scheduler' sections; the trainer builds "
            "AdamW and the linear schedule from --learning_rate and --warmup_ratio"
        )
    return data


def resolve_batch_sizes(
    ds_config: dict[str, Any], config: TrainConfig, world_size: int, ds_path: str
) -> dict[str, Any]:
    """Fill the ds config's batch fields from the config and check that they add up:
    train_batch_size = micro batch x accumulation x processes."""
    micro = config.per_device_train_batch_size
    accumulation = config.gradient_accumulation_steps
    expected = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * world_size,
    }
    resolved = dict(ds_config)
    for key, value in expected.items():
        given = ds_config.get(key, "auto")
        if given != "auto" and given != value:
            raise InputError(
                f"ds config {ds_path}: {key} = {given!r} but the run has {key} = {value} "
                f"(micro batch {micro} x accumulation {accumulation} x {world_size} processes = "
                f'{micro * accumulation * world_size}); set it to "auto" or make them agree'
            )
        resolved[key] = value
    return resolved
