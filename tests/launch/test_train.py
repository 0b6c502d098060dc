"""`deepspeed launch/train.py` end to end on CPU (gloo), the way users run it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from alora_ds.core.allocation import plan_round
from alora_ds.errors import run_cli
from alora_ds.io.examples import collate
from alora_ds.io.splits import build_split
from alora_ds.scoring.direct import validation_score
from launch import train
from tests.helpers import (
    BUDGET,
    DEEPSPEED,
    PARAM_BUDGET,
    RANK_COSTS,
    REPO,
    ROUND_KEYS,
    SMALL_RUN,
    free_port,
    read_rounds,
    run_train,
)


def check_run(output_dir: Path, result: subprocess.CompletedProcess) -> None:
    """What every successful run must show, whatever the stage and process count."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics]
    assert losses[-1] < losses[0] - 0.3, losses  # the loss falls
    assert all(set(m) >= {"step", "epoch", "loss", "lr", "tokens_per_s"} for m in metrics)
    assert any("dev_loss" in m for m in metrics)

    rounds = read_rounds(output_dir)
    assert [r["round"] for r in rounds] == [1, 2]
    config = json.loads((output_dir / "config.json").read_text())
    capped = config["cap_parameters"]  # the paper's rule (footnote 4) unless capped
    previous = None
    for record in rounds:
        assert set(record) == ROUND_KEYS
        # The round obeys the allocation rules against its own scores.
        costs = {name: RANK_COSTS[name.rsplit(".", 1)[-1]] for name in record["scores"]}
        budget = PARAM_BUDGET if capped else None
        plan = plan_round(record["scores"], 7, rank_costs=costs, param_budget=budget)
        params = sum(r * costs[n] for n, r in record["ranks_after"].items())
        assert params <= PARAM_BUDGET or not capped
        if not capped and plan.receivers:  # footnote 4: all n_A new ranks are shared out
            assert sum(record["ranks_after"].values()) == sum(record["ranks_before"].values())
        assert record["pruned"] == [list(p) for p in plan.pruned]
        assert record["added"] == plan.added
        assert record["ranks_after"] == plan.ranks_after
        assert {k: len(v) for k, v in record["scores"].items()} == record["ranks_before"]
        assert sum(record["ranks_after"].values()) <= BUDGET
        assert previous is None or record["ranks_before"] == previous["ranks_after"]
        assert record["S_M"] < 0
        previous = record
    assert all(name.startswith("model.layers.") for name in rounds[0]["scores"])

    # The run's summary and rank heatmaps agree with the round files.
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["total_ranks_start"] == BUDGET
    assert summary["total_ranks_end"] == sum(rounds[-1]["ranks_after"].values())
    assert summary["adapter_params_start"] == PARAM_BUDGET
    assert summary["adapter_params_end"] <= PARAM_BUDGET or not capped
    for png in ("ranks.png", "allocation/ranks_round_01.png", "allocation/ranks_round_02.png"):
        assert (output_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert config["rank_budget"] == BUDGET and config["resolved"]["r_init"] == 2
    assert "final ranks per module type" in result.stdout

    # The exported adapter, loaded by peft on its own, is the trained model: same dev loss.
    base = AutoModelForCausalLM.from_pretrained(output_dir / "base_model")
    tokenizer = AutoTokenizer.from_pretrained(output_dir / "base_model")
    adapter_config = json.loads((output_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((output_dir / "base_model").resolve())
    model = PeftModel.from_pretrained(base, output_dir / "adapter").eval()
    dev, _ = build_split("sst2", None, "validation", tokenizer, 512)
    batches = [collate(dev[i : i + 4], tokenizer.pad_token_id) for i in range(0, len(dev), 4)]
    assert -validation_score(model, batches) == pytest.approx(metrics[-1]["dev_loss"], rel=1e-5)
    assert (output_dir / "best_adapter" / "adapter_model.safetensors").is_file()
    metadata = json.loads((output_dir / "adapter" / "alora_metadata.json").read_text())
    assert metadata["rank_map"] == rounds[-1]["ranks_after"]


def test_zero3_two_processes(golden_run, tmp_path):
    output_dir, result = golden_run("alora-2p")
    check_run(output_dir, result)
    # The adapter trained under 2-process ZeRO-3, merged into a full checkpoint, is the model
    # peft builds from base + adapter.
    from eval.merge import main as merge_main

    merged = tmp_path / "merged"
    assert merge_main(["--model_name_or_path", str(output_dir / "base_model"),
                       "--adapter", str(output_dir / "adapter"), "--output_dir", str(merged)]) == 0  # fmt: skip
    ids = torch.randint(4, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(output_dir / "base_model"), output_dir / "adapter"
    ).eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert "2 process(es), ZeRO stage 3" in result.stdout
    assert "4 x accumulation 1 x 2 processes = 8 examples per optimizer step" in result.stdout


def test_zero2_two_processes_with_gradient_checkpointing(tmp_path):
    result = run_train(tmp_path / "run", "--gradient_checkpointing", ds="zero2")
    check_run(tmp_path / "run", result)  # recomputed activations: the same rules all hold
    assert "ZeRO stage 2" in result.stdout
    assert "gradient checkpointing: True" in result.stdout


def test_one_process_and_a_small_dev_split(tmp_path):
    # |B_val| = 64 but the dev split holds 33 rows: said, and all 33 are used.
    result = run_train(tmp_path / "run", "--val_examples", "64", procs=1)
    check_run(tmp_path / "run", result)
    assert "1 process(es)" in result.stdout
    assert (
        "the dev split has 33 examples, fewer than |B_val| = 64; scoring uses all 33"
        in result.stdout
    )


def test_plan_mismatch_stops_every_process(tmp_path):
    start = time.monotonic()
    result = run_train(
        tmp_path / "run", env={"ALORA_DS_TEST_FAULT": "corrupt@round:1@1"}, timeout=200
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    message = "after round 1, process 1 disagrees with process 0 on module model.layers.0.self_attn.q_proj"
    assert output.count(message) >= 2, output[-3000:]  # raised by both processes
    assert time.monotonic() - start < 120
    assert not (tmp_path / "run" / "allocation" / "round_01.json").exists()


# ---- bad input: one line, exit 2, nothing written -------------------------------------------


def run_main(argv, capsys) -> tuple[int, str]:
    code = run_cli(train.main, argv)
    return code, capsys.readouterr().err.strip()


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_bad_input(tmp_path, capsys):
    out = tmp_path / "out"
    good_ds = str(REPO / "ds_configs" / "zero3.json")
    no_fields = write(tmp_path / "nofields.jsonl", '{"text": "hello", "label": 1}\n')
    empty = write(tmp_path / "empty.jsonl", "")
    cases = [
        (["--ds_config", str(tmp_path / "nope.json")], r"ds config .*nope.json does not exist"),
        (["--ds_config", write(tmp_path / "bad.json", "{oops")], r"ds config .*bad.json is not valid JSON"),
        (
            ["--ds_config", write(tmp_path / "batch.json", json.dumps({"train_batch_size": 7}))],
            r"train_batch_size = 7 but the run has train_batch_size = 4 \(micro batch 4 x accumulation 1 x 1 processes = 4\)",
        ),
        (["--ds_config", good_ds, "--task", "mnli"], r"unknown task 'mnli'; known tasks: alpaca, boolq"),
        (["--ds_config", good_ds, "--train_file", no_fields], r"nofields.jsonl row 1: missing field 'sentence' required by task sst2"),
        (["--ds_config", good_ds, "--train_file", empty], r"empty.jsonl"),
        (["--ds_config", good_ds, "--rank_budget", "7"], r"rank_budget 7 is smaller than the number of adapted modules \(14\)"),
        (["--ds_config", good_ds, "--rank_budget", "30"], r"rank_budget 30 does not divide evenly over 14"),
        (["--ds_config", good_ds, "--learning_rat", "1e-3"], r"unknown option 'learning_rat' \(did you mean learning_rate\?\)"),
        (["--ds_config", good_ds, "--num_rounds", "40"], r"the rounds need .* optimizer steps"),
        (["--ds_config", good_ds, "--per_device_train_batch_size", "abc"], r"per_device_train_batch_size='abc' is not a valid int"),
    ]  # fmt: skip
    for extra, pattern in cases:
        argv = ["--output_dir", str(out), "--per_device_train_batch_size", "4", *extra]
        code, err = run_main(argv, capsys)
        assert code == 2, (extra, err)
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert re.search(pattern, lines[0]), (pattern, lines[0])
        assert not out.exists()

    # An output_dir that holds another run is refused, and left as it was.
    out.mkdir()
    (out / "config.json").write_text("{}")
    code, err = run_main(["--output_dir", str(out), "--ds_config", good_ds], capsys)
    assert code == 2 and "already holds another run; pass --overwrite_output_dir" in err
    assert (out / "config.json").read_text() == "{}"


def test_yaml_config_and_overrides(tmp_path):
    from alora_ds.config import parse_args

    config = write(
        tmp_path / "c.yaml",
        "learning_rate: 2.0e-4\ntarget_modules: [q_proj, v_proj]\nnum_rounds: 3\n",
    )
    cfg = parse_args(["--config", config, "--num_rounds=5", "--output_dir", "x", "--ds_config", "d",
                      "--overwrite_output_dir", "--local_rank=1"])  # fmt: skip
    assert cfg.learning_rate == 2e-4 and cfg.num_rounds == 5 and cfg.overwrite_output_dir
    assert cfg.target_modules == ["q_proj", "v_proj"]
    bad = write(tmp_path / "bad.yaml", "learning_rate: 1e-4\nbudget: 3\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown option 'budget'"):
        parse_args(["--config", bad, "--output_dir", "x", "--ds_config", "d"])


def test_zero3_rebuild_keeps_survivors_values_and_moments():
    """Surviving ranks keep their exact fp32 values and Adam moments through a ZeRO-3 rebuild,
    new ranks start with zero moments, and training goes on (asserted inside the script)."""
    result = subprocess.run(
        [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()),
         str(REPO / "tests" / "scripts" / "rebuild_check.py"), str(REPO / "ds_configs" / "zero3.json")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "rank 0: rebuild ok" in result.stdout and "rank 1: rebuild ok" in result.stdout


def test_lora_baseline_has_no_rounds(golden_run):
    output_dir, result = golden_run("lora-1p")
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_rounds(output_dir) == []
    config = json.loads((output_dir / "adapter" / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) == {2}  # every module keeps r_init


def test_bf16_zero3_and_stage0(tmp_path):
    for stage, precision in ((3, {"bf16": {"enabled": True}}), (0, {})):
        ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
        ds.update(precision, zero_optimization={"stage": stage})
        path = tmp_path / f"ds{stage}.json"
        path.write_text(json.dumps(ds))
        out = tmp_path / f"run{stage}"
        script = [
            str(REPO / "launch" / "train.py"),
            "--ds_config",
            str(path),
            "--output_dir",
            str(out),
        ]
        result = subprocess.run(
            [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), *script, *SMALL_RUN,
             "--num_train_epochs", "2", "--num_rounds", "1"],
            capture_output=True, text=True, cwd=REPO, timeout=400,
            env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"),
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert f"ZeRO stage {stage}" in result.stdout
        assert ("bfloat16" in result.stdout) == (stage == 3)
        assert len(read_rounds(out)) == 1
        assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_make_demo_keeps_the_budget_whenever_some_module_lost_nothing(tmp_path):
    """The README's `make demo`, as it runs it: with the paper's footnote 4 (the default), every
    round shares all n_A new ranks among the modules that lost none, so the budget holds."""
    out = tmp_path / "demo"
    result = run_train(out, "--config", str(REPO / "configs" / "demo.yaml"), base=[])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rounds = read_rounds(out)
    assert len(rounds) == 2
    for record in rounds:
        lost = {name for name, _ in record["pruned"]}
        if any(r > 0 and n not in lost for n, r in record["ranks_before"].items()):
            assert sum(record["ranks_after"].values()) == 56, record["round"]
            assert sum(record["added"].values()) == len(record["pruned"]) == 7
