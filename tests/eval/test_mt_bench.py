"""`python -m eval.mt_bench generate` on the tiny setup, then eval.judge on its answers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from alora_ds.errors import run_cli
from alora_ds.io.tasks import format_example
from eval import judge, mt_bench
from eval.judge import load_answers, load_questions
from tests.helpers import FakeJudge, TinySetup

ANSWER_KEYS = {"question_id", "answer_id", "model_id", "choices", "tstamp"}


def write_questions(path: Path, count: int) -> Path:
    """The first `count` MT-Bench questions, as a question.jsonl of their own."""
    lines = [
        json.dumps({"question_id": q.question_id, "category": q.category, "turns": list(q.turns)})
        for q in load_questions()[:count]
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def generate_argv(setup: TinySetup, output: Path, model_id: str, *extra: str) -> list[str]:
    return ["generate", "--model_name_or_path", str(setup.base), "--model_id", model_id,
            "--output", str(output), "--max_new_tokens", "6", *extra]  # fmt: skip


class PromptRecorder:
    """Wraps eval.mt_bench.generate_batch and keeps the decoded text of every prompt."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.original = mt_bench.generate_batch
        self.calls: list[list[str]] = []

    def __call__(self, model, tokenizer, prompts, config, eos_ids):
        self.calls.append([self.tokenizer.decode(ids) for ids in prompts])
        return self.original(model, tokenizer, prompts, config, eos_ids)


@pytest.fixture(scope="module")
def answered(tiny_setup: TinySetup, tmp_path_factory):
    """Answers to 2 questions from the base alone ("base") and with the adapter ("alora"),
    with the prompts the base was given."""
    root = tmp_path_factory.mktemp("mt_bench")
    questions = write_questions(root / "question.jsonl", 2)
    recorder = PromptRecorder(AutoTokenizer.from_pretrained(tiny_setup.base))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mt_bench, "generate_batch", recorder)
        argv = generate_argv(tiny_setup, root / "base.jsonl", "base", "--questions", str(questions))
        assert run_cli(mt_bench.main, argv) == 0
    argv = generate_argv(tiny_setup, root / "alora.jsonl", "alora", "--questions", str(questions),
                         "--adapter", str(tiny_setup.adapter))  # fmt: skip
    assert run_cli(mt_bench.main, argv) == 0
    return root, questions, recorder.calls


def test_answers_are_in_fastchat_format(answered) -> None:
    root, _, _ = answered
    for model_id in ("base", "alora"):
        records = [
            json.loads(line) for line in (root / f"{model_id}.jsonl").read_text().splitlines()
        ]
        assert [r["question_id"] for r in records] == [81, 82]
        for record in records:
            assert set(record) == ANSWER_KEYS and record["model_id"] == model_id
            assert isinstance(record["answer_id"], str) and isinstance(record["tstamp"], float)
            [choice] = record["choices"]
            assert choice["index"] == 0 and len(choice["turns"]) == 2
            assert all(isinstance(t, str) for t in choice["turns"])
        assert len(load_answers(root / f"{model_id}.jsonl")) == 2  # what eval.judge reads


def test_turn_two_sees_turn_one_answer(answered, tiny_setup) -> None:
    root, _, calls = answered
    turn_1, turn_2 = calls  # one batch of 2 questions: one generate call per turn
    tokenizer = AutoTokenizer.from_pretrained(tiny_setup.base)
    records = [json.loads(line) for line in (root / "base.jsonl").read_text().splitlines()]
    for i, (question, record) in enumerate(zip(load_questions()[:2], records, strict=True)):
        first_answer = record["choices"][0]["turns"][0]
        assert first_answer  # the random base always says something
        # The tiny tokenizer's chat template: "<s>user: ...\n" then "assistant: ...</s>\n".
        assert turn_1[i] == mt_bench.render_prompt(tokenizer, "chat", question.turns, [])
        assert turn_2[i] == mt_bench.render_prompt(
            tokenizer, "chat", question.turns, [first_answer]
        )
        assert f"assistant: {first_answer}</s>\nuser: {question.turns[1]}\n" in turn_2[i]


def test_resume_skips_answered_questions(answered, tiny_setup, tmp_path, monkeypatch) -> None:
    root, _, _ = answered
    output = tmp_path / "base.jsonl"
    output.write_text((root / "base.jsonl").read_text())
    before = output.read_text().splitlines()
    questions = write_questions(tmp_path / "question.jsonl", 4)
    recorder = PromptRecorder(AutoTokenizer.from_pretrained(tiny_setup.base))
    monkeypatch.setattr(mt_bench, "generate_batch", recorder)
    argv = generate_argv(tiny_setup, output, "base", "--questions", str(questions))
    # An interrupted earlier run left a torn last line: it is dropped, not trusted.
    with output.open("a") as handle:
        handle.write('{"question_id": 83, "model_id": "ba')
    assert run_cli(mt_bench.main, [*argv, "--max_questions", "3"]) == 0
    assert [len(c) for c in recorder.calls] == [1, 1]  # question 83 only, two turns
    lines = output.read_text().splitlines()
    assert lines[:2] == before and [json.loads(x)["question_id"] for x in lines] == [81, 82, 83]

    assert run_cli(mt_bench.main, argv) == 0  # 4 questions: only 84 is new
    assert [len(c) for c in recorder.calls] == [1, 1, 1, 1]
    assert [json.loads(x)["question_id"] for x in output.read_text().splitlines()] == [
        81,
        82,
        83,
        84,
    ]


def test_judge_the_two_systems_pairwise(answered, server: tuple[FakeJudge, str], capsys) -> None:
    root, questions, _ = answered
    fake, url = server
    argv = ["pairwise", "--answers", str(root / "alora.jsonl"), str(root / "base.jsonl"),
            "--questions", str(questions), "--judge-model", "fake-judge", "--api-base", url,
            "--output-dir", str(root / "judged")]  # fmt: skip
    assert run_cli(judge.main, argv) == 0
    summary = json.loads((root / "judged" / "summary_pairwise.json").read_text())
    assert summary["systems"] == ["alora", "base"]
    assert summary["calls"] == {"total": 8, "ok": 8, "unparsed": 0, "error": 0, "cached": 0}
    # Neither system writes "GOOD": equal scores once the position bonus has cancelled out.
    assert summary["mean_score"] == {"alora": 4.5, "base": 4.5}
    prompts = "\n".join(r["body"]["messages"][-1]["content"] for r in fake.requests)
    for record in load_answers(root / "base.jsonl").values():
        assert all(turn in prompts for turn in record.turns)
    capsys.readouterr()


def test_prompt_formats(tiny_setup) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_setup.base)
    turns = ("Name a colour.", "Another one?")
    assert mt_bench.resolve_prompt_format("auto", tokenizer) == "chat"
    assert mt_bench.render_prompt(tokenizer, "plain", turns, ["Red."]) == (
        "USER: Name a colour.\nASSISTANT: Red.</s>\nUSER: Another one?\nASSISTANT:"
    )
    alpaca_1 = mt_bench.render_prompt(tokenizer, "alpaca", turns, [])
    assert alpaca_1 == format_example("alpaca", {"instruction": turns[0], "output": "x"})[0]
    alpaca_2 = mt_bench.render_prompt(tokenizer, "alpaca", turns, ["Red."])
    assert alpaca_2 == alpaca_1 + "Red.\n\n### Instruction:\nAnother one?\n\n### Response:\n"
    assert mt_bench.cut_at_next_turn("Blue.\nUSER: and?", "plain") == "Blue."
    assert mt_bench.cut_at_next_turn("Blue.\nUSER: and?", "chat") == "Blue.\nUSER: and?"


# ---- bad input: one line, exit 2, nothing written -------------------------------------------


def test_bad_input(tiny_setup, answered, tmp_path, capsys) -> None:
    root, questions, _ = answered
    not_questions = str(root / "base.jsonl")  # an answers file, not questions
    output = tmp_path / "answers.jsonl"
    other_model = tmp_path / "other.jsonl"
    other_model.write_text((root / "alora.jsonl").read_text())
    cases = [
        (generate_argv(tiny_setup, output, "m", "--questions", not_questions),
         r"base\.jsonl line 1: not an MT-Bench question \(missing 'category'\)", output),
        (generate_argv(tiny_setup, output, "m", "--questions", str(tmp_path / "none.jsonl")),
         r"questions file not found: .*none\.jsonl", output),
        (generate_argv(tiny_setup, other_model, "base", "--questions", str(questions)),
         r"other\.jsonl line 1: an answer of model_id 'alora', not 'base'", None),
        (generate_argv(tiny_setup, output, "m", "--adapter", str(tmp_path / "nope")),
         r"adapter directory .*nope does not exist", output),
        (generate_argv(tiny_setup, output, "m", "--max_new_tokens", "4096"),
         r"--max_new_tokens 4096 leaves no room for a prompt in --max_seq_length 2048", output),
    ]  # fmt: skip
    for argv, pattern, must_not_exist in cases:
        before = other_model.read_text()
        code = run_cli(mt_bench.main, argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, (argv, err)
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert re.search(pattern, lines[0]), (pattern, lines[0])
        assert must_not_exist is None or not must_not_exist.exists()
        assert other_model.read_text() == before
