"""eval.metrics: hand-computed cases and the libraries' own documented examples."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nltk
import pytest
from nltk.translate.meteor_score import meteor_score
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

from alora_ds.errors import run_cli
from eval import metrics
from eval.metrics import (
    LABELS,
    compute_metrics,
    exact_match_score,
    f1_score,
    main,
    normalize_answer,
    parse_label,
)
from tests.helpers import unavailable

REPO_ROOT = Path(__file__).resolve().parents[2]

# sacrebleu's README example: three hypotheses, two reference streams; documented BLEU 48.53.
SACREBLEU_HYPS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
SACREBLEU_REFS = [
    ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
    ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
]
# nltk's meteor_score docstring example: documented score 0.6944.
NLTK_HYP = (
    "It is a guide to action which ensures that the military always obeys the commands of the party"
)
NLTK_REF = "It is a guide to action that ensures that the military will forever heed Party commands"


def rows_for(predictions: list[str], references: list[list[str]]) -> list[dict]:
    return [
        {"id": i, "prediction": p, "references": r}
        for i, (p, r) in enumerate(zip(predictions, references, strict=True))
    ]


# ----------------------------------------------------------------------------- classification


@pytest.mark.parametrize(
    ("task", "text", "label"),
    [
        ("sst2", "positive", "positive"),
        ("sst2", "Positive.", "positive"),
        ("sst2", ' "Negative" \n', "negative"),
        ("rte", "not_entailment", "not_entailment"),
        ("rte", "Not entailment.", "not_entailment"),
        ("qnli", "Entailment!", "entailment"),
        ("boolq", "Yes.", "yes"),
        ("copa", "2", "2"),
        ("copa", "'1'.", "1"),
        ("copa", "3", None),
        ("boolq", "positive", None),
        ("sst2", "positive sentiment", None),
        ("sst2", "", None),
    ],
)
def test_parse_label(task: str, text: str, label: str | None) -> None:
    assert parse_label(task, text) == label


def test_label_sets() -> None:
    assert LABELS == {
        "sst2": ("positive", "negative"),
        "rte": ("entailment", "not_entailment"),
        "qnli": ("entailment", "not_entailment"),
        "boolq": ("yes", "no"),
        "copa": ("1", "2"),
    }


def test_accuracy_counts_unparseable_as_wrong() -> None:
    rows = rows_for(
        ["Positive.", "negative", "neutral", "I think positive"],
        [["positive"], ["positive"], ["negative"], ["positive"]],
    )
    result = compute_metrics("sst2", rows)
    assert result == {"task": "sst2", "n": 4, "accuracy": 25.0, "correct": 1, "unparseable": 2}


def test_accuracy_rejects_a_gold_that_is_not_a_label() -> None:
    rows = rows_for(["1"], [["cause"]])
    with pytest.raises(ValueError, match=r"row 0 \(id 0\): field 'references' holds 'cause'"):
        compute_metrics("copa", rows)


# ----------------------------------------------------------------------------- SQuAD / ReCoRD


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("an apple, a pear and THE plum.", "apple pear and plum"),
        ("theater another answer", "theater another answer"),  # articles only as whole words
        ("  Hello,   world!! ", "hello world"),
        ("Cat's", "cats"),  # punctuation is dropped, not turned into a space
        ("The", ""),
    ],
)
def test_normalize_answer(text: str, normalized: str) -> None:
    assert normalize_answer(text) == normalized


def test_exact_match_and_f1_by_hand() -> None:
    assert exact_match_score("The Cat.", "cat") == 1.0
    assert exact_match_score("the cat sat", "a cat sat down") == 0.0
    # tokens [cat, sat] vs [cat, sat, down]: precision 1, recall 2/3 -> F1 0.8
    assert f1_score("the cat sat", "a cat sat down") == pytest.approx(0.8)
    # [big, red, dog, red] vs [red, dog]: overlap 2 (red once, dog) -> P 1/2, R 1 -> 2/3
    assert f1_score("big red dog red", "red dog") == pytest.approx(2 / 3)
    assert f1_score("nothing", "else") == 0.0
    # Official v1.1 quirk: two answers that normalise to "" match exactly but score F1 0.
    assert exact_match_score("a", "the") == 1.0
    assert f1_score("a", "the") == 0.0


def test_span_scores_take_the_best_gold() -> None:
    rows = rows_for(
        ["Denver Broncos", "in the year 1990", "Paris"],
        [["Broncos", "the Denver Broncos"], ["1990", "1991"], ["London"]],
    )
    result = compute_metrics("squad", rows)
    # row 0: EM 1 via gold 2; row 1: EM 0, F1 vs "1990": P 1/3 R 1 -> 0.5; row 2: 0.
    assert result["exact_match"] == pytest.approx(100 / 3)
    assert result["f1"] == pytest.approx(100 * 1.5 / 3)
    assert result["f1_em"] == pytest.approx((100 / 3 + 50) / 2)
    assert compute_metrics("record", rows)["f1_em"] == result["f1_em"]


# ----------------------------------------------------------------------------- E2E


def test_bleu_matches_sacrebleu_documented_example() -> None:
    references = [list(refs) for refs in zip(*SACREBLEU_REFS, strict=True)]
    rows = rows_for(SACREBLEU_HYPS, references)
    result = compute_metrics("e2e", rows)
    direct = BLEU().corpus_score(SACREBLEU_HYPS, SACREBLEU_REFS).score
    assert result["bleu"] == pytest.approx(direct)
    assert round(result["bleu"], 2) == 48.53
    assert (result["n_mr"], result["n_hypotheses"]) == (3, 3)


def test_e2e_groups_references_by_meaning_representation() -> None:
    # One row per (MR, reference), as a dataset with one reference per example gives them.
    rows = []
    for mr, hyp, refs in zip("abc", SACREBLEU_HYPS, zip(*SACREBLEU_REFS, strict=True), strict=True):
        rows += [{"id": mr, "prediction": hyp, "references": [ref]} for ref in refs]
    result = compute_metrics("e2e", rows)
    assert (result["n"], result["n_mr"], result["n_hypotheses"]) == (6, 3, 3)
    assert round(result["bleu"], 2) == 48.53
    # An MR field wins over the id, and MRs may have different numbers of references.
    uneven = [
        {
            "id": 1,
            "mr": "x",
            "prediction": SACREBLEU_HYPS[0],
            "references": ["The dog bit the man."],
        },
        {"id": 2, "mr": "x", "prediction": SACREBLEU_HYPS[0], "references": ["A dog bit a man."]},
        {
            "id": 3,
            "mr": "y",
            "prediction": SACREBLEU_HYPS[1],
            "references": ["No one was surprised."],
        },
    ]
    direct = BLEU().corpus_score(
        SACREBLEU_HYPS[:2],
        [["The dog bit the man.", "No one was surprised."], ["A dog bit a man.", None]],
    )
    assert compute_metrics("e2e", uneven)["bleu"] == pytest.approx(direct.score)


def test_rouge_l_matches_hand_count_and_library() -> None:
    # rouge-score's README example. LCS "the quick brown jumps the" = 5 tokens of 9 (target)
    # and 8 (prediction): F = 2 * 5 / (9 + 8).
    target = "The quick brown fox jumps over the lazy dog"
    prediction = "The quick brown dog jumps on the log."
    assert metrics.rouge_l(prediction, [target]) == pytest.approx(100 * 10 / 17)
    library = rouge_scorer.RougeScorer(["rougeL"]).score(target, prediction)["rougeL"].fmeasure
    assert metrics.rouge_l(prediction, [target]) == pytest.approx(100 * library)
    # Max over references; the e2e entry point averages over hypotheses.
    assert metrics.rouge_l(prediction, ["unrelated words", target]) == pytest.approx(100 * 10 / 17)
    rows = rows_for([prediction, "zzz"], [[target], [target]])
    assert compute_metrics("e2e", rows)["rouge_l"] == pytest.approx(100 * 10 / 17 / 2)


def test_meteor_real_value_or_unavailable() -> None:
    reason = metrics.wordnet_unavailable_reason()
    result = compute_metrics("e2e", rows_for([NLTK_HYP], [[NLTK_REF]]))
    if reason is None:
        assert round(result["meteor"], 2) == 69.44  # nltk's documented 0.6944
        direct = meteor_score([NLTK_REF.split()], NLTK_HYP.split())
        assert result["meteor"] == pytest.approx(100 * direct)
        assert "meteor_unavailable" not in result
    else:  # null, never 0; and the real value is not checked here: say so
        assert result["meteor"] is None
        assert "scripts/install_wordnet.sh" in result["meteor_unavailable"]
        unavailable(f"METEOR's real value not checked: {reason}")


def test_meteor_is_null_not_zero_without_wordnet(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.setenv("NLTK_DATA", str(tmp_path))
    monkeypatch.setattr(metrics, "REPO_ROOT", tmp_path)
    result = compute_metrics("e2e", rows_for([NLTK_HYP], [[NLTK_REF]]))
    assert result["meteor"] is None
    assert "WordNet not found" in result["meteor_unavailable"]
    assert "bash scripts/install_wordnet.sh" in result["meteor_unavailable"]
    assert result["bleu"] > 0


def test_install_script_writes_the_45_lexnames() -> None:
    lexnames = REPO_ROOT / ".venv" / "nltk_data" / "corpora" / "wordnet" / "lexnames"
    if not lexnames.is_file():
        unavailable("WordNet not installed here (bash scripts/install_wordnet.sh)")
    lines = [line.split("\t") for line in lexnames.read_text().splitlines()]
    assert len(lines) == 45
    assert lines[0] == ["00", "adj.all", "3"]
    assert lines[3] == ["03", "noun.Tops", "1"]
    assert lines[44] == ["44", "adj.ppl", "3"]


# ----------------------------------------------------------------------------- validation


def test_unknown_task_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown task 'mnli'; known tasks: sst2, rte, .*e2e"):
        compute_metrics("mnli", rows_for(["x"], [["x"]]))


def test_row_without_references_is_named() -> None:
    rows = [{"id": "a", "prediction": "x", "references": ["x"]}, {"id": "b", "prediction": "y"}]
    with pytest.raises(ValueError, match=r"row 1 \(id 'b'\): missing field 'references'"):
        compute_metrics("squad", rows)
    with pytest.raises(ValueError, match=r"row 0: missing field 'prediction'"):
        compute_metrics("squad", [{"references": ["x"]}])
    with pytest.raises(ValueError, match=r"field 'references' must be a non-empty list"):
        compute_metrics("squad", [{"id": 1, "prediction": "x", "references": "x"}])
    with pytest.raises(ValueError, match=r"no rows to score"):
        compute_metrics("squad", [])
    with pytest.raises(ValueError, match=r"row 0: missing field 'id' \(e2e groups"):
        compute_metrics("e2e", [{"prediction": "x", "references": ["x"]}])


# ----------------------------------------------------------------------------- CLI


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_cli_missing_file_subprocess(tmp_path: Path) -> None:
    output = tmp_path / "metrics.json"
    proc = subprocess.run(
        [sys.executable, "-m", "eval.metrics", "--task", "squad",
         "--predictions", str(tmp_path / "nope.jsonl"), "--output", str(output)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: predictions file not found: {tmp_path / 'nope.jsonl'}"
    ]
    assert not output.exists()


@pytest.mark.parametrize(
    ("task", "lines", "message"),
    [
        ("squad", ['{"id": 1, "prediction": "x", "references": ["x"]}', "{oops"],
         r"line 2: not valid JSON"),
        ("squad", ["[1, 2]"], r"line 1: expected a JSON object, got list"),
        ("squad", ['{"id": 7, "prediction": "x"}'], r"row 0 \(id 7\): missing field 'references'"),
        ("glue", ['{"id": 1, "prediction": "x", "references": ["x"]}'], r"unknown task 'glue'"),
    ],
)  # fmt: skip
def test_cli_bad_input(tmp_path: Path, capsys, task: str, lines: list[str], message: str) -> None:
    predictions = write_jsonl(tmp_path / "predictions.jsonl", lines)
    output = tmp_path / "metrics.json"
    argv = ["--task", task, "--predictions", str(predictions), "--output", str(output)]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("error: ")
    with pytest.raises(ValueError, match=message):
        main(argv)
    assert not output.exists()


def test_cli_writes_metrics(tmp_path: Path, capsys) -> None:
    predictions = write_jsonl(
        tmp_path / "predictions.jsonl",
        ['{"id": 1, "prediction": "Yes.", "references": ["yes"]}', "",
         '{"id": 2, "prediction": "maybe", "references": ["no"]}'],
    )  # fmt: skip
    output = tmp_path / "out" / "metrics.json"
    argv = ["--task", "boolq", "--predictions", str(predictions), "--output", str(output)]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(output.read_text())
    assert printed == {"task": "boolq", "n": 2, "accuracy": 50.0, "correct": 1, "unparseable": 1}
    assert [p.name for p in output.parent.iterdir()] == ["metrics.json"]  # no temp file left


def test_cli_rejects_a_binary_file(tmp_path: Path) -> None:
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_bytes(b'{"id": 1}\n\xff\xfe\n')
    with pytest.raises(
        ValueError, match=r"predictions\.jsonl line 2: not UTF-8 text \(byte 0xff at column 1\)"
    ):
        main(["--task", "squad", "--predictions", str(predictions)])
