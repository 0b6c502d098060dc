"""`launch/train.py --help`: every training option, grouped, with its type, default and the help
text written under its field in alora_ds/config.py.

The help text is read from config.py's source with ast (the docstring under each field), so the
options listed are exactly TrainConfig's fields and cannot drift from them. Nothing here imports
torch or DeepSpeed: launch/train.py answers `--help`, and rejects a malformed command line or a
hub id with no hub in reach, before its heavy imports (`answer_early`), in well under a second.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import textwrap
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alora_ds import config as config_module
from alora_ds.config import TrainConfig, parse_args
from alora_ds.errors import EXIT_INPUT_ERROR, InputError, is_first_process, print_input_error
from alora_ds.io.hub import check_hub_reachable
from alora_ds.io.pretrained import ALIASES

# The groups --help shows, in order. A field missing here still shows, under "other options"
# (and tests/launch/test_help.py says which group to add it to).
GROUPS: dict[str, tuple[str, ...]] = {
    "model": (
        "model_name_or_path", "model_config", "tokenizer_name_or_path", "attn_implementation",
        "gradient_checkpointing", "load_in_4bit", "trust_remote_code",
    ),
    "data": ("task", "train_file", "validation_file", "dataset_name", "max_seq_length"),
    "adapters and budget": (
        "method", "target_modules", "rank_budget", "lora_alpha", "lora_dropout",
        "cap_parameters", "sora_lambda",
    ),
    "allocation rounds": (
        "initial_epochs", "round_epochs", "initial_steps", "round_steps", "num_rounds",
        "prune_per_round", "val_examples", "scoring", "scoring_batch_size", "scoring_max_rows",
        "screen_candidates", "screen_exact_means", "screen_verify",
    ),
    "optimisation": (
        "ds_config", "seed", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2",
        "adam_epsilon", "warmup_ratio", "num_train_epochs", "max_steps",
        "per_device_train_batch_size", "gradient_accumulation_steps", "eval_steps", "patience",
        "skip_nonfinite", "dist_timeout",
    ),
    "output and checkpoints": (
        "output_dir", "overwrite_output_dir", "save_steps", "save_total_limit",
        "resume_from_checkpoint",
    ),
    "logging": ("logging_steps", "report_to", "progress_bar"),
    "set by the launcher": ("local_rank",),
}  # fmt: skip

USAGE = """\
usage: deepspeed --num_gpus N launch/train.py --ds_config DS.json --output_dir DIR
                 [--config FILE.yaml] [--key value ...]
       python launch/train.py ...            (one process)

Fine-tune a LLaMA-family model with ALoRA (arXiv 2403.16187) under DeepSpeed. Options come from
--config FILE.yaml (option: value lines; the recipes are in configs/), then from `--key value` or
`--key=value` on the command line, which win; a bool option alone (--gradient_checkpointing)
means true. The method as implemented: docs/method.md. The smallest run (2 CPU processes):

  deepspeed --num_gpus 2 launch/train.py --ds_config zero3.json --config configs/demo.yaml \\
      --output_dir runs/demo

  --config FILE.yaml
      Options from a YAML file; the command line overrides them.
  -h, --help
      Show this text and exit.
"""

HELP_FLAGS = ("-h", "--help")
_WIDTH = 100


def field_help() -> dict[str, str]:
    """Each TrainConfig field's help text: the docstring under it in config.py, on one line."""
    source = Path(config_module.__file__).read_text(encoding="utf-8")
    tree = ast.parse(source)
    cls = next(
        node
        for node in tree.body
        if isinstance(node, ast.ClassDef) and node.name == TrainConfig.__name__
    )
    helps: dict[str, str] = {}
    body = cls.body
    for node, following in zip(body, [*body[1:], None], strict=True):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        text = ""
        if (
            isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            text = " ".join(following.value.value.split())
        helps[node.target.id] = text
    return helps


def type_name(kind: Any) -> str:
    """How the command line takes a value of the field's type: INT, FLOAT, BOOL, TEXT, A,B,..."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        return f"{type_name(inner[0])} or none"
    if origin is list:
        return "A,B,..."
    return {str: "TEXT", int: "INT", float: "FLOAT", bool: "BOOL"}.get(kind, str(kind))


def default_text(field: dataclasses.Field) -> str:
    """The field's default as it would be written on the command line."""
    if field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        value = field.default
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value))
    if value == "":
        return "none, must be given" if field.name in ("output_dir", "ds_config") else '""'
    return str(value)


def grouped_fields() -> dict[str, list[str]]:
    """GROUPS restricted to the fields TrainConfig has, plus any field no group names."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    groups = {title: [n for n in members if n in names] for title, members in GROUPS.items()}
    placed = {n for members in groups.values() for n in members}
    rest = [n for n in names if n not in placed]
    if rest:
        groups["other options"] = rest
    return {title: members for title, members in groups.items() if members}


def help_text() -> str:
    """The whole --help text: usage, then every option by group."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    kinds = typing.get_type_hints(TrainConfig)
    helps = field_help()
    lines = [USAGE]
    for title, names in grouped_fields().items():
        lines.append(f"{title}:")
        for name in names:
            lines.append(
                f"  --{name} {type_name(kinds[name])}  (default: {default_text(fields[name])})"
            )
            wrapped = textwrap.wrap(helps.get(name) or "(no help text)", _WIDTH - 6)
            lines += [f"      {line}" for line in wrapped]
        lines.append("")
    return "\n".join(lines)


def answer_early(argv: Sequence[str]) -> None:
    """What launch/train.py can answer before importing torch: `--help` (print, exit 0), and a
    command line or --config file that does not parse or a hub id with no hub in reach (one
    `error:` line, exit 2, printed by the first process only: under the deepspeed launcher every
    process reads the same arguments). Returns when all is well; the trainer then parses the
    options again."""
    if any(token in HELP_FLAGS for token in argv):
        print(help_text())
        raise SystemExit(0)
    try:
        cfg = parse_args(argv)
        for what, name in (
            ("model", cfg.model_name_or_path),
            ("tokenizer", cfg.tokenizer_name_or_path),
        ):
            if name is not None and name not in ALIASES:
                unreachable = check_hub_reachable(name, what)
                if unreachable is not None:  # but cached: skip the hub's minute of retries
                    os.environ["HF_HUB_OFFLINE"] = "1"
                    if is_first_process():
                        print(f"{unreachable}: {what} {name} from the hub cache (HF_HUB_OFFLINE=1)")
    except InputError as exc:
        print_input_error(exc)
        raise SystemExit(EXIT_INPUT_ERROR) from None
