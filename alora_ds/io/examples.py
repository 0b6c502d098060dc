"""Pre-tokenized examples: JSON-lines rows holding `input_ids` and `labels` (-100 = not supervised).

This is the format every data path ends in (the task templates tokenize into it), and what the
scorer reads directly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from alora_ds.errors import InputError
from alora_ds.io.files import decode_utf8

IGNORE_INDEX = -100

Example = dict[str, list[int]]


def validate_example(row: object, where: str) -> Example:
    """Check one pre-tokenized row; `where` names it in errors (file and line)."""
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field in ("input_ids", "labels"):
        if field not in row:
            raise InputError(
                f"{where}: missing field {field!r} (pre-tokenized rows need input_ids and labels)"
            )
        values = row[field]
        if not isinstance(values, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in values
        ):
            raise InputError(f"{where}: field {field!r} must be a list of integers")
    input_ids, labels = row["input_ids"], row["labels"]
    if not input_ids:
        raise InputError(f"{where}: field 'input_ids' is empty")
    if len(labels) != len(input_ids):
        raise InputError(
            f"{where}: 'labels' has {len(labels)} entries but 'input_ids' has {len(input_ids)}"
        )
    if any(v < 0 for v in input_ids):
        raise InputError(f"{where}: field 'input_ids' holds a negative token id")
    # With the causal shift the label at position 0 is never predicted.
    if all(v == IGNORE_INDEX for v in labels[1:]):
        raise InputError(f"{where}: no supervised token (every label after the first is -100)")
    return {"input_ids": list(input_ids), "labels": list(labels)}


def load_tokenized_jsonl(path: str | Path, num_examples: int | None = None) -> list[Example]:
    """The first `num_examples` rows (all rows if None) of a pre-tokenized JSON-lines file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {path} does not exist")
    if num_examples is not None and num_examples <= 0:
        raise InputError(f"num_examples must be positive, got {num_examples}")
    rows: list[Example] = []
    available = 0
    # Read as bytes and decoded line by line: a file of any size, and a byte that is not UTF-8
    # is reported with its line.
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            line = decode_utf8(raw, path, first_line=line_number)
            if not line.strip():
                continue
            available += 1
            if num_examples is not None and len(rows) >= num_examples:
                continue  # only counted, so the error below can say how many rows exist
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path} line {line_number}: not valid JSON ({exc.msg})") from exc
            rows.append(validate_example(row, f"{path} line {line_number}"))
    if available == 0:
        raise InputError(f"data file {path} holds no rows")
    if num_examples is not None and num_examples > available:
        raise InputError(
            f"num_examples {num_examples} is larger than the {available} rows in {path}"
        )
    return rows


def collate(examples: Sequence[Example], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into input_ids, attention_mask and labels tensors (B, T)."""
    length = max(len(e["input_ids"]) for e in examples)
    batch = len(examples)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    for i, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[i, :n] = torch.tensor(example["input_ids"])
        labels[i, :n] = torch.tensor(example["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def make_batches(
    examples: Sequence[Example],
    batch_size: int,
    pad_token_id: int = 0,
    device: torch.device | str | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Cut examples into padded micro-batches of at most `batch_size` rows, in order."""
    if batch_size <= 0:
        raise InputError(f"batch_size must be positive, got {batch_size}")
    batches = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_token_id)
        batches.append({k: v.to(device) for k, v in batch.items()} if device else batch)
    return batches


def shard_batches(
    examples: Sequence[Example],
    batch_size: int,
    *,
    rank: int,
    world_size: int,
    pad_token_id: int,
    device: torch.device | str,
) -> list[dict[str, torch.Tensor]]:
    """Process `rank`'s share of `examples` as micro-batches; every process gets the same number
    (ZeRO-3 forwards are collective), padded with batches that supervise nothing."""
    mine = list(examples[rank::world_size])
    per_process = -(-len(examples) // world_size)
    count = -(-per_process // batch_size)
    filler = {"input_ids": [pad_token_id, pad_token_id], "labels": [IGNORE_INDEX, IGNORE_INDEX]}
    batches = []
    for i in range(count):
        chunk = mine[i * batch_size : (i + 1) * batch_size] or [filler]
        batches.append({k: v.to(device) for k, v in collate(chunk, pad_token_id).items()})
    return batches
