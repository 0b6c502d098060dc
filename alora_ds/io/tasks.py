"""The paper's tasks as data: prompt templates, required fields, label names (docs/method.md section 7).

A raw row (one dict from a json / jsonl / csv / parquet file) becomes a (prompt, response) pair;
the response is only the label or answer text. `tokenize_example` turns the pair into the
pre-tokenized `input_ids` / `labels` rows of `alora_ds.io.examples`, with the loss on the response and
EOS only.

Labels follow the GLUE / SuperGLUE integer conventions of the HF datasets, and the label names
are accepted too:

    sst2          0 = negative, 1 = positive
    rte, qnli     0 = entailment, 1 = not_entailment
    boolq         0 / False = no, 1 / True = yes
    copa          0 = "1" (choice 1 is right), 1 = "2"

The names are strings, so for COPA the string "1" is choice 1 and the integer 1 is choice 2, as
in SuperGLUE. A CSV column of digits is read as integers (see `load_task_rows`).

Sample rows for every task live under `alora_ds/data/samples/<task>/{train,dev,test}.jsonl`, and
`build_tiny_tokenizer` trains a small byte-level BPE on them for tests and the demo.
"""

from __future__ import annotations

import csv
import importlib
import json
import re
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from alora_ds.errors import InputError
from alora_ds.io.examples import IGNORE_INDEX
from alora_ds.io.files import read_utf8

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TaskKind = Literal["classification", "span", "generation", "instruction"]

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "data" / "samples"
SPLITS: tuple[str, ...] = ("train", "dev", "test")


class TaskDataError(InputError):
    """A row that does not fit its task: one line naming the file, the row and the field."""


@dataclass(frozen=True)
class TaskSpec:
    """One task: where its fields go in the prompt and what the response is."""

    name: str
    """Task key, as used on the command line and in `alora_ds/data/samples/<name>/`."""
    kind: TaskKind
    """classification: a label name; span: an answer span; generation: a reference text;
    instruction: an instruction-following answer."""
    required_fields: tuple[str, ...]
    """Fields every row must have, non-empty: the template's fields and the response field."""
    response_field: str
    """The field the response (and the evaluation references) comes from."""
    template: str
    """The prompt, with `{field}` placeholders; the response follows it directly."""
    max_new_tokens: int
    """Generation budget at evaluation time, enough for the longest expected response."""
    label_names: tuple[str, ...] = ()
    """Classification only: the response text of integer label i (GLUE / SuperGLUE order)."""
    bool_labels: bool = False
    """Also accept True / False (and the strings "true" / "false") as labels 1 / 0."""
    optional_fields: tuple[str, ...] = ()
    """Fields a row may leave out or leave empty (Alpaca's `input`)."""
    template_without_input: str | None = None
    """The prompt used when every optional field is empty (Alpaca without input)."""


_ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
_ENTAILMENT_QUESTION = "Question: do the two sentences entail each other?\nAnswer:"

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="sst2",
            kind="classification",
            required_fields=("sentence", "label"),
            response_field="label",
            template="{sentence}\nThe sentiment of the given sentence is:",
            max_new_tokens=8,
            label_names=("negative", "positive"),
        ),
        TaskSpec(
            name="rte",
            kind="classification",
            required_fields=("sentence1", "sentence2", "label"),
            response_field="label",
            template="sentence 1: {sentence1}\nsentence 2: {sentence2}\n" + _ENTAILMENT_QUESTION,
            max_new_tokens=8,
            label_names=("entailment", "not_entailment"),
        ),
        TaskSpec(
            name="qnli",
            kind="classification",
            required_fields=("question", "sentence", "label"),
            response_field="label",
            template="sentence 1: {question}\nsentence 2: {sentence}\n" + _ENTAILMENT_QUESTION,
            max_new_tokens=8,
            label_names=("entailment", "not_entailment"),
        ),
        TaskSpec(
            name="boolq",
            kind="classification",
            required_fields=("passage", "question", "label"),
            response_field="label",
            template="Reference document: {passage}\nQuestion: {question}\nAnswer:",
            max_new_tokens=4,
            label_names=("no", "yes"),
            bool_labels=True,
        ),
        TaskSpec(
            name="copa",
            kind="classification",
            required_fields=("premise", "choice1", "choice2", "question", "label"),
            response_field="label",
            template=(
                "Premise: {premise}\nChoice 1: {choice1}\nChoice 2: {choice2}\n"
                "Question: which choice is the {question}?\nAnswer:"
            ),
            max_new_tokens=4,
            label_names=("1", "2"),
        ),
        TaskSpec(
            name="record",
            kind="span",
            required_fields=("passage", "query", "answers"),
            response_field="answers",
            template="Context: {passage}\nQuestion: {query}\nAnswer:",
            max_new_tokens=32,
        ),
        TaskSpec(
            name="squad",
            kind="span",
            required_fields=("context", "question", "answers"),
            response_field="answers",
            template="Context: {context}\nQuestion: {question}\nAnswer:",
            max_new_tokens=32,
        ),
        TaskSpec(
            name="e2e",
            kind="generation",
            required_fields=("meaning_representation", "human_reference"),
            response_field="human_reference",
            template=(
                "Reference: {meaning_representation}\n"
                "Write a customer review of the restaurant from the reference above.\nReview:"
            ),
            max_new_tokens=128,
        ),
        TaskSpec(
            name="alpaca",
            kind="instruction",
            required_fields=("instruction", "output"),
            response_field="output",
            template=_ALPACA_WITH_INPUT,
            max_new_tokens=512,
            optional_fields=("input",),
            template_without_input=_ALPACA_NO_INPUT,
        ),
    )
}

# COPA asks for one of these two relations; anything else is a data error, not a new prompt.
_COPA_QUESTIONS = ("cause", "effect")


def get_task(name: str) -> TaskSpec:
    """The spec of task `name`; an unknown name is an InputError listing the known tasks."""
    try:
        return TASKS[name]
    except KeyError:
        raise InputError(
            f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}"
        ) from None


def row_prefix(source: str | Path | None, row_id: int | str | None) -> str:
    """Error prefix: 'data/sst2/train.jsonl row 3: ' (either part may be missing)."""
    parts = [str(source)] if source is not None else []
    if row_id is not None:
        parts.append(f"row {row_id}")
    return " ".join(parts) + ": " if parts else ""


def _text_field(spec: TaskSpec, row: dict[str, Any], field: str, where: str) -> str:
    """A required text field, stripped; missing (or None, as datasets fills gaps) is an error."""
    value = row.get(field)
    if value is None:
        raise TaskDataError(f"{where}missing field {field!r} required by task {spec.name}")
    if not isinstance(value, str):
        raise TaskDataError(
            f"{where}field {field!r} must be a string for task {spec.name}, "
            f"got {type(value).__name__} {value!r}"
        )
    if not value.strip():
        raise TaskDataError(f"{where}field {field!r} is empty (task {spec.name})")
    return value.strip()


def _label_name(spec: TaskSpec, value: object, where: str) -> str:
    """Map an integer label (GLUE / SuperGLUE order), a bool (BoolQ) or a label name to its name."""
    names = spec.label_names
    accepted = f"expected 0..{len(names) - 1} or one of {', '.join(map(repr, names))}"
    if isinstance(value, bool):
        # bool is an int subclass: check it first, so True is not silently label 1 for SST-2.
        if not spec.bool_labels:
            raise TaskDataError(f"{where}label {value!r} is a bool; task {spec.name} {accepted}")
        return names[int(value)]
    if isinstance(value, int):
        if 0 <= value < len(names):
            return names[value]
        hint = " (-1 marks an unlabeled GLUE test row)" if value == -1 else ""
        raise TaskDataError(
            f"{where}label {value} is out of range for task {spec.name}{hint}; {accepted}"
        )
    if isinstance(value, str):
        key = value.strip().lower()
        for name in names:
            if key == name.lower():
                return name
        if spec.bool_labels and key in ("true", "false"):
            return names[int(key == "true")]
        raise TaskDataError(f"{where}unknown label {value!r} for task {spec.name}; {accepted}")
    if value is None:
        field = spec.response_field
        raise TaskDataError(f"{where}missing field {field!r} required by task {spec.name}")
    raise TaskDataError(
        f"{where}label must be an int or a string for task {spec.name}, got {type(value).__name__}"
    )


def _answer_list(spec: TaskSpec, row: dict[str, Any], where: str) -> list[str]:
    """All answers of a span row, stripped and deduplicated in order; the first one trains.

    Accepts a list of strings (ReCoRD), a single string (a CSV column) or SQuAD's
    {"text": [...], "answer_start": [...]} dict.
    """
    field = spec.response_field
    value = row.get(field)
    if value is None:
        raise TaskDataError(f"{where}missing field {field!r} required by task {spec.name}")
    if isinstance(value, dict):
        value = value.get("text")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise TaskDataError(
            f"{where}field {field!r} must be a list of strings for task {spec.name}, "
            f"got {row[field]!r}"
        )
    answers = list(dict.fromkeys(a.strip() for a in value if a.strip()))
    if not answers:
        raise TaskDataError(f"{where}field {field!r} holds no non-empty answer (task {spec.name})")
    return answers


def _check_row(row: object, where: str) -> None:
    if not isinstance(row, dict):
        raise TaskDataError(f"{where}expected an object with fields, got {type(row).__name__}")


def _response_texts(spec: TaskSpec, row: dict[str, Any], where: str) -> list[str]:
    if spec.kind == "classification":
        return [_label_name(spec, row.get(spec.response_field), where)]
    if spec.kind == "span":
        return _answer_list(spec, row, where)
    return [_text_field(spec, row, spec.response_field, where)]


def references(
    task: str,
    row: dict[str, Any],
    row_id: int | str | None = None,
    source: str | Path | None = None,
) -> list[str]:
    """The texts a generated response is scored against; the first is the training response.

    Classification: [label name]. Span: every gold answer, deduplicated. E2E: [this row's
    human_reference] (the evaluator groups rows that share a meaning_representation).
    Alpaca: [output]. Errors name `source` and `row_id` like `format_example`.
    """
    spec = get_task(task)
    where = row_prefix(source, row_id)
    _check_row(row, where)
    return _response_texts(spec, row, where)


def format_example(
    task: str,
    row: dict[str, Any],
    row_id: int | str | None = None,
    source: str | Path | None = None,
) -> tuple[str, str]:
    """(prompt, response) for one raw row of `task`.

    The prompt ends without trailing whitespace (Alpaca's ends with the template's newline) and
    the response carries no leading whitespace: the two are tokenized separately, so the
    boundary never depends on how a tokenizer merges across it. `row_id` and `source` only
    name the row in errors (pass the 1-based row number and the file path).
    """
    spec = get_task(task)
    where = row_prefix(source, row_id)
    _check_row(row, where)
    prompt_fields = [f for f in spec.required_fields if f != spec.response_field]
    values = {f: _text_field(spec, row, f, where) for f in prompt_fields}
    if spec.name == "copa":
        question = values["question"].lower()
        if question not in _COPA_QUESTIONS:
            raise TaskDataError(
                f"{where}field 'question' is {values['question']!r}; task copa expects "
                f"'cause' or 'effect'"
            )
        values["question"] = question
    for field in spec.optional_fields:
        value = row.get(field)
        if value is not None and not isinstance(value, str):
            raise TaskDataError(
                f"{where}field {field!r} must be a string for task {spec.name}, "
                f"got {type(value).__name__}"
            )
        values[field] = (value or "").strip()
    template = spec.template
    if spec.optional_fields and not any(values[f] for f in spec.optional_fields):
        assert spec.template_without_input is not None, spec.name
        template = spec.template_without_input
    response = _response_texts(spec, row, where)[0]
    return template.format(**values), response


def template_fields(template: str) -> set[str]:
    """The `{field}` names a template uses."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


# ---------------------------------------------------------------------------- tokenization


@dataclass(frozen=True)
class TokenizedExample:
    """One training example: labels are -100 on the prompt, the response ids plus EOS after it."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool
    """True when prompt tokens were cut from the left to fit max_length."""

    def as_dict(self) -> dict[str, list[int]]:
        """The pre-tokenized row format of `alora_ds.io.examples` (input_ids, labels)."""
        return {"input_ids": list(self.input_ids), "labels": list(self.labels)}


def _bos_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """[bos_id] if the tokenizer puts BOS in front of an encoded text (LLaMA does), else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if probe[:1] == [bos] else []


def tokenize_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: str, max_length: int
) -> tuple[list[int], bool]:
    """Prompt ids as training sees them (BOS if the tokenizer uses one), left-truncated.

    Returns (ids, truncated). At most `max_length` ids; when the prompt is longer its first
    tokens are dropped and BOS is kept, so generation at evaluation time starts from exactly
    the context that training used.
    """
    if max_length < 1:
        raise InputError(f"max_length must be positive, got {max_length}")
    bos = _bos_prefix(tokenizer)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    budget = max(max_length - len(bos), 0)
    # ids[-0:] would keep everything, hence the explicit start index.
    kept = ids[max(len(ids) - budget, 0) :]
    return bos + kept, len(kept) < len(ids)


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int
) -> TokenizedExample | None:
    """input_ids = [BOS] + prompt + response + EOS; the loss covers response + EOS only.

    Prompt and response are tokenized separately and concatenated, so the prompt/response
    boundary is exact. An example over `max_length` loses prompt tokens from the left (BOS is
    kept), so the response always survives whole; `truncated` says so. Returns None (drop the
    example) when the response and EOS leave no room for one token of context before them.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError("the tokenizer has no eos_token; the response must end with one")
    target = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
    # At least one context token (BOS or the prompt's last token) must precede the response:
    # the causal shift never predicts position 0.
    if len(target) + 1 > max_length:
        return None
    context, truncated = tokenize_prompt(tokenizer, prompt, max_length - len(target))
    if not context:
        return None
    return TokenizedExample(
        input_ids=context + target,
        labels=[IGNORE_INDEX] * len(context) + target,
        truncated=truncated,
    )


# --------------------------------------------------------------------------------- loading

_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_INT_RE = re.compile(r"-?\d+")


def _optional_module(name: str) -> ModuleType | None:
    """The module if it is installed, else None (datasets and pyarrow are optional)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        return None


def _rows_from_json(path: Path, text: str) -> list[dict[str, Any]]:
    """A JSON array of objects, or JSON lines (one object per non-empty line)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None  # not one JSON document: read it as JSON lines below
    if isinstance(data, list):
        items = list(enumerate(data, start=1))
    elif data is not None and not isinstance(data, dict):
        raise TaskDataError(f"{path}: expected a list of objects or JSON lines")
    else:
        items = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise TaskDataError(f"{path} row {number}: not valid JSON ({exc.msg})") from exc
    for number, item in items:
        if not isinstance(item, dict):
            raise TaskDataError(
                f"{path} row {number}: expected a JSON object, got {type(item).__name__}"
            )
    return [item for _, item in items]


def _rows_from_csv(text: str) -> list[dict[str, Any]]:
    """CSV rows; a column whose every value is an integer (or True/False) is converted.

    This mirrors the type inference of `datasets` (pandas), so a label column means the same
    with or without that package installed.
    """
    rows: list[dict[str, Any]] = list(csv.DictReader(text.splitlines()))
    for column in rows[0].keys() if rows else ():
        values = [row[column] for row in rows]
        if all(isinstance(v, str) and _INT_RE.fullmatch(v.strip()) for v in values):
            for row in rows:
                row[column] = int(row[column])
        elif all(isinstance(v, str) and v.strip().lower() in ("true", "false") for v in values):
            for row in rows:
                row[column] = row[column].strip().lower() == "true"
    return rows


def load_task_rows(path: str | Path) -> list[dict[str, Any]]:
    """Raw rows of a local .json / .jsonl / .csv / .parquet file, in file order.

    The standard library reads json and csv, pyarrow reads parquet. A missing file, an unknown
    extension or a file without rows is an InputError naming the path.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {path} does not exist")
    builder = _FORMATS.get(path.suffix.lower())
    if builder is None:
        raise InputError(
            f"data file {path}: unsupported extension {path.suffix!r} "
            f"(use one of {', '.join(sorted(_FORMATS))})"
        )
    text = "" if builder == "parquet" else read_utf8(path)
    # Checked before any reader, which would fail on an empty file with a less useful message.
    if path.stat().st_size == 0 or (builder != "parquet" and not text.strip()):
        raise TaskDataError(f"{path}: no rows")
    # json and csv are read with the standard library: quicker than `datasets`, no cache
    # written, no progress bar on stderr in front of a one-line error.
    if builder == "parquet":
        pyarrow_parquet = _optional_module("pyarrow.parquet")
        if pyarrow_parquet is None:
            raise InputError(f"reading {path} needs pyarrow (pip install pyarrow)")
        try:
            rows = pyarrow_parquet.read_table(path).to_pylist()
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise TaskDataError(f"{path}: not a readable parquet file ({exc})") from exc
    elif builder == "csv":
        rows = _rows_from_csv(text)
    else:
        rows = _rows_from_json(path, text)
    if not rows:
        raise TaskDataError(f"{path}: no rows")
    return rows


def load_task_examples(task: str, path: str | Path) -> list[tuple[str, str]]:
    """(prompt, response) for every row of a file; the first bad row raises, naming file and row."""
    spec = get_task(task)
    return [
        format_example(spec.name, row, row_id=number, source=path)
        for number, row in enumerate(load_task_rows(path), start=1)
    ]


def sample_path(task: str, split: str) -> Path:
    """The bundled sample file of `task` for split train, dev or test."""
    get_task(task)
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
    return SAMPLES_DIR / task / f"{split}.jsonl"


# ------------------------------------------------------------------------------ tokenizer

TINY_VOCAB_SIZE = 1024
TINY_SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>")
# role: content lines; an assistant turn ends with EOS, as the response does in training. The
# newline is an expression because transformers renders with trim_blocks, which would eat a
# literal newline after {% endif %}.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def _sample_texts() -> Iterator[str]:
    """Every formatted prompt and response of every sample file, in a fixed order."""
    for task in sorted(TASKS):
        for split in SPLITS:
            path = sample_path(task, split)
            for prompt, response in load_task_examples(task, path):
                yield prompt
                yield response


def build_tiny_tokenizer(save_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE (1024 ids) trained on the sample data, for tests and the demo.

    LLaMA-like special tokens: BOS "<s>" is prepended to every encoded text, EOS "</s>" ends a
    response, "<pad>" pads. Deterministic (same vocabulary and merges every run) and fast;
    written with `save_pretrained` when `save_dir` is given.
    """
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        # All 256 byte symbols, so any text encodes without <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_sample_texts(), trainer=trainer)
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=TINY_CHAT_TEMPLATE,
        model_max_length=2048,
    )
    if save_dir is not None:
        wrapped.save_pretrained(str(save_dir))
    return wrapped
