"""The evaluation commands as a new user meets them: the smollm2 alias in every one that names a
base model, results that say what they mean (unparseable predictions, Alpaca's rough ROUGE-L and
how to judge it, a null ROUGE-L and why), and a hub that cannot be reached."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

import eval.harness as harness
from alora_ds.errors import run_cli
from alora_ds.io import pretrained
from alora_ds.io.tasks import sample_path
from eval import judge, merge, mt_bench, score


@pytest.fixture
def smollm2_cache(tiny_setup, tmp_path, monkeypatch) -> Path:
    """A cache where `smollm2` was converted before (the tiny base stands in for the 135M model,
    whose conversion takes tens of seconds: tests/io/test_pretrained.py runs that one)."""
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path / "cache"))
    converted = tmp_path / "cache" / pretrained.SMOLLM2_DIR_NAME
    shutil.copytree(tiny_setup.base, converted)
    assert pretrained.is_checkpoint(converted)
    return converted


def run(main, argv, capsys) -> tuple[str, str]:
    capsys.readouterr()
    code = run_cli(main, argv)
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    return out, err


def test_eval_score_takes_the_alias_and_says_when_no_prediction_was_a_label(
    smollm2_cache, tmp_path, capsys
):
    out_dir = tmp_path / "base_sst2"
    out, _ = run(score.main, [
        "--model_name_or_path", "smollm2", "--task", "sst2", "--data",
        str(sample_path("sst2", "test")), "--output_dir", str(out_dir), "--decoding", "greedy",
        "--max_examples", "4",
    ], capsys)  # fmt: skip
    result = json.loads((out_dir / "metrics.json").read_text())
    assert result["run"]["model_name_or_path"] == str(smollm2_cache)
    # The random base answers no label: an accuracy of 0 that the output explains.
    assert result["unparseable"] == 4 and result["accuracy"] == 0.0
    assert out.splitlines()[1] == (
        "note: all 4 predictions were none of the labels (positive, negative) and count as "
        "wrong; read them in predictions.jsonl (a model that was not trained on the task, or "
        "--max_new_tokens too small)"
    )
    assert f"wrote {out_dir / 'predictions.jsonl'} and metrics.json" in out.splitlines()[0]


def test_eval_score_on_alpaca_says_what_it_wrote_and_how_to_judge(tiny_setup, tmp_path, capsys):
    out_dir = tmp_path / "alpaca"
    out, _ = run(score.main, [
        "--model_name_or_path", str(tiny_setup.base), "--adapter", str(tiny_setup.adapter),
        "--task", "alpaca", "--data", str(sample_path("alpaca", "test")), "--output_dir",
        str(out_dir), "--decoding", "greedy", "--max_new_tokens", "4", "--max_examples", "2",
    ], capsys)  # fmt: skip
    result = json.loads((out_dir / "metrics.json").read_text())
    assert result["task"] == "alpaca" and 0 <= result["rouge_l"] <= 100
    rows = [json.loads(line) for line in (out_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["references"] for r in rows)
    first, note = out.splitlines()
    assert first.startswith("alpaca: 2 examples") and "rouge_l" in first
    assert note.startswith("note: rouge_l is each response's overlap with its row's output")
    assert "python -m eval.mt_bench generate" in note and "python -m eval.judge rouge" in note


def test_merge_mt_bench_and_harness_take_the_alias(smollm2_cache, tiny_setup, tmp_path, capsys):
    merged = tmp_path / "merged"
    out, _ = run(merge.main, ["--model_name_or_path", "smollm2", "--adapter",
                              str(tiny_setup.adapter), "--output_dir", str(merged)], capsys)  # fmt: skip
    assert out.startswith(f"wrote the merged checkpoint to {merged.resolve()}: {smollm2_cache} ")
    assert (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()

    answers = tmp_path / "answers.jsonl"
    run(mt_bench.main, ["generate", "--model_name_or_path", "smollm2", "--model_id", "tiny",
                        "--output", str(answers), "--max_questions", "1",
                        "--max_new_tokens", "2"], capsys)  # fmt: skip
    assert json.loads(answers.read_text().splitlines()[0])["model_id"] == "tiny"

    args = harness.build_parser().parse_args(
        ["--model_name_or_path", "smollm2", "--adapter", str(tiny_setup.adapter), "--tasks",
         "alora_sst2", "--output_dir", str(tmp_path / "harness")]
    )  # fmt: skip
    harness.check_inputs(args)  # what main does before it hands the model to the harness
    assert args.model_name_or_path == str(smollm2_cache)


def test_judge_rouge_says_why_it_is_null(tmp_path, capsys):
    # An answer to question 81 (writing): the shipped GPT-4 references cover math, reasoning and
    # coding only, so there is nothing to compare it with.
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"question_id": 81, "model_id": "mine",
                                   "choices": [{"turns": ["A poem.", "Another."]}]}) + "\n")  # fmt: skip
    out, err = run(judge.main, ["rouge", "--answers", str(answers)], capsys)
    result = json.loads(out)["mine"]
    assert result["rouge_l"] is None and result["n_scored"] == 0
    assert result["rouge_l_null_because"] == (
        "the references cover 30 questions (coding, math, reasoning: ids 101-130) and none of "
        "them was answered (answered: ids 81-81); answer those questions, or pass --references "
        "covering the ones answered"
    )
    assert err.strip() == f"note: mine: rouge_l is null: {result['rouge_l_null_because']}"


def test_eval_score_says_at_once_that_the_hub_is_out_of_reach(tmp_path, monkeypatch, capsys):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    argv = ["--model_name_or_path", "meta-llama/Llama-2-7b-hf", "--task", "sst2", "--data",
            str(sample_path("sst2", "test")), "--output_dir", str(tmp_path / "out")]  # fmt: skip
    assert run_cli(score.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        f"error: model 'meta-llama/Llama-2-7b-hf' is not a local directory and the Hugging Face "
        f"hub at {endpoint} cannot be reached"
    ), err
    assert "HF_HUB_OFFLINE=1" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
