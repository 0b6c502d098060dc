"""Task templates, label mapping, row validation, tokenization and the tiny tokenizer."""

from __future__ import annotations

import json
import re

import pytest
from transformers import AutoTokenizer

from alora_ds.errors import InputError
from alora_ds.io import tasks
from alora_ds.io.examples import IGNORE_INDEX, validate_example
from alora_ds.io.tasks import (
    SPLITS,
    TASKS,
    TaskDataError,
    build_tiny_tokenizer,
    format_example,
    load_task_examples,
    load_task_rows,
    references,
    sample_path,
    template_fields,
    tokenize_example,
    tokenize_prompt,
)

# Longest field of a row that may run past the ~60-word budget of the other tasks.
PASSAGE_FIELD = {"boolq": "passage", "record": "passage", "squad": "context"}


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return build_tiny_tokenizer()


def first_row(task: str) -> dict:
    with sample_path(task, "train").open(encoding="utf-8") as handle:
        return json.loads(handle.readline())


# ------------------------------------------------------------------------- specs and samples


@pytest.mark.parametrize("name", sorted(TASKS))
def test_spec_fields_match_template(name):
    spec = TASKS[name]
    prompt_fields = set(spec.required_fields) - {spec.response_field}
    assert spec.response_field in spec.required_fields
    assert template_fields(spec.template) == prompt_fields | set(spec.optional_fields)
    if spec.template_without_input is not None:
        assert template_fields(spec.template_without_input) == prompt_fields
    assert bool(spec.label_names) == (spec.kind == "classification")


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_sample_row_formats(task, split):
    path = sample_path(task, split)
    rows = load_task_rows(path)
    examples = load_task_examples(task, path)
    low, high = {"train": (40, 50), "dev": (32, 50), "test": (20, 30)}[split]
    assert low <= len(examples) <= high
    for row, (prompt, response) in zip(rows, examples, strict=True):
        assert response and response == response.strip()
        assert response == references(task, row)[0]
        assert prompt == prompt.rstrip() or task == "alpaca"
        passage = row.get(PASSAGE_FIELD.get(task, ""), "")
        assert len(passage.split()) < 80
        assert len(prompt.split()) - len(passage.split()) < 60


def test_samples_are_small_and_sst2_is_balanced():
    files = [sample_path(task, split) for task in TASKS for split in SPLITS]
    assert sum(f.stat().st_size for f in files) < 300_000
    labels = [
        row["label"] for split in SPLITS for row in load_task_rows(sample_path("sst2", split))
    ]
    assert abs(labels.count(0) - labels.count(1)) <= 1


def test_e2e_rows_share_meaning_representations():
    rows = load_task_rows(sample_path("e2e", "dev"))
    mrs = [row["meaning_representation"] for row in rows]
    assert len(set(mrs)) < len(mrs)


def test_pinned_prompts():
    prompt, response = format_example("sst2", {"sentence": "a warm , funny film .", "label": 1})
    assert prompt == "a warm , funny film .\nThe sentiment of the given sentence is:"
    assert response == "positive"
    prompt, response = format_example(
        "copa",
        {"premise": "P.", "choice1": "A.", "choice2": "B.", "question": "Cause", "label": 1},
    )
    assert prompt == (
        "Premise: P.\nChoice 1: A.\nChoice 2: B.\nQuestion: which choice is the cause?\nAnswer:"
    )
    assert response == "2"


# ------------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    ("task", "label", "name"),
    [
        ("sst2", 0, "negative"),
        ("sst2", 1, "positive"),
        ("sst2", " Positive ", "positive"),
        ("rte", 0, "entailment"),
        ("rte", 1, "not_entailment"),
        ("qnli", "not_entailment", "not_entailment"),
        ("boolq", True, "yes"),
        ("boolq", False, "no"),
        ("boolq", 1, "yes"),
        ("boolq", "false", "no"),
        ("boolq", "yes", "yes"),
        ("copa", 0, "1"),
        ("copa", 1, "2"),
        ("copa", "2", "2"),
    ],
)
def test_label_int_and_name_mapping(task, label, name):
    row = {**first_row(task), "label": label}
    assert format_example(task, row)[1] == name
    assert references(task, row) == [name]


@pytest.mark.parametrize(
    ("task", "label", "message"),
    [
        ("sst2", True, "label True is a bool; task sst2 expected 0..1 or one of 'negative'"),
        ("sst2", -1, "label -1 is out of range for task sst2 (-1 marks an unlabeled GLUE"),
        ("sst2", "great", "unknown label 'great' for task sst2"),
        ("copa", 2, "label 2 is out of range for task copa"),
        ("rte", 0.0, "label must be an int or a string for task rte, got float"),
        ("rte", None, "missing field 'label' required by task rte"),
    ],
)
def test_bad_labels(task, label, message):
    row = {**first_row(task), "label": label}
    with pytest.raises(TaskDataError, match=re.escape(f"f.jsonl row 7: {message}")):
        format_example(task, row, row_id=7, source="f.jsonl")


# ------------------------------------------------------------------------ row validation


def test_missing_field_message_names_file_row_and_task():
    with pytest.raises(
        TaskDataError,
        match=r"^data/sst2/train\.jsonl row 3: missing field 'sentence' required by task sst2$",
    ):
        format_example("sst2", {"label": 1}, row_id=3, source="data/sst2/train.jsonl")


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_required_field_is_checked(task):
    for field in TASKS[task].required_fields:
        row = {k: v for k, v in first_row(task).items() if k != field}
        with pytest.raises(TaskDataError, match=f"row 1: missing field '{field}' required by"):
            format_example(task, row, row_id=1)


def test_bad_values():
    with pytest.raises(TaskDataError, match="field 'sentence' is empty"):
        format_example("sst2", {"sentence": "  ", "label": 0})
    with pytest.raises(TaskDataError, match="field 'sentence' must be a string .* got int"):
        format_example("sst2", {"sentence": 5, "label": 0})
    row = {**first_row("copa"), "question": "reason"}
    with pytest.raises(TaskDataError, match="'reason'; task copa expects 'cause' or 'effect'"):
        format_example("copa", row)
    with pytest.raises(TaskDataError, match="field 'answers' holds no non-empty answer"):
        format_example("squad", {**first_row("squad"), "answers": ["", " "]})
    with pytest.raises(TaskDataError, match="field 'answers' must be a list of strings"):
        format_example("record", {**first_row("record"), "answers": [3]})
    with pytest.raises(TaskDataError, match="expected an object with fields, got list"):
        format_example("sst2", ["a", 1])


def test_unknown_task_lists_known_ones():
    with pytest.raises(InputError, match=r"unknown task 'mnli'; known tasks: alpaca, boolq, copa"):
        format_example("mnli", {})
    with pytest.raises(ValueError, match="unknown split 'val'"):
        sample_path("sst2", "val")


def test_span_answer_forms():
    row = {"context": "C.", "question": "Q?"}
    squad_style = {"text": ["1874", " 1874 ", "in 1874"], "answer_start": [3, 3, 0]}
    assert references("squad", {**row, "answers": squad_style}) == ["1874", "in 1874"]
    assert format_example("squad", {**row, "answers": "1874"})[1] == "1874"


@pytest.mark.parametrize("no_input", [{}, {"input": ""}, {"input": None}, {"input": "  "}])
def test_alpaca_without_input_uses_short_template(no_input):
    prompt, response = format_example(
        "alpaca", {"instruction": "Say hi.", "output": "Hi!", **no_input}
    )
    assert "### Input" not in prompt and "paired with an input" not in prompt
    assert prompt.endswith("### Instruction:\nSay hi.\n\n### Response:\n")
    assert response == "Hi!"
    prompt, _ = format_example("alpaca", {"instruction": "Echo.", "input": "x", "output": "x"})
    assert prompt.endswith("### Input:\nx\n\n### Response:\n")


# ---------------------------------------------------------------------------- tokenization


def test_loss_covers_response_and_eos_only(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt, response = format_example("rte", first_row("rte"))
    example = tokenize_example(tok, prompt, response, max_length=512)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tok(response, add_special_tokens=False)["input_ids"]
    # Exact boundary: the ids are the separately tokenized parts, concatenated.
    assert example.input_ids == [tok.bos_token_id, *prompt_ids, *response_ids, tok.eos_token_id]
    n_context = 1 + len(prompt_ids)
    assert example.labels[:n_context] == [IGNORE_INDEX] * n_context
    assert example.labels[n_context:] == [*response_ids, tok.eos_token_id]
    assert tok.decode(example.labels[n_context:]) == response + "</s>"
    assert not example.truncated
    # The row format of alora_ds.io.examples accepts it.
    assert validate_example(example.as_dict(), "t") == example.as_dict()


def test_left_truncation_keeps_bos_and_whole_response(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt, response = format_example("squad", first_row("squad"))
    target = [*tok(response, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    max_length = len(target) + 6
    example = tokenize_example(tok, prompt, response, max_length)
    assert example.truncated
    assert len(example.input_ids) == max_length
    assert example.input_ids == [tok.bos_token_id, *prompt_ids[-5:], *target]
    assert example.labels == [IGNORE_INDEX] * 6 + target
    # Evaluation sees the same context as training.
    context, truncated = tokenize_prompt(tok, prompt, max_length - len(target))
    assert context == example.input_ids[:6] and truncated


def test_too_long_response_is_dropped(tiny_tokenizer):
    tok = tiny_tokenizer
    response = "a fairly long answer that cannot fit"
    n_target = len(tok(response, add_special_tokens=False)["input_ids"]) + 1
    assert tokenize_example(tok, "Question: q?\nAnswer:", response, n_target) is None
    # One more position leaves room for BOS alone as context.
    example = tokenize_example(tok, "Question: q?\nAnswer:", response, n_target + 1)
    assert example.input_ids[0] == tok.bos_token_id and example.truncated
    assert example.labels[0] == IGNORE_INDEX and IGNORE_INDEX not in example.labels[1:]


class CharTokenizer:
    """Tokenizer stand-in without BOS: one id per character, EOS = 0."""

    bos_token_id = None
    eos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}


def test_tokenizer_without_bos_keeps_one_prompt_token():
    example = tokenize_example(CharTokenizer(), "abcdef", "xy", max_length=4)
    assert example.input_ids == [ord("f"), ord("x"), ord("y"), 0]
    assert example.labels == [IGNORE_INDEX, ord("x"), ord("y"), 0]
    assert example.truncated
    assert tokenize_example(CharTokenizer(), "abcdef", "xy", max_length=3) is None
    with pytest.raises(InputError, match="max_length must be positive, got 0"):
        tokenize_prompt(CharTokenizer(), "abc", 0)


# ------------------------------------------------------------------------- tiny tokenizer


def test_tiny_tokenizer_is_deterministic(tiny_tokenizer):
    again = build_tiny_tokenizer()
    assert again.backend_tokenizer.to_str() == tiny_tokenizer.backend_tokenizer.to_str()
    assert len(tiny_tokenizer) == tasks.TINY_VOCAB_SIZE


def test_tiny_tokenizer_save_load_round_trip(tiny_tokenizer, tmp_path):
    build_tiny_tokenizer(save_dir=tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "chat_template"):
        assert getattr(loaded, attr) == getattr(tiny_tokenizer, attr), attr
    assert [loaded.bos_token, loaded.eos_token, loaded.pad_token] == ["<s>", "</s>", "<pad>"]
    for prompt, response in load_task_examples("alpaca", sample_path("alpaca", "dev")):
        ids = loaded(prompt + response)["input_ids"]
        assert ids == tiny_tokenizer(prompt + response)["input_ids"]
        assert ids[0] == loaded.bos_token_id
        # Byte-level BPE is lossless.
        assert loaded.decode(ids, skip_special_tokens=True) == prompt + response
    chat = loaded.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<s>user: hi\nassistant: "


# -------------------------------------------------------------------------------- loading


@pytest.fixture
def stdlib_only(monkeypatch):
    """Read files with the standard library even where datasets / pyarrow are installed."""
    monkeypatch.setattr(tasks, "_optional_module", lambda name: None)


def test_load_jsonl_json_and_csv(tmp_path, stdlib_only):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"sentence": "good .", "label": 1}\n\n{"sentence": "bad .", "label": 0}\n')
    assert [r["label"] for r in load_task_rows(jsonl)] == [1, 0]
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"sentence": "fine .", "label": "positive"}]))
    assert load_task_examples("sst2", array) == [
        ("fine .\nThe sentiment of the given sentence is:", "positive")
    ]
    table = tmp_path / "copa.csv"
    table.write_text(
        "premise,choice1,choice2,question,label\n"
        "It rained.,The grass got wet.,The sun rose.,effect,0\n"
        "It rained.,The sun rose.,The grass got wet.,effect,1\n"
    )
    # A digit column is read as integers, as datasets would: 1 is the SuperGLUE index of "2".
    assert [r for _, r in load_task_examples("copa", table)] == ["1", "2"]
    flags = tmp_path / "boolq.csv"
    flags.write_text("passage,question,label\nP.,is it,True\nP.,is it not,False\n")
    assert [r["label"] for r in load_task_rows(flags)] == [True, False]


def test_load_errors(tmp_path, stdlib_only):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(InputError, match=f"data file {re.escape(str(missing))} does not exist"):
        load_task_rows(missing)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n \n")
    with pytest.raises(TaskDataError, match=f"^{re.escape(str(empty))}: no rows$"):
        load_task_rows(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence": "x", "label": 0}\n{oops\n')
    with pytest.raises(TaskDataError, match=r"bad\.jsonl row 2: not valid JSON"):
        load_task_rows(bad)
    not_object = tmp_path / "list.json"
    not_object.write_text('[{"a": 1}, [1, 2]]')
    with pytest.raises(TaskDataError, match=r"list\.json row 2: expected a JSON object, got list"):
        load_task_rows(not_object)
    other = tmp_path / "rows.txt"
    other.write_text("x")
    with pytest.raises(InputError, match=r"unsupported extension '\.txt'"):
        load_task_rows(other)
    parquet = tmp_path / "rows.parquet"
    parquet.write_bytes(b"PAR1")
    with pytest.raises(InputError, match=r"rows\.parquet needs pyarrow"):
        load_task_rows(parquet)


def test_bad_row_in_file_names_file_and_row(tmp_path, stdlib_only):
    path = tmp_path / "train.jsonl"
    path.write_text('{"sentence": "good .", "label": 1}\n{"text": "bad .", "label": 0}\n')
    message = f"{path} row 2: missing field 'sentence' required by task sst2"
    with pytest.raises(TaskDataError, match=f"^{re.escape(message)}$"):
        load_task_examples("sst2", path)
