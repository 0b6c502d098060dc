"""From task files to pre-tokenized examples: the data path of the trainer.

A split is a local file (json, jsonl, csv, parquet) of a task's raw rows, a Hugging Face dataset
name (when the hub can be reached), or pre-tokenized `input_ids`/`labels` rows (task
`pretokenized`). The rows are read through a paper task's template (`alora_ds.io.tasks`) or as
one of the formats users bring (`alora_ds.io.formats`: prompt_completion, chat). Every example
ends as `{"input_ids": [...], "labels": [...]}`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from alora_ds.errors import InputError
from alora_ds.io.examples import Example, load_tokenized_jsonl
from alora_ds.io.formats import CHAT, USER_FORMATS, check_chat_template, tokenize_user_row
from alora_ds.io.tasks import (
    TASKS,
    TokenizedExample,
    format_example,
    load_task_rows,
    row_prefix,
    sample_path,
    tokenize_example,
)

PRETOKENIZED = "pretokenized"


@dataclass(frozen=True)
class SplitStats:
    """What happened to a split's rows on the way to examples."""

    source: str
    rows: int
    truncated: int  # lost prompt tokens from the left
    dropped: int  # the response alone did not fit

    def describe(self) -> str:
        return (
            f"{self.source}: {self.rows} rows -> {self.rows - self.dropped} examples "
            f"({self.truncated} truncated from the prompt side, {self.dropped} dropped)"
        )


def check_task(task: str) -> None:
    if task != PRETOKENIZED and task not in TASKS and task not in USER_FORMATS:
        known = ", ".join([*sorted(TASKS), *USER_FORMATS, PRETOKENIZED])
        raise InputError(f"unknown task {task!r}; known tasks: {known}")


def resolve_split_path(task: str, path: str | None, split: str) -> str:
    """The file for a split: the given path, or the task's shipped sample file."""
    if path is not None:
        if not Path(path).is_file():
            raise InputError(f"{split} file {path} does not exist")
        return path
    if task == PRETOKENIZED or task in USER_FORMATS:
        raise InputError(f"task {task} needs --{split}_file (a json, jsonl, csv or parquet file)")
    return str(sample_path(task, "dev" if split == "validation" else split))


def _hub_rows(dataset_name: str, split: str) -> list[dict]:
    import datasets

    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise InputError(
            f"--dataset_name {dataset_name}: the hub is offline here (HF_DATASETS_OFFLINE=1); "
            "download the data elsewhere and pass local files with --train_file / --validation_file"
        )
    try:
        return [dict(row) for row in datasets.load_dataset(dataset_name, split=split)]
    except (OSError, ValueError, ConnectionError) as exc:
        raise InputError(
            f"--dataset_name {dataset_name} split {split} could not be loaded ({type(exc).__name__}); "
            "pass local files with --train_file / --validation_file"
        ) from exc


def tokenize_row(
    task: str, row: dict, row_id: int, source: str, tokenizer, max_length: int
) -> TokenizedExample | None:
    """One raw row as a training example (None: it cannot fit max_length), through the task's
    template or a user format; errors name `source` and `row_id`."""
    if task in USER_FORMATS:
        return tokenize_user_row(task, tokenizer, row, max_length, row_prefix(source, row_id))
    prompt, response = format_example(task, row, row_id=row_id, source=source)
    return tokenize_example(tokenizer, prompt, response, max_length)


def build_split(
    task: str,
    path: str | None,
    split: str,
    tokenizer,
    max_length: int,
    dataset_name: str | None = None,
) -> tuple[list[Example], SplitStats]:
    """Pre-tokenized examples of one split (`train` or `validation`), and what was cut."""
    check_task(task)
    if task == PRETOKENIZED:
        source = resolve_split_path(task, path, split)
        examples = load_tokenized_jsonl(source)
        too_long = [i for i, e in enumerate(examples) if len(e["input_ids"]) > max_length]
        if too_long:
            raise InputError(
                f"{source} line {too_long[0] + 1}: {len(examples[too_long[0]]['input_ids'])} tokens, "
                f"over --max_seq_length {max_length} (pre-tokenized rows are not truncated)"
            )
        return examples, SplitStats(source, len(examples), 0, 0)

    if dataset_name is not None and path is None:
        source = f"{dataset_name}[{split}]"
        rows = _hub_rows(dataset_name, split)
    else:
        source = resolve_split_path(task, path, split)
        rows = load_task_rows(source)
    if not rows:
        raise InputError(f"{source}: the {split} split is empty")
    if task == CHAT:
        check_chat_template(tokenizer, task)
    examples: list[Example] = []
    truncated = dropped = 0
    for index, row in enumerate(rows):
        tokenized = tokenize_row(task, row, index + 1, source, tokenizer, max_length)
        if tokenized is None:
            dropped += 1
            continue
        truncated += tokenized.truncated
        examples.append(tokenized.as_dict())
    if not examples:
        raise InputError(
            f"{source}: every one of the {len(rows)} {split} rows is longer than "
            f"--max_seq_length {max_length} in its response alone"
        )
    return examples, SplitStats(source, len(rows), truncated, dropped)
