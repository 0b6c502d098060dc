"""`deepspeed launch/train.py` end to end on CPU (gloo), the way users run it."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from alora_ds.core.allocation import plan_round
from alora_ds.errors import run_cli
from alora_ds.io.examples import collate
from alora_ds.io.splits import build_split
from alora_ds.io.tasks import load_task_rows, sample_path
from alora_ds.scoring.direct import validation_score
from launch import train
from tests.helpers import (
    BUDGET,
    PARAM_BUDGET,
    RANK_COSTS,
    REPO,
    ROUND_KEYS,
    assert_every_process_said,
    load_4bit,
    read_metrics,
    read_rounds,
    run_train,
)


def check_run(
    output_dir: Path,
    result: subprocess.CompletedProcess,
    *,
    rounds: int = 2,
    n_prune: int = 7,
    fall: float = 0.3,
    base: Path | None = None,
    load_in_4bit: bool = False,
    dtype: torch.dtype = torch.float32,
) -> None:
    """What every successful run must show, whatever the stage, dtype and process count: the
    loss falls, every round obeys the allocation rules against its own scores, the summary and
    heatmaps agree with the round files, and peft alone, on `base` (the run's own random base by
    default; in 4 bits for a QLoRA run), gives the exported adapter the run's last dev loss."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = read_metrics(output_dir)
    losses = [m["loss"] for m in metrics]
    assert losses[-1] < losses[0] - fall, losses  # the loss falls
    assert all(set(m) >= {"step", "epoch", "loss", "lr", "tokens_per_s"} for m in metrics)
    assert any("dev_loss" in m for m in metrics)

    records = read_rounds(output_dir)
    assert [r["round"] for r in records] == list(range(1, rounds + 1))
    config = json.loads((output_dir / "config.json").read_text())
    capped = config["cap_parameters"]  # the paper's rule (footnote 4) unless capped
    screened_keys = set()  # what a screened round adds to its file
    if config["scoring"] == "screened":
        verify = {"verify"} if config["screen_verify"] else set()
        screened_keys = {"exact", "estimates", "screening"} | verify
    previous = None
    for record in records:
        assert set(record) == ROUND_KEYS | screened_keys
        # The round obeys the allocation rules against its own scores.
        costs = {name: RANK_COSTS[name.rsplit(".", 1)[-1]] for name in record["scores"]}
        budget = PARAM_BUDGET if capped else None
        plan = plan_round(record["scores"], n_prune, rank_costs=costs, param_budget=budget)
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
    assert all(name.startswith("model.layers.") for name in records[0]["scores"])

    # The run's summary and rank heatmaps agree with the round files.
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["total_ranks_start"] == BUDGET
    assert summary["total_ranks_end"] == sum(records[-1]["ranks_after"].values())
    assert summary["adapter_params_start"] == PARAM_BUDGET
    assert summary["adapter_params_end"] <= PARAM_BUDGET or not capped
    heatmaps = ["ranks.png", *(f"allocation/ranks_round_{r:02d}.png" for r in range(1, rounds + 1))]
    for png in heatmaps:
        assert (output_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert config["rank_budget"] == BUDGET and config["resolved"]["r_init"] == 2
    assert config["load_in_4bit"] == load_in_4bit
    assert "final ranks per module type" in result.stdout

    # The exported adapter, loaded by peft on its own, is the trained model: same dev loss (in
    # the run's dtype; bf16 sums differ in order between 2 ZeRO-3 processes and one model).
    base = base or output_dir / "base_model"
    adapter_config = json.loads((output_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base.resolve())
    if load_in_4bit:
        base_model, _ = load_4bit(base, dtype)
    else:
        base_model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    model = PeftModel.from_pretrained(base_model, output_dir / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    dev, _ = build_split("sst2", None, "validation", tokenizer, 512)
    batches = [collate(dev[i : i + 4], tokenizer.pad_token_id) for i in range(0, len(dev), 4)]
    rel = 1e-5 if dtype == torch.float32 else 1e-2
    assert -validation_score(model, batches) == pytest.approx(metrics[-1]["dev_loss"], rel=rel)
    assert (output_dir / "best_adapter" / "adapter_model.safetensors").is_file()
    metadata = json.loads((output_dir / "adapter" / "alora_metadata.json").read_text())
    assert metadata["rank_map"] == records[-1]["ranks_after"]


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


def test_zero2_two_processes_screened_with_gradient_checkpointing_and_a_skipped_step(tmp_path):
    # Process 1's loss at step 4 is NaN: with --skip_nonfinite both processes skip that step.
    # Rounds scored by --scoring screened, each checked against the exact scores (--screen_verify).
    result = run_train(
        tmp_path / "run", "--gradient_checkpointing", "--skip_nonfinite", "--scoring", "screened",
        "--screen_verify", "true", ds="zero2", env={"ALORA_DS_TEST_FAULT": "nan@step:4@1"},
    )  # fmt: skip
    check_run(tmp_path / "run", result)  # recomputed activations: the same rules all hold
    for record in read_rounds(tmp_path / "run"):
        screening, verify = record["screening"], record["verify"]
        flags = [f for values in record["exact"].values() for f in values]
        assert screening["exact_ranks"] == sum(flags) >= len(record["pruned"])
        assert screening["live_ranks"] == len(flags)
        assert screening["estimator"] == "first-order" and screening["exact_means"] is False
        assert verify["identical_pruned"], verify
        # The pruned ranks are exactly scored ones, and their scores the exact ones.
        for name, index in record["pruned"]:
            assert record["exact"][name][index]
    assert "pruned set identical to exact: True" in result.stdout
    assert "ZeRO stage 2" in result.stdout
    assert "gradient checkpointing: True" in result.stdout
    assert "step 4: non-finite loss, step skipped (1 so far)" in result.stdout
    records = read_metrics(tmp_path / "run")
    assert records[3]["step"] == 4 and records[3]["loss"] is None
    assert all(r["loss"] is not None for r in records if r["step"] != 4)
    assert records[-1]["skipped_steps"] == 1


def write_parquet(path: Path, rows: list[dict]) -> str:
    table = pyarrow.Table.from_pylist(rows)
    pyarrow.parquet.write_table(table, path)
    return str(path)


def test_one_process_stage0_parquet_wandb_and_a_small_dev_split(tmp_path):
    """One process without ZeRO (stage 0), the training rows from a real parquet file, metrics
    to W&B offline, and |B_val| = 64 from a dev split of 33 rows (said; all 33 used)."""
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds["zero_optimization"] = {"stage": 0}
    (tmp_path / "stage0.json").write_text(json.dumps(ds))
    rows = load_task_rows(sample_path("sst2", "train"))
    train_file = write_parquet(tmp_path / "train.parquet", rows)
    out = tmp_path / "run"
    result = run_train(
        out, "--val_examples", "64", "--train_file", train_file,
        "--report_to", "tensorboard,wandb", procs=1, ds=tmp_path / "stage0.json",
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )  # fmt: skip
    check_run(out, result)
    assert "1 process(es), ZeRO stage 0" in result.stdout
    assert f"data: train {train_file}: {len(rows)} rows -> {len(rows)} examples" in result.stdout
    assert (
        "the dev split has 33 examples, fewer than |B_val| = 64; scoring uses all 33"
        in result.stdout
    )
    # W&B's offline run (for `wandb sync`) holds the run's config and what metrics.jsonl holds.
    (log,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    data = log.read_bytes()
    assert b"rank_budget" in data and b"cap_parameters" in data
    assert json.dumps(read_metrics(out)[-1]["dev_loss"]).encode() in data


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


def test_rebuild_keeps_survivors_values_and_moments_under_zero3_and_zero2(engine_checks):
    """Surviving ranks keep their exact fp32 values and Adam moments through a rebuild, new ranks
    start with zero moments, and training goes on: under ZeRO-3, ZeRO-2, and ZeRO-2 with trained
    gates in their own group (asserted in tests/scripts/engine_checks.py, checks `rebuild-*`)."""
    assert_every_process_said(engine_checks, "rebuild ok under zero3, hard gates")
    assert_every_process_said(engine_checks, "rebuild ok under zero2, hard gates")
    assert_every_process_said(engine_checks, "rebuild ok under zero2, relaxed gates")


def test_lora_baseline_has_no_rounds(golden_run):
    output_dir, result = golden_run("lora-1p")
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_rounds(output_dir) == []
    config = json.loads((output_dir / "adapter" / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) == {2}  # every module keeps r_init


def test_bf16_zero3_two_processes(tmp_path):
    """The shipped ZeRO-3 bf16 config (the LLaMA-2 recipes'), 2 processes: a normal run's checks,
    the peft reload in bf16."""
    result = run_train(tmp_path / "run", ds="zero3_bf16")
    check_run(tmp_path / "run", result, dtype=torch.bfloat16)
    assert "2 process(es), ZeRO stage 3, bfloat16" in result.stdout


# QLoRA's nf4 matmuls are slow on CPU: 8 steps of 4 examples per process, one round of 4 after
# step 4, the dev loss at steps 4 and 8.
QLORA_RUN = [
    "--load_in_4bit", "--rank_budget", str(BUDGET), "--lora_alpha", "4", "--learning_rate", "5e-3",
    "--per_device_train_batch_size", "4", "--max_steps", "8", "--initial_steps", "4",
    "--round_steps", "2", "--num_rounds", "1", "--prune_per_round", "4", "--val_examples", "8",
    "--scoring_batch_size", "8", "--eval_steps", "4", "--logging_steps", "1", "--report_to", "none",
    "--progress_bar", "false",
]  # fmt: skip


@pytest.mark.parametrize(
    ("ds", "procs", "dtype"),
    [
        ("zero2", 1, torch.float32),
        ("zero3_bf16", 2, torch.bfloat16),
        ("zero3_offload_bf16", 1, torch.bfloat16),
    ],
    ids=["zero2-1p", "zero3_bf16-2p", "zero3_offload_bf16-1p"],
)
def test_qlora_trains_under(ds, procs, dtype, golden_run, tmp_path):
    """`--load_in_4bit` on a checkpoint (a golden run's saved base) under ZeRO-2, ZeRO-3 bf16 and
    ZeRO-3 Offload (the shipped configs; ZeRO-3 fp32 on 2 processes is the engine check
    `qlora`): a normal run's checks, the exported adapter reloaded by peft on the 4-bit base."""
    base, reference = golden_run("alora-2p")
    assert reference.returncode == 0, reference.stderr[-3000:]
    base = base / "base_model"
    out = tmp_path / "run"
    result = run_train(out, "--model_name_or_path", str(base), procs=procs, ds=ds, base=QLORA_RUN)
    check_run(out, result, rounds=1, n_prune=4, fall=0.1, base=base, load_in_4bit=True,
              dtype=dtype)  # fmt: skip
    stage = 2 if ds == "zero2" else 3
    name = str(dtype).removeprefix("torch.")
    assert f"{procs} process(es), ZeRO stage {stage}, {name}" in result.stdout


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
