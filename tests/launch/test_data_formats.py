"""The formats users bring (prompt / completion, chat messages) through `launch/train.py`, and the
card's literal `--ds_config zero3.json`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from alora_ds.errors import run_cli
from alora_ds.io.tasks import load_task_examples, sample_path
from launch import train
from tests.helpers import REPO, read_metrics, run_train

# A short run of the default method (ALoRA, one round) on one process: the rows reach training,
# the dev loss and a scoring round.
SHORT_RUN = [
    "--rank_budget", "28", "--lora_alpha", "4", "--learning_rate", "3e-3",
    "--per_device_train_batch_size", "4", "--max_steps", "12", "--initial_steps", "6",
    "--round_steps", "3", "--num_rounds", "1", "--prune_per_round", "4", "--val_examples", "8",
    "--eval_steps", "3", "--logging_steps", "1", "--report_to", "none", "--progress_bar", "false",
]  # fmt: skip


def sst2_pairs(split: str) -> list[tuple[str, str]]:
    return load_task_examples("sst2", sample_path("sst2", split))


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def check_trained(output_dir: Path, result, rows: int) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{rows} rows -> {rows} examples" in result.stdout
    metrics = read_metrics(output_dir)
    assert metrics[-1]["loss"] < metrics[0]["loss"], [m["loss"] for m in metrics]
    assert any("dev_loss" in m for m in metrics)
    assert (output_dir / "allocation" / "round_01.json").is_file()
    assert (output_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_prompt_completion_rows_with_the_bare_ds_config_name(tmp_path):
    def rows(split: str) -> list[dict]:
        return [{"prompt": f"{p}\nSentiment:", "completion": f" {r}"} for p, r in sst2_pairs(split)]

    train_file = write_jsonl(tmp_path / "train.jsonl", rows("train"))
    dev_file = write_jsonl(tmp_path / "dev.jsonl", rows("dev"))
    out = tmp_path / "run"
    # `--ds_config zero3.json` from the repository root, where no such file is.
    result = run_train(
        out, "--task", "prompt_completion", "--train_file", train_file, "--validation_file",
        dev_file, procs=1, ds=Path("zero3.json"), base=SHORT_RUN,
    )  # fmt: skip
    check_trained(out, result, len(sst2_pairs("train")))
    assert "ZeRO stage 3" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["ds_config"] == str(REPO / "ds_configs" / "zero3.json")
    assert config["task"] == "prompt_completion"


def test_chat_rows_messages_and_sharegpt(tmp_path):
    def talk(prompt: str, response: str) -> list[dict]:
        return [
            {"role": "system", "content": "Answer with one word."},
            {"role": "user", "content": f"What is the sentiment of: {prompt}"},
            {"role": "assistant", "content": response},
        ]

    train = [{"messages": talk(p, r)} for p, r in sst2_pairs("train")]
    # The dev split in ShareGPT form, as LLaMA-Factory reads it.
    speakers = {"user": "human", "assistant": "gpt"}
    dev = [
        {
            "system": messages[0]["content"],
            "conversations": [
                {"from": speakers[m["role"]], "value": m["content"]} for m in messages[1:]
            ],
        }
        for messages in (talk(p, r) for p, r in sst2_pairs("dev"))
    ]
    out = tmp_path / "run"
    result = run_train(
        out, "--task", "chat", "--train_file", write_jsonl(tmp_path / "train.jsonl", train),
        "--validation_file", write_jsonl(tmp_path / "dev.jsonl", dev), procs=1, ds="zero2",
        base=SHORT_RUN,
    )  # fmt: skip
    check_trained(out, result, len(train))


@pytest.mark.parametrize(
    "task, row, message",
    [
        ("prompt_completion", {"sentence": "x", "label": 1}, "row 1: missing field 'prompt': task prompt_completion expects fields 'prompt' and 'completion'"),
        ("chat", {"prompt": "x", "completion": "y"}, "row 1: missing field 'messages': task chat expects a 'messages' list of {role, content} objects"),
    ],
)  # fmt: skip
def test_wrong_fields_are_one_line_naming_the_expected_ones(tmp_path, capsys, task, row, message):
    data = write_jsonl(tmp_path / "rows.jsonl", [row])
    out = tmp_path / "out"
    argv = ["--output_dir", str(out), "--ds_config", "zero3.json", "--task", task,
            "--train_file", data, "--validation_file", data]  # fmt: skip
    assert run_cli(train.main, argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(
        rf"error: .*rows\.jsonl {re.escape(message)}.*", lines[0]
    )
    assert not out.exists()
