"""Pre-tokenized JSON-lines data: loading, validation, padding."""

from __future__ import annotations

import json

import pytest
import torch

from alora_ds.errors import InputError
from alora_ds.io.examples import collate, load_tokenized_jsonl, make_batches


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_and_pad(tmp_path):
    path = write_rows(
        tmp_path / "d.jsonl",
        [
            {"input_ids": [1, 5, 6], "labels": [-100, 5, 6]},
            {"input_ids": [1, 7, 8, 9, 2], "labels": [-100, -100, 8, 9, 2], "extra": "ignored"},
        ],
    )
    rows = load_tokenized_jsonl(path)
    assert len(rows) == 2
    batch = collate(rows, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 0, 0], [1, 7, 8, 9, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 5, 6, -100, -100], [-100, -100, 8, 9, 2]]
    assert [b["input_ids"].shape for b in make_batches(rows, 1)] == [
        torch.Size([1, 3]),
        torch.Size([1, 5]),
    ]
    assert load_tokenized_jsonl(path, num_examples=1) == rows[:1]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"labels": [1, 2]}], r"d.jsonl line 1: missing field 'input_ids'"),
        ([{"input_ids": [1, 2]}], r"d.jsonl line 1: missing field 'labels'"),
        ([{"input_ids": [1, 2], "labels": [1]}], r"'labels' has 1 entries but 'input_ids' has 2"),
        (
            [{"input_ids": [1, "a"], "labels": [1, 2]}],
            r"field 'input_ids' must be a list of integers",
        ),
        ([{"input_ids": [], "labels": []}], r"field 'input_ids' is empty"),
        ([{"input_ids": [1, 2, 3], "labels": [1, -100, -100]}], r"line 1: no supervised token"),
        (
            [{"input_ids": [1, 2], "labels": [-100, 2]}, [1, 2]],
            r"line 2: expected a JSON object, got list",
        ),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, rows, message):
    path = write_rows(tmp_path / "d.jsonl", rows)
    with pytest.raises(InputError, match=message):
        load_tokenized_jsonl(path)


def test_file_level_errors(tmp_path):
    with pytest.raises(InputError, match=r"data file .*missing.jsonl does not exist"):
        load_tokenized_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InputError, match=r"empty.jsonl holds no rows"):
        load_tokenized_jsonl(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"input_ids": [1, 2], "labels": [-100, 2]}\n{oops\n')
    with pytest.raises(InputError, match=r"bad.jsonl line 2: not valid JSON"):
        load_tokenized_jsonl(tmp_path / "bad.jsonl")
    path = write_rows(tmp_path / "two.jsonl", [{"input_ids": [1, 2], "labels": [-100, 2]}] * 2)
    with pytest.raises(
        InputError, match=r"num_examples 32 is larger than the 2 rows in .*two.jsonl"
    ):
        load_tokenized_jsonl(path, num_examples=32)
    with pytest.raises(InputError, match="num_examples must be positive, got 0"):
        load_tokenized_jsonl(path, num_examples=0)
    with pytest.raises(InputError, match="batch_size must be positive, got 0"):
        make_batches([], 0)
