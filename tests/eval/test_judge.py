"""eval.judge against a real local OpenAI-compatible server (stdlib http.server on 127.0.0.1).

The fake judge (the `server` fixture, in conftest.py) prefers answers containing "GOOD" (9 vs 4)
and adds one point to whichever answer it is shown first, so the pairwise numbers below show the
position bias cancelling.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from alora_ds.errors import run_cli
from eval import judge
from eval.judge import (
    Answer,
    JudgeCache,
    JudgeClient,
    Question,
    RetryPolicy,
    judge_pairwise,
    judge_single,
    load_answers,
    load_judge_prompts,
    load_questions,
    parse_pair_scores,
    parse_rating,
    resolve_api_key,
    rouge_l_against_references,
)
from eval.metrics import rouge_l
from tests.helpers import SECRET, FakeJudge

FAST_RETRY = RetryPolicy(max_retries=3, base_delay_s=0.01, max_delay_s=0.05)


QUESTIONS = [
    Question(81, "writing", ("Write a poem.", "Make it shorter.")),
    Question(111, "math", ("What is 2+2?", "And 3+3?")),
]
REFERENCES = {111: Answer(111, "gpt-4", ("REF-4", "REF-6"))}


def answers(model: str, text: str) -> dict[int, Answer]:
    return {
        q.question_id: Answer(q.question_id, model, (text + " 1", text + " 2")) for q in QUESTIONS
    }


SYSTEMS = {"alora": answers("alora", "GOOD answer"), "sora": answers("sora", "meh answer")}


def make_client(url: str, cache: Path | None, **kwargs: Any) -> JudgeClient:
    kwargs.setdefault("retry", FAST_RETRY)
    return JudgeClient("fake-judge", url, cache=JudgeCache(cache), **kwargs)


def assert_secret_absent(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


# ----------------------------------------------------------------------------- data files


def test_package_questions_are_mt_bench() -> None:
    questions = load_questions()
    assert len(questions) == 80
    assert [q.question_id for q in questions] == list(range(81, 161))
    categories = {q.category for q in questions}
    assert len(categories) == 8
    assert all(sum(q.category == c for q in questions) == 10 for c in categories)
    assert all(len(q.turns) == 2 for q in questions)
    assert {"single-v1", "single-math-v1-multi-turn"} <= set(load_judge_prompts())


def test_load_questions_rejects_other_formats(tmp_path: Path) -> None:
    not_questions = tmp_path / "answers.jsonl"
    not_questions.write_text('{"question_id": 81, "model_id": "m", "choices": []}\n')
    with pytest.raises(
        ValueError, match=r"answers\.jsonl line 1: not an MT-Bench question \(missing 'category'\)"
    ):
        load_questions(not_questions)
    bad_turns = tmp_path / "q.jsonl"
    bad_turns.write_text('{"question_id": 81, "category": "writing", "turns": "hi"}\n')
    with pytest.raises(ValueError, match=r"q\.jsonl line 1: .*'turns' must be a non-empty list"):
        load_questions(bad_turns)
    with pytest.raises(ValueError, match=r"questions file not found: .*missing\.jsonl"):
        load_questions(tmp_path / "missing.jsonl")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question_id": 81, "category": "w", "turns": ["a"]}\n{"question_id"\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl line 2: not valid JSON"):
        load_questions(broken)


def test_load_answers_rejects_missing_turns(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"question_id": 81, "model_id": "m", "choices": [{"index": 0}]}\n')
    with pytest.raises(ValueError, match=r"a\.jsonl line 1: .*missing 'choices\[0\]\.turns'"):
        load_answers(path)


def test_parsers() -> None:
    assert parse_pair_scores("format [[A: 1, B: 1]] ... verdict [[A: 8, B: 6.5]]") == (8.0, 6.5)
    assert parse_pair_scores("[[a=7,b=3]]") == (7.0, 3.0)
    assert parse_pair_scores("[[A: 11, B: 3]]") is None
    assert parse_pair_scores("A is better") is None
    assert parse_rating("Rating: [[8.5]]") == 8.5
    assert parse_rating("Rating: [7]") == 7.0  # FastChat's fallback pattern
    assert parse_rating("Rating: [[0]]") is None
    assert parse_rating("Rating: 7") is None


def test_api_key_rules(monkeypatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert resolve_api_key("http://127.0.0.1:9/v1") != ""
    assert resolve_api_key("http://localhost:9/v1") != ""
    with pytest.raises(ValueError, match=r"OPENAI_API_KEY is not set \(needed for judge API"):
        resolve_api_key("https://api.openai.com/v1")
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    assert resolve_api_key("https://api.openai.com/v1") == SECRET


# ----------------------------------------------------------------------------- pairwise


def test_pairwise_averages_both_orders_and_cache_prevents_repaying(
    server: tuple[FakeJudge, str], tmp_path: Path
) -> None:
    fake, url = server
    cache = tmp_path / "cache.jsonl"
    verdicts, summary = judge_pairwise(make_client(url, cache), QUESTIONS, SYSTEMS, parallel=4)
    assert len(fake.requests) == 8  # 2 questions x 2 turns x 2 orders
    assert {r["auth"] for r in fake.requests} == {f"Bearer {SECRET}"}
    assert {tuple(v["systems"]) for v in verdicts} == {("alora", "sora"), ("sora", "alora")}
    # GOOD scores 10 as A and 9 as B; the other 5 as A and 4 as B: the means cancel the bias.
    assert summary["mean_score"] == {"alora": 9.5, "sora": 4.5}
    assert summary["per_category"] == {
        "math": {"alora": 9.5, "sora": 4.5},
        "writing": {"alora": 9.5, "sora": 4.5},
    }
    assert summary["wins_ties_losses"] == {"alora vs sora": {"wins": 4, "ties": 0, "losses": 0}}
    assert summary["calls"] == {"total": 8, "ok": 8, "unparsed": 0, "error": 0, "cached": 0}
    turn_2 = next(v for v in verdicts if v["turn"] == 2)
    prompts = [r["body"]["messages"][1]["content"] for r in fake.requests]
    prompt_2 = next(p for p in prompts if "Assistant A's Conversation" in p)
    assert turn_2["prompt"] == "alora-pair-multi-turn"
    assert "Make it shorter." in prompt_2 and "GOOD answer 2" in prompt_2

    # A fresh client on the same cache file (a re-run): no request is paid for twice.
    again, summary_again = judge_pairwise(make_client(url, cache), QUESTIONS, SYSTEMS)
    assert len(fake.requests) == 8
    assert summary_again["calls"]["cached"] == 8
    assert summary_again["mean_score"] == summary["mean_score"]
    assert_secret_absent(tmp_path)


def test_pairwise_equal_answers_tie_despite_position_bias(server: tuple[FakeJudge, str]) -> None:
    _, url = server
    systems = {"a": answers("a", "meh"), "b": answers("b", "also meh")}
    _, summary = judge_pairwise(make_client(url, None), QUESTIONS, systems, turns=(1,))
    assert summary["mean_score"] == {"a": 4.5, "b": 4.5}
    assert summary["wins_ties_losses"] == {"a vs b": {"wins": 0, "ties": 2, "losses": 0}}


def test_pairwise_needs_two_systems_with_all_answers() -> None:
    with pytest.raises(ValueError, match=r"pairwise judging takes exactly 2 systems, got 1"):
        judge.pairwise_jobs(QUESTIONS, {"a": SYSTEMS["alora"]})
    partial = {"a": SYSTEMS["alora"], "b": {81: SYSTEMS["sora"][81]}}
    with pytest.raises(ValueError, match=r"system 'b' has no answer to question\(s\) \[111\]"):
        judge.pairwise_jobs(QUESTIONS, partial)


# ----------------------------------------------------------------------------- retries, failures


def test_retries_after_429(server: tuple[FakeJudge, str]) -> None:
    fake, url = server
    fake.script = ["429", "429"]
    result = make_client(url, None).complete([{"role": "user", "content": "[[x]]"}])
    assert result.reply is not None and result.error is None
    assert result.attempts == 3
    assert len(fake.requests) == 3


def test_persistent_500_is_recorded_and_nothing_is_lost(
    server: tuple[FakeJudge, str], tmp_path: Path
) -> None:
    fake, url = server
    fake.default = "500"
    cache = tmp_path / "cache.jsonl"
    client = make_client(url, cache, retry=RetryPolicy(2, base_delay_s=0.01, max_delay_s=0.02))
    verdicts, summary = judge_pairwise(client, QUESTIONS, SYSTEMS, turns=(1,), parallel=2)
    assert len(fake.requests) == 4 * 3  # 4 calls, each tried 3 times
    assert {v["status"] for v in verdicts} == {"error"}
    assert all("InternalServerError" in v["error"] and v["scores"] is None for v in verdicts)
    assert summary["calls"]["error"] == 4 and summary["items"]["error"] == 2
    assert summary["mean_score"] == {"alora": None, "sora": None}
    assert not cache.exists()  # failures are not cached, so a re-run retries them

    fake.default = "good"
    _, summary = judge_pairwise(make_client(url, cache), QUESTIONS, SYSTEMS, turns=(1,))
    assert len(fake.requests) == 12 + 4
    assert summary["mean_score"] == {"alora": 9.5, "sora": 4.5}


def test_timeout_is_retried_then_recorded(server: tuple[FakeJudge, str]) -> None:
    fake, url = server
    fake.default = "slow"
    client = make_client(url, None, timeout_s=0.3, retry=RetryPolicy(1, 0.01, 0.01))
    result = client.complete([{"role": "user", "content": "hello"}])
    assert result.reply is None
    assert "Timeout" in (result.error or "")
    assert result.attempts == 2 and len(fake.requests) == 2


def test_unparsed_verdict_is_kept_not_scored(server: tuple[FakeJudge, str], tmp_path: Path) -> None:
    fake, url = server
    fake.default = "norating"
    cache = tmp_path / "cache.jsonl"
    systems = {"alora": SYSTEMS["alora"]}
    verdicts, summary = judge_single(
        make_client(url, cache), QUESTIONS, systems, references=REFERENCES, turns=(1,)
    )
    assert [v["status"] for v in verdicts] == ["unparsed", "unparsed"]
    assert all(v["judgment"] == "I have no opinion." and v["scores"] is None for v in verdicts)
    assert summary["calls"]["unparsed"] == 2 and summary["items"]["unparsed"] == 2
    assert summary["mean_score"] == {"alora": None}
    # The raw reply was paid for: a re-run reads it from the cache instead of asking again.
    judge_single(make_client(url, cache), QUESTIONS, systems, references=REFERENCES, turns=(1,))
    assert len(fake.requests) == 2


def test_pairwise_item_with_one_unparsed_order_is_not_scored(
    server: tuple[FakeJudge, str],
) -> None:
    fake, url = server
    fake.script = ["norating"]
    client = make_client(url, None)
    verdicts, summary = judge_pairwise(client, QUESTIONS[:1], SYSTEMS, turns=(1,), parallel=1)
    assert [v["status"] for v in verdicts] == ["unparsed", "ok"]
    # One order alone would bring the position bias back: the item gets no score.
    assert summary["items"] == {"ok": 0, "unparsed": 1, "error": 0}
    assert summary["mean_score"] == {"alora": None, "sora": None}
    assert summary["wins_ties_losses"]["alora vs sora"] == {"wins": 0, "ties": 0, "losses": 0}


def test_cache_survives_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "cache.jsonl"
    path.write_text('{"key": "k1", "model": "m", "reply": "r1"}\n{"key": "k2", "mo')
    cache = JudgeCache(path)
    assert cache.get("k1") == "r1" and cache.get("k2") is None
    cache.put("k3", "m", "r3")
    reloaded = JudgeCache(path)
    assert reloaded.get("k1") == "r1" and reloaded.get("k3") == "r3"


# ----------------------------------------------------------------------------- single grading


def test_single_grading_uses_fastchat_prompts_and_references(
    server: tuple[FakeJudge, str],
) -> None:
    fake, url = server
    verdicts, summary = judge_single(
        make_client(url, None), QUESTIONS, SYSTEMS, references=REFERENCES, parallel=4
    )
    assert len(fake.requests) == 8  # 2 systems x 2 questions x 2 turns
    prompts = load_judge_prompts()
    by_prompt = {v["prompt"] for v in verdicts}
    assert by_prompt == {
        "single-v1",
        "single-v1-multi-turn",
        "single-math-v1",
        "single-math-v1-multi-turn",
    }
    math_turn_2 = [
        r["body"]["messages"]
        for r in fake.requests
        if "REF-6" in r["body"]["messages"][1]["content"]
    ]
    assert len(math_turn_2) == 2
    assert math_turn_2[0][0]["content"] == prompts["single-math-v1-multi-turn"]["system_prompt"]
    assert summary["mean_score"] == {"alora": 8.0, "sora": 3.0}
    assert summary["per_turn"] == {
        "1": {"alora": 8.0, "sora": 3.0},
        "2": {"alora": 8.0, "sora": 3.0},
    }
    assert summary["wins_ties_losses"] == {"alora vs sora": {"wins": 4, "ties": 0, "losses": 0}}


def test_single_needs_references_for_math() -> None:
    with pytest.raises(ValueError, match=r"reference answers missing for .* question\(s\) \[111\]"):
        judge.single_jobs(QUESTIONS, SYSTEMS, load_judge_prompts(), {})


# ----------------------------------------------------------------------------- ROUGE-L, CLI


def test_rouge_l_against_reference_answers() -> None:
    refs = {111: Answer(111, "gpt-4", ("GOOD answer 1", "four six"))}
    result = rouge_l_against_references(QUESTIONS, SYSTEMS, refs)
    assert result["alora"]["n_scored"] == 2  # only question 111 has a reference
    expected = (100.0 + rouge_l("GOOD answer 2", ["four six"])) / 2
    assert result["alora"]["rouge_l"] == pytest.approx(expected)
    # "meh answer 1" vs "GOOD answer 1": LCS 2 of 3 tokens each -> F 2/3; turn 2 shares none.
    assert result["sora"]["per_category"] == {"math": pytest.approx(100 * 2 / 3 / 2)}


def write_answers(path: Path, model: str, text: str) -> Path:
    lines = [
        json.dumps({"question_id": q.question_id, "model_id": model,
                    "choices": [{"index": 0, "turns": [text, text]}]})
        for q in QUESTIONS
    ]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_pairwise_reports_failures_then_recovers(
    server: tuple[FakeJudge, str], tmp_path: Path, capsys
) -> None:
    fake, url = server
    questions = tmp_path / "question.jsonl"
    questions.write_text(
        "".join(
            json.dumps({"question_id": q.question_id, "category": q.category, "turns": q.turns})
            + "\n"
            for q in QUESTIONS
        )
    )
    argv = [
        "pairwise",
        "--answers", str(write_answers(tmp_path / "a.jsonl", "alora", "GOOD")),
        str(write_answers(tmp_path / "b.jsonl", "sora", "meh")),
        "--questions", str(questions),
        "--judge-model", "fake-judge", "--api-base", url,
        "--output-dir", str(tmp_path / "out"), "--max-retries", "0", "--turns", "1",
    ]  # fmt: skip
    fake.default = "500"
    assert run_cli(judge.main, argv) == 1
    out, err = capsys.readouterr()
    assert "4 judge call(s) failed" in err
    assert SECRET not in out + err
    fake.default = "good"
    assert run_cli(judge.main, argv) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(
        (tmp_path / "out" / "summary_pairwise.json").read_text()
    )
    summary = json.loads((tmp_path / "out" / "summary_pairwise.json").read_text())
    assert summary["mean_score"] == {"alora": 9.5, "sora": 4.5}
    lines = (tmp_path / "out" / "judgments_pairwise.jsonl").read_text().splitlines()
    assert len(lines) == 4 and len(fake.requests) == 8
    assert_secret_absent(tmp_path)

    bad = argv.copy()
    bad[bad.index("--questions") + 1] = str(tmp_path / "a.jsonl")
    assert run_cli(judge.main, bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not an MT-Bench question (missing 'category')" in err
