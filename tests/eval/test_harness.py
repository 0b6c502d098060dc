"""`python -m eval.harness`: lm-evaluation-harness on a base plus our adapter, offline, over the
local task YAMLs in eval/harness_tasks; and its one-line refusals."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import eval.harness as harness
from alora_ds.errors import run_cli
from tests.helpers import OFFLINE, REPO


@torch.no_grad()
def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenized as the harness's HF model does: the whole text
    encoded (the tokenizer's default special tokens), the context's tokens split off."""
    whole = tokenizer(context + continuation)["input_ids"]
    cont = whole[len(tokenizer(context)["input_ids"]) :]
    logits = model(input_ids=torch.tensor([whole[:-1]])).logits[0, -len(cont) :]
    return float(torch.log_softmax(logits.float(), -1)[range(len(cont)), cont].sum())


def test_the_harness_scores_our_adapter_on_local_tasks(tiny_setup, tmp_path, capsys, monkeypatch):
    # In this process (the CLI's main with its arguments), to spare the suite a second start-up
    # of torch and the harness; from another working directory: the tasks' data paths are
    # relative to their YAML, not to it.
    monkeypatch.chdir(tmp_path)
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "results"
    capsys.readouterr()
    code = run_cli(harness.main, [
        "--model_name_or_path", str(tiny_setup.base), "--adapter", str(tiny_setup.adapter),
        "--tasks", "alora_sst2,alora_squad", "--output_dir", str(out), "--log_samples",
        "--limit", "8", "--batch_size", "4",
    ])  # fmt: skip
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr[-3000:]
    (results_file,) = out.glob("*/results_*.json")
    assert f"wrote {results_file}" in stdout
    results = json.loads(results_file.read_text())
    assert results["config"]["model_args"]["peft"] == str(tiny_setup.adapter)
    assert 0 <= results["results"]["alora_sst2"]["acc,none"] <= 1
    assert 0 <= results["results"]["alora_squad"]["exact_match,strip"] <= 1
    assert results["n-samples"]["alora_sst2"] == {"original": 22, "effective": 8}
    assert results["n-samples"]["alora_squad"] == {"original": 24, "effective": 8}

    # The harness ran our adapter: its log-likelihoods are peft's on base + adapter, not the
    # base's. First SST-2 document, both choices.
    (samples_file,) = out.glob("*/samples_alora_sst2_*.jsonl")
    sample = json.loads(samples_file.read_text().splitlines()[0])
    tokenizer = AutoTokenizer.from_pretrained(tiny_setup.base)
    base = AutoModelForCausalLM.from_pretrained(tiny_setup.base, dtype=torch.float32).eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_setup.base, dtype=torch.float32),
        tiny_setup.adapter,
    ).eval()
    requests = [(a["arg_0"], a["arg_1"]) for a in sample["arguments"].values()]
    assert [c for _, c in requests] == ["negative", "positive"]
    for (context, continuation), response in zip(requests, sample["resps"], strict=True):
        harness_ll = float(response[0][0])
        assert harness_ll == pytest.approx(
            loglikelihood(adapted, tokenizer, context, continuation), abs=1e-4
        )
        assert abs(harness_ll - loglikelihood(base, tokenizer, context, continuation)) > 1e-2


@pytest.mark.skipif(
    not (REPO / "data" / "rotten_tomatoes" / "test.jsonl").is_file(),
    reason="the Rotten Tomatoes split is not fetched: python scripts/fetch_rotten_tomatoes.py",
)
def test_the_rotten_tomatoes_task_runs_on_the_real_split(tiny_setup, tmp_path, capsys, monkeypatch):
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "results"
    code = run_cli(harness.main, [
        "--model_name_or_path", str(tiny_setup.base), "--adapter", str(tiny_setup.adapter),
        "--tasks", "alora_rotten_tomatoes", "--output_dir", str(out), "--limit", "16",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err[-3000:]
    (results_file,) = out.glob("*/results_*.json")
    results = json.loads(results_file.read_text())
    assert results["n-samples"]["alora_rotten_tomatoes"] == {"original": 1566, "effective": 16}


def run_main(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = run_cli(harness.main, args)
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    ("tasks", "adapter", "message"),
    [
        ("alora_sst2,no_such_task", None, r"--tasks: unknown harness task 'no_such_task'; "
         r"local tasks: .*alora_sst2"),
        ("hellaswag", None, r"--tasks: 'hellaswag' is one of the harness's hub tasks, whose "
         r"dataset cannot be downloaded offline .*: pass a local task \(.*alora_squad"),
        ("alora_sst2", "base", r"has no adapter_config\.json: not a PEFT adapter"),
        ("alora_sst2", "two_cpu_processes", r"2 processes without GPUs: the harness shares "
         r"requests out over GPUs only"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line(tiny_setup, tmp_path, capsys, monkeypatch, tasks, adapter, message):
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    args = ["--model_name_or_path", str(tiny_setup.base), "--tasks", tasks]
    if adapter == "base":
        args += ["--adapter", str(tiny_setup.base)]
    elif adapter == "two_cpu_processes":  # as `torchrun --nproc_per_node 2` would start it
        monkeypatch.setenv("WORLD_SIZE", "2")
        args += ["--adapter", str(tiny_setup.adapter)]
    code, err = run_main([*args, "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 2
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_a_local_task_without_its_data_names_the_script(tiny_setup, tmp_path, capsys, monkeypatch):
    # Our task YAMLs in a place where data/rotten_tomatoes is not: the check names the file.
    tasks = tmp_path / "eval" / "harness_tasks"
    shutil.copytree(harness.LOCAL_TASKS, tasks)
    monkeypatch.setattr(harness, "LOCAL_TASKS", tasks)
    code, err = run_main(
        ["--model_name_or_path", str(tiny_setup.base), "--tasks", "alora_rotten_tomatoes",
         "--output_dir", str(tmp_path / "out")],
        capsys,
    )  # fmt: skip
    assert code == 2
    assert err == (
        f"error: task alora_rotten_tomatoes: data file {tmp_path / 'data/rotten_tomatoes/train.jsonl'}"
        " does not exist; write it with python scripts/fetch_rotten_tomatoes.py"
    )
