"""`python -m eval.score` end to end on the tiny trained setup (conftest.tiny_setup)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from transformers import LlamaConfig

from alora_ds.errors import run_cli
from alora_ds.io.tasks import TASKS, format_example, load_task_rows, sample_path
from eval import merge, metrics, score
from tests.helpers import REPO, TORCHRUN, TinySetup, free_port


def score_argv(setup: TinySetup, task: str, out: Path, *extra: str, adapter: bool = True) -> list:
    argv = ["--model_name_or_path", str(setup.base), "--task", task]
    argv += ["--data", str(sample_path(task, "test")), "--output_dir", str(out), *extra]
    return argv + (["--adapter", str(setup.adapter)] if adapter else [])


def run_score(argv: list[str]) -> tuple[list[dict], dict]:
    assert run_cli(score.main, argv) == 0
    out = Path(argv[argv.index("--output_dir") + 1])
    rows = metrics.read_jsonl(out / "predictions.jsonl")
    return rows, json.loads((out / "metrics.json").read_text())


def without_run(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "run"}


@pytest.fixture(scope="module")
def sst2_beam(tiny_setup: TinySetup, tmp_path_factory) -> tuple[Path, list[dict], dict]:
    out = tmp_path_factory.mktemp("sst2") / "beam"
    return out, *run_score(score_argv(tiny_setup, "sst2", out))


def test_sst2_beam_search_end_to_end(sst2_beam, capsys) -> None:
    out, rows, result = sst2_beam
    data = load_task_rows(sample_path("sst2", "test"))
    assert len(rows) == len(data) == 22
    # One row per data row, in file order, with the training prompt and the label name.
    for number, (row, raw) in enumerate(zip(rows, data, strict=True), start=1):
        prompt, label = format_example("sst2", raw)
        assert row["id"] == number and row["prompt"] == prompt
        assert row["references"] == [label]
        assert set(row) == {"id", "prompt", "prediction", "references", "finish"}
    # The adapter was trained for a few seconds on these prompts: it answers with a label, then EOS.
    assert all(r["prediction"] in ("positive", "negative") for r in rows), rows
    assert all(r["finish"] == "eos" for r in rows)
    assert result["accuracy"] > 50 and result["unparseable"] == 0
    assert result["counts"] == {
        "examples": 22,
        "distinct_prompts": 22,
        "truncated_prompts": 0,
        "stopped_at_eos": 22,
        "hit_max_new_tokens": 0,
    }
    assert result["decoding"] == {
        "mode": "beam",
        "num_beams": 5,
        "max_new_tokens": TASKS["sst2"].max_new_tokens,
        "temperature": None,
        "top_p": None,
        "seed": 42,
        "batch_size": 8,
        "max_seq_length": 512,
        "dtype": "float32",
    }
    assert result["run"]["processes"] == 1
    # Re-scoring the predictions file with eval.metrics gives the same numbers.
    assert (
        run_cli(metrics.main, ["--task", "sst2", "--predictions", str(out / "predictions.jsonl")])
        == 0
    )
    rescored = json.loads(capsys.readouterr().out)
    assert rescored == {k: result[k] for k in rescored}


def test_greedy_settings_max_examples_and_device_map(tiny_setup, tmp_path) -> None:
    argv = score_argv(tiny_setup, "sst2", tmp_path / "greedy", "--decoding", "greedy",
                      "--max_examples", "6", "--device_map", "auto", "--batch_size", "4")  # fmt: skip
    rows, result = run_score(argv)
    assert [r["id"] for r in rows] == [1, 2, 3, 4, 5, 6] and result["n"] == 6
    assert result["decoding"]["mode"] == "greedy" and result["decoding"]["num_beams"] == 1
    assert result["decoding"]["batch_size"] == 4
    assert result["run"]["device_map"] == "auto"


def test_squad_and_e2e(tiny_setup, tmp_path) -> None:
    rows, result = run_score(score_argv(tiny_setup, "squad", tmp_path / "squad"))
    assert result["decoding"]["max_new_tokens"] == TASKS["squad"].max_new_tokens == 32
    assert {"exact_match", "f1", "f1_em"} <= set(result) and result["n"] == 24
    assert rows[0]["references"] == ["about 21,000", "21,000"]  # every gold answer

    rows, result = run_score(
        score_argv(tiny_setup, "e2e", tmp_path / "e2e", "--max_new_tokens", "12")
    )
    assert result["decoding"]["max_new_tokens"] == 12
    # The 24 rows hold 10 meaning representations: each is generated once, and the rows of one
    # MR share its prediction and are scored against all its references (eval.metrics groups
    # them by the `mr` field).
    assert result["counts"]["distinct_prompts"] == 10 and result["n_mr"] == 10
    assert result["n_hypotheses"] == 10
    by_mr: dict[str, set[str]] = {}
    for row in rows:
        by_mr.setdefault(row["mr"], set()).add(row["prediction"])
    assert len(by_mr) == 10 and all(len(p) == 1 for p in by_mr.values())
    assert {"bleu", "rouge_l", "meteor"} <= set(result)


def test_two_processes_write_what_one_writes(tiny_setup, tmp_path) -> None:
    # Sampling makes the check strict: every batch must get the same seed and the same
    # prompts (hence the same padding) whichever process generates it.
    extra = ["--decoding", "sample", "--temperature", "3.0", "--batch_size", "4",
             "--max_new_tokens", "4"]  # fmt: skip
    two = tmp_path / "two"
    result = subprocess.run(
        [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "eval.score", *score_argv(tiny_setup, "sst2", two, *extra)],
        capture_output=True, text=True, cwd=REPO, timeout=240,
        env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "on 2 process(es)" in result.stdout
    assert "ex/s" in result.stderr  # rank 0's progress bar

    # In-process with one thread (conftest.one_torch_thread), like each launched process.
    rows, one = run_score(score_argv(tiny_setup, "sst2", tmp_path / "one", *extra))
    assert len({r["prediction"] for r in rows}) > 2  # sampling did sample
    assert (two / "predictions.jsonl").read_bytes() == (
        tmp_path / "one" / "predictions.jsonl"
    ).read_bytes()
    sharded = json.loads((two / "metrics.json").read_text())
    assert without_run(sharded) == without_run(one)
    assert sharded["run"]["processes"] == 2


def test_base_alone_and_merged_checkpoint(tiny_setup, sst2_beam, tmp_path) -> None:
    _, adapted, _ = sst2_beam
    base_rows, base_result = run_score(
        score_argv(tiny_setup, "sst2", tmp_path / "base", adapter=False)
    )
    assert base_result["run"]["adapter"] is None
    # The random base has not learnt the task: its answers are not the adapter's.
    assert [r["prediction"] for r in base_rows] != [r["prediction"] for r in adapted]
    assert base_result["unparseable"] > 0

    merged = tmp_path / "merged"
    assert run_cli(merge.main, ["--model_name_or_path", str(tiny_setup.base), "--adapter",
                                str(tiny_setup.adapter), "--output_dir", str(merged)]) == 0  # fmt: skip
    argv = score_argv(tiny_setup, "sst2", tmp_path / "merged_out", adapter=False)
    argv[argv.index("--model_name_or_path") + 1] = str(merged)
    merged_rows, _ = run_score(argv)
    # The adapter is merged the way eval.merge merges it: identical predictions.
    assert merged_rows == adapted


# ---- bad input: one line, exit 2, nothing written -------------------------------------------


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_bad_input(tiny_setup, tmp_path, capsys) -> None:
    other = tmp_path / "other_base"
    LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2).save_pretrained(other)  # fmt: skip
    no_label = write(tmp_path / "nolabel.jsonl", '{"sentence": "fine ."}\n')
    out = tmp_path / "out"

    def argv(task: str = "sst2", data: str | None = None, *extra: str) -> list[str]:
        args = score_argv(tiny_setup, "sst2", out, *extra)
        args[args.index("--task") + 1] = task
        if data is not None:
            args[args.index("--data") + 1] = data
        return args

    another_base = argv()
    another_base[another_base.index("--model_name_or_path") + 1] = str(other)
    no_adapter = argv()
    no_adapter[no_adapter.index("--adapter") + 1] = str(tmp_path / "nope")
    cases = [
        (another_base, r"adapter: module model\.layers\.\d\.\w+\.\w+ expects a \(\d+ x \d+\) weight but the adapter is \(\d+ x \d+\) \(is the adapter for another model\?\)"),
        (argv("mnli"), r"unknown task 'mnli'; known tasks: alpaca, boolq"),
        (argv("sst2", no_label), r"nolabel\.jsonl row 1: missing field 'label' required by task sst2"),
        (argv("sst2", str(sample_path("squad", "test"))), r"row 1: missing field 'sentence' required by task sst2"),
        (argv("sst2", str(tmp_path / "missing.jsonl")), r"data file .*missing\.jsonl does not exist"),
        (no_adapter, r"adapter directory .*nope does not exist"),
        (argv("sst2", None, "--decoding", "greedy", "--num_beams", "3"), r"--num_beams 3 needs --decoding beam"),
        (argv("sst2", None, "--temperature", "0.7"), r"--temperature applies to --decoding sample only"),
        (argv("e2e", None, "--max_new_tokens", "600"), r"--max_new_tokens 600 leaves no room for a prompt in --max_seq_length 512"),
    ]  # fmt: skip
    for args, pattern in cases:
        code = run_cli(score.main, args)
        err = capsys.readouterr().err.strip()
        assert code == 2, (args, err)
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert re.search(pattern, lines[0]), (pattern, lines[0])
        assert not out.exists()
