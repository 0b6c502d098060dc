"""Offline metrics for the paper's tasks (docs/method.md section 7), with the libraries made for them.

- sst2, rte, qnli, boolq, copa: accuracy of the generated label text. A prediction that is not
  one of the task's labels (after light normalisation) is wrong and also counted as
  `unparseable`, so a decoding problem is visible instead of hiding in the accuracy.
- squad, record: exact match and F1 with the official SQuAD v1.1 normalisation, max over the
  gold answers; `f1_em` is their mean, the number the paper reports.
- e2e: corpus BLEU (sacrebleu), ROUGE-L F-measure (rouge-score) and METEOR (nltk), each
  hypothesis scored against every reference of its meaning representation.
- alpaca: ROUGE-L F-measure of each response against its row's `output`, a rough check only:
  the paper judges instruction following on MT-Bench (eval.mt_bench, then eval.judge).

All scores are in 0-100. HF `evaluate.load` is not used: its metric scripts live on the hub.

    python -m eval.metrics --task squad --predictions predictions.jsonl --output metrics.json
"""

from __future__ import annotations

import json
import os
import re
import string
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import nltk
from nltk.tokenize import TreebankWordTokenizer
from nltk.translate.meteor_score import meteor_score
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

from alora_ds.errors import ArgumentParser, InputError, run_cli
from alora_ds.io.files import atomic_write_json, check_output_file, read_utf8

LABELS: dict[str, tuple[str, ...]] = {
    "sst2": ("positive", "negative"),
    "rte": ("entailment", "not_entailment"),
    "qnli": ("entailment", "not_entailment"),
    "boolq": ("yes", "no"),
    "copa": ("1", "2"),
}
"""The label words a classification task's response must be (the prompt templates reuse them)."""

SPAN_TASKS: tuple[str, ...] = ("squad", "record")
GENERATION_TASKS: tuple[str, ...] = ("e2e",)
INSTRUCTION_TASKS: tuple[str, ...] = ("alpaca",)
TASKS: tuple[str, ...] = (*LABELS, *SPAN_TASKS, *GENERATION_TASKS, *INSTRUCTION_TASKS)

REPO_ROOT = Path(__file__).resolve().parents[1]
WORDNET_FIX = "run `bash scripts/install_wordnet.sh`"

# Quotes, brackets and sentence punctuation a model may put around a label ("Positive.").
_LABEL_TRIM = " \t\r\n\"'`.,;:!?()[]{}*"
_PUNCTUATION = frozenset(string.punctuation)
_TREEBANK = TreebankWordTokenizer()
_ROUGE = rouge_scorer.RougeScorer(["rougeL"])
# E2E rows that share a meaning representation are grouped by the first of these fields.
_GROUP_FIELDS: tuple[str, ...] = ("mr", "meaning_representation", "id")


# ----------------------------------------------------------------------------- input rows


def _row_name(index: int, row: dict[str, Any]) -> str:
    return f"row {index} (id {row['id']!r})" if "id" in row else f"row {index}"


def _check_rows(rows: Sequence[Any]) -> None:
    """Raise InputError naming the first row that lacks a usable prediction or references."""
    if not rows:
        raise InputError("no rows to score")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InputError(f"row {index}: expected an object, got {type(row).__name__}")
        name = _row_name(index, row)
        for field in ("prediction", "references"):
            if field not in row:
                raise InputError(f"{name}: missing field {field!r}")
        if not isinstance(row["prediction"], str):
            kind = type(row["prediction"]).__name__
            raise InputError(f"{name}: field 'prediction' must be a string, got {kind}")
        refs = row["references"]
        if not (isinstance(refs, list) and refs and all(isinstance(r, str) for r in refs)):
            raise InputError(
                f"{name}: field 'references' must be a non-empty list of strings, got {refs!r}"
            )


# ----------------------------------------------------------------------------- classification


def normalize_label(text: str) -> str:
    """Lower-case, trim quotes/punctuation at both ends, and join words with '_'.

    "Positive." -> "positive", "'Not entailment'" -> "not_entailment", " 2 " -> "2".
    """
    text = text.strip().lower().strip(_LABEL_TRIM)
    return re.sub(r"[\s\-]+", "_", text)


def parse_label(task: str, text: str) -> str | None:
    """The label of `task` that `text` names, or None when it names none of them."""
    label = normalize_label(text)
    return label if label in LABELS[task] else None


def accuracy(task: str, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy (0-100) of predicted labels against `references[0]`; counts unparseable ones."""
    correct = unparseable = 0
    for index, row in enumerate(rows):
        gold = parse_label(task, row["references"][0])
        if gold is None:
            raise InputError(
                f"{_row_name(index, row)}: field 'references' holds {row['references'][0]!r},"
                f" not a {task} label (one of {', '.join(LABELS[task])})"
            )
        predicted = parse_label(task, row["prediction"])
        if predicted is None:
            unparseable += 1
        elif predicted == gold:
            correct += 1
    return {
        "accuracy": 100.0 * correct / len(rows),
        "correct": correct,
        "unparseable": unparseable,
    }


# ----------------------------------------------------------------------------- SQuAD / ReCoRD


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower-case, drop punctuation and articles, collapse spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token-level F1 of the normalised strings (official v1.1: 0.0 when nothing overlaps)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def span_scores(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Exact match and F1 (0-100, max over gold answers) and their mean `f1_em`."""
    em = sum(max(exact_match_score(r["prediction"], g) for g in r["references"]) for r in rows)
    f1 = sum(max(f1_score(r["prediction"], g) for g in r["references"]) for r in rows)
    em, f1 = 100.0 * em / len(rows), 100.0 * f1 / len(rows)
    return {"exact_match": em, "f1": f1, "f1_em": (em + f1) / 2}


# ----------------------------------------------------------------------------- E2E


def group_by_meaning_representation(
    rows: Sequence[dict[str, Any]],
) -> list[tuple[list[str], list[str]]]:
    """(distinct predictions, pooled references) for each meaning representation (MR).

    An E2E test MR has several references, and a predictions file may hold one row per
    (MR, reference) pair, each with one reference. Rows are grouped by `mr`, else
    `meaning_representation`, else `id`; each group's references are pooled (in order,
    without duplicates). Identical predictions of one group count once, so a group is one
    hypothesis, as in the official E2E scoring, unless its rows' predictions differ.
    """
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for index, row in enumerate(rows):
        field = next((f for f in _GROUP_FIELDS if f in row), None)
        if field is None:
            raise InputError(
                f"{_row_name(index, row)}: missing field 'id' (e2e groups references by"
                " 'mr', 'meaning_representation' or 'id')"
            )
        predictions, references = groups.setdefault(str(row[field]), ([], []))
        if row["prediction"] not in predictions:
            predictions.append(row["prediction"])
        for reference in row["references"]:
            if reference not in references:
                references.append(reference)
    return list(groups.values())


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu corpus BLEU (0-100, default 13a tokenisation); hypotheses may differ in
    their number of references."""
    depth = max(len(refs) for refs in references)
    # sacrebleu takes one stream per reference position; None marks a missing reference.
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(depth)]
    return BLEU().corpus_score(list(hypotheses), streams).score


def rouge_l(hypothesis: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure (0-100) of one hypothesis, max over its references."""
    return 100.0 * _ROUGE.score_multi(list(references), hypothesis)["rougeL"].fmeasure


def wordnet_unavailable_reason() -> str | None:
    """None when nltk can load WordNet, else a one-line message saying how to install it.

    Searches $NLTK_DATA and <repo>/.venv/nltk_data, where scripts/install_wordnet.sh puts it.
    """
    search = [d for d in os.environ.get("NLTK_DATA", "").split(os.pathsep) if d]
    search.append(str(REPO_ROOT / ".venv" / "nltk_data"))
    for directory in search:
        if directory not in nltk.data.path:
            nltk.data.path.append(directory)
    try:
        # find() first: once loaded, the reader would not notice the data going missing.
        nltk.data.find("corpora/wordnet")
        nltk.corpus.wordnet.ensure_loaded()
    except (LookupError, OSError) as exc:
        # nltk's message is a boxed banner; keep its first line that says something.
        lines = [ln.strip() for ln in str(exc).splitlines()]
        first_line = next((ln for ln in lines if any(c.isalnum() for c in ln)), type(exc).__name__)
        return f"WordNet not found by nltk ({first_line}); {WORDNET_FIX}"
    return None


def meteor(hypothesis: str, references: Sequence[str]) -> float:
    """nltk METEOR (0-100) of one hypothesis against its references (needs WordNet).

    Tokenised with the Treebank tokenizer, which needs no data (word_tokenize needs punkt).
    """
    refs = [_TREEBANK.tokenize(r) for r in references]
    return 100.0 * meteor_score(refs, _TREEBANK.tokenize(hypothesis))


def generation_scores(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """BLEU, ROUGE-L and METEOR for E2E; METEOR is None (with the reason) without WordNet."""
    groups = group_by_meaning_representation(rows)
    # Every distinct prediction of an MR is one hypothesis, scored against all its references.
    pairs = [(hyp, refs) for predictions, refs in groups for hyp in predictions]
    hypotheses = [hyp for hyp, _ in pairs]
    references = [refs for _, refs in pairs]
    result: dict[str, Any] = {
        "n_mr": len(groups),
        "n_hypotheses": len(pairs),
        "bleu": corpus_bleu(hypotheses, references),
        "rouge_l": sum(rouge_l(h, r) for h, r in pairs) / len(pairs),
    }
    reason = wordnet_unavailable_reason()
    if reason is None:
        result["meteor"] = sum(meteor(h, r) for h, r in pairs) / len(pairs)
    else:
        # Never 0: a missing data file must not look like a terrible model.
        result["meteor"] = None
        result["meteor_unavailable"] = reason
    return result


def instruction_scores(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean ROUGE-L F (0-100) of each response against its reference output (Alpaca)."""
    return {"rouge_l": sum(rouge_l(r["prediction"], r["references"]) for r in rows) / len(rows)}


# ----------------------------------------------------------------------------- entry points


def compute_metrics(task: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Score `rows` ({id, prediction, references: [str, ...]}) with `task`'s metrics.

    Raises ValueError (InputError) for an unknown task or a row without a usable
    `prediction` or `references`, naming the row.
    """
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    _check_rows(rows)
    result: dict[str, Any] = {"task": task, "n": len(rows)}
    if task in LABELS:
        result.update(accuracy(task, rows))
    elif task in SPAN_TASKS:
        result.update(span_scores(rows))
    elif task in GENERATION_TASKS:
        result.update(generation_scores(rows))
    else:
        result.update(instruction_scores(rows))
    return result


def iter_jsonl(path: Path, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; InputError names the file and bad line."""
    if not path.is_file():
        raise InputError(f"{what} file not found: {path}")
    text = read_utf8(path)
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028 and other separators.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} line {number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise InputError(
                f"{path} line {number}: expected a JSON object, got {type(row).__name__}"
            )
        yield number, row


def read_jsonl(path: Path, what: str = "predictions") -> list[dict[str, Any]]:
    """The objects of a JSONL file (blank lines skipped); InputError names the bad line."""
    return [row for _, row in iter_jsonl(path, what)]


def main(argv: Sequence[str] | None = None) -> int:
    """Re-score a predictions file and print the metrics as JSON (optionally write them)."""
    parser = ArgumentParser(prog="python -m eval.metrics", description=__doc__.split("\n")[0])
    parser.add_argument("--task", required=True, help=f"one of: {', '.join(TASKS)}")
    parser.add_argument(
        "--predictions",
        required=True,
        type=Path,
        help="JSONL, one object per example: id, prediction, references (list of str)",
    )
    parser.add_argument("--output", type=Path, help="also write the metrics JSON here")
    args = parser.parse_args(argv)
    if args.task not in TASKS:  # checked before reading a possibly large file
        raise InputError(f"unknown task {args.task!r}; known tasks: {', '.join(TASKS)}")
    if args.output is not None:
        check_output_file(args.output, "--output")
    rows = read_jsonl(args.predictions)
    try:
        metrics = compute_metrics(args.task, rows)
    except InputError as exc:
        raise InputError(f"{args.predictions}: {exc}") from exc
    print(json.dumps(metrics, indent=2))
    if args.output is not None:
        atomic_write_json(args.output, metrics)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
