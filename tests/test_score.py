"""`python -m alora_ds.score` on adapters saved by peft itself."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from alora_ds.core.inject import LLAMA_TARGET_MODULES
from alora_ds.errors import run_cli
from alora_ds.io.examples import load_tokenized_jsonl, make_batches
from alora_ds.io.models import build_random_llama, load_causal_lm, tiny_llama_config
from alora_ds.io.peft_read import load_peft_adapter
from alora_ds.score import main
from alora_ds.scoring.direct import ab_lora_scores
from tests.helpers import REPO, random_examples

RANK_PATTERN = {"model.layers.0.self_attn.q_proj": 4, "down_proj": 1}
ALPHA_PATTERN = {"v_proj": 3}


def save_peft_adapter(base_dir: Path, out_dir: Path, seed: int = 5, **config) -> None:
    base = load_causal_lm(str(base_dir))
    lora = LoraConfig(
        r=2,
        lora_alpha=8,
        target_modules=list(LLAMA_TARGET_MODULES),
        **config,
    )
    model = get_peft_model(base, lora)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(out_dir)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    build_random_llama(tiny_llama_config(), seed=0).save_pretrained(root / "base")
    save_peft_adapter(
        root / "base", root / "adapter", rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN
    )
    data = root / "val.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in random_examples(10)))
    return root


def test_loaded_adapter_reproduces_peft_logits(workspace):
    x = torch.randint(0, 128, (2, 11))
    reference_model = PeftModel.from_pretrained(
        load_causal_lm(str(workspace / "base")), workspace / "adapter"
    )
    ours = load_causal_lm(str(workspace / "base"))
    modules = load_peft_adapter(ours, workspace / "adapter")
    assert modules["model.layers.0.self_attn.q_proj"].r == 4
    assert modules["model.layers.1.mlp.down_proj"].r == 1
    assert modules["model.layers.1.self_attn.k_proj"].r == 2
    assert modules["model.layers.1.self_attn.v_proj"].scale == 1.5
    with torch.no_grad():
        expected = reference_model(input_ids=x).logits
        got = ours(input_ids=x).logits
    assert not torch.allclose(expected, load_causal_lm(str(workspace / "base"))(input_ids=x).logits)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def run_cli_process(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "alora_ds.score", *args],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)  # fmt: skip


def test_cli_round_trip(workspace, tmp_path):
    """The default (fast) from the shell, on an adapter with a non-uniform rank_pattern."""
    output = tmp_path / "out" / "scores.json"
    result = run_cli_process(
        "--model_name_or_path", str(workspace / "base"), "--adapter", str(workspace / "adapter"),
        "--data", str(workspace / "val.jsonl"), "--num_examples", "8", "--output", str(output),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "scored 28 ranks in 14 modules on 8 examples (fast)" in result.stdout
    scores = json.loads(output.read_text())
    assert set(scores) == {"S_M", "S_base", "modules"}
    modules = scores["modules"]
    assert len(modules) == 14
    assert len(modules["model.layers.0.self_attn.q_proj"]["importance"]) == 4
    assert len(modules["model.layers.0.mlp.down_proj"]["S_only"]) == 1
    assert len(modules["model.layers.1.self_attn.q_proj"]["S_without"]) == 2

    # The same numbers as the direct reference on the same inputs, in process.
    for name, entry in reference_scores(workspace, 8)["modules"].items():
        assert modules[name]["importance"] == pytest.approx(entry["importance"], rel=1e-5, abs=1e-7)


def reference_scores(workspace, num_examples: int) -> dict:
    model = load_causal_lm(str(workspace / "base"))
    load_peft_adapter(model, workspace / "adapter")
    batches = make_batches(load_tokenized_jsonl(workspace / "val.jsonl", num_examples), 8)
    return ab_lora_scores(model, batches).to_json()


@pytest.mark.parametrize("scoring", ["naive", "screened"])
def test_each_scoring_mode_gives_the_reference_where_it_is_exact(
    workspace, tmp_path, capsys, scoring
):
    output = tmp_path / "scores.json"
    args = base_args(workspace, tmp_path, **{"--num_examples": "8", "--scoring": scoring,
                                                "--screen_candidates": "3", "--prune_per_round": "2"})  # fmt: skip
    assert run_cli(main, args) == 0
    scores, expected = json.loads(output.read_text()), reference_scores(workspace, 8)
    exact_flags = []
    for name, entry in expected["modules"].items():
        got = scores["modules"][name]
        flags = got.get("exact", [True] * len(entry["importance"]))
        exact_flags += flags
        for value, want, exact in zip(got["importance"], entry["importance"], flags, strict=True):
            if exact:
                assert value == pytest.approx(want, rel=1e-5, abs=1e-7), name
    if scoring == "screened":
        # (These adapters' B ~ N(0, 0.5) are a large perturbation, where the estimate is poor:
        # the cut decides how many more are scored exactly.)
        assert 3 <= sum(exact_flags) and len(exact_flags) == 28
        assert scores["screening"]["exact_ranks"] == sum(exact_flags)
        # The two lowest exact scores are the two lowest of all: the round's cut is exact.
        flat = sorted((v, n, i) for n, e in expected["modules"].items()
                      for i, v in enumerate(e["importance"]))  # fmt: skip
        for _, name, index in flat[:2]:
            assert scores["modules"][name]["exact"][index], (name, index)
    assert (
        f"({'naive' if scoring == 'naive' else ''}" in capsys.readouterr().out or scoring != "naive"
    )


def test_a_task_file_is_tokenized_as_in_training(tmp_path, capsys):
    from alora_ds.io.tasks import build_tiny_tokenizer, sample_path

    base = tmp_path / "base"
    build_random_llama(tiny_llama_config(vocab_size=1024), seed=0).save_pretrained(base)
    build_tiny_tokenizer(base)
    save_peft_adapter(base, tmp_path / "adapter")
    output = tmp_path / "scores.json"
    code = run_cli(main, ["--model_name_or_path", str(base), "--adapter", str(tmp_path / "adapter"),
                          "--task", "sst2", "--data", str(sample_path("sst2", "dev")),
                          "--num_examples", "6", "--output", str(output)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert "on 6 examples" in capsys.readouterr().out
    assert len(json.loads(output.read_text())["modules"]) == 14


def run_main(args, capsys) -> tuple[int, str]:
    code = run_cli(main, args)
    err = capsys.readouterr().err.strip()
    return code, err


def base_args(workspace, tmp_path, **overrides):
    values = {
        "--model_name_or_path": str(workspace / "base"),
        "--adapter": str(workspace / "adapter"),
        "--data": str(workspace / "val.jsonl"),
        "--num_examples": "4",
        "--output": str(tmp_path / "scores.json"),
    }
    values.update(overrides)
    return [item for pair in values.items() for item in pair]


def test_bad_input_errors(workspace, tmp_path, capsys):
    cases = []
    cases.append(
        ({"--adapter": str(tmp_path / "nope")}, r"adapter directory .*nope does not exist")
    )
    cases.append(
        ({"--num_examples": "11"}, r"num_examples 11 is larger than the 10 rows in .*val.jsonl")
    )

    no_fields = tmp_path / "no_fields.jsonl"
    no_fields.write_text('{"text": "hello"}\n')
    cases.append(({"--data": str(no_fields)}, r"no_fields.jsonl line 1: missing field 'input_ids'"))
    unsupervised = tmp_path / "unsupervised.jsonl"
    unsupervised.write_text('{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}\n')
    cases.append(({"--data": str(unsupervised)}, r"unsupervised.jsonl line 1: no supervised token"))

    # An adapter for a deeper model: its layer 2 does not exist in this base.
    other = tmp_path / "other"
    build_random_llama(tiny_llama_config(num_hidden_layers=3), seed=0).save_pretrained(
        other / "base"
    )
    save_peft_adapter(other / "base", other / "adapter")
    cases.append(
        (
            {"--adapter": str(other / "adapter")},
            r"adapter module model.layers.2.\S+ does not exist in the base model",
        )
    )
    # An adapter for a wider model: the shapes do not match.
    wide = tmp_path / "wide"
    build_random_llama(
        tiny_llama_config(hidden_size=32, intermediate_size=64), seed=0
    ).save_pretrained(wide / "base")
    save_peft_adapter(wide / "base", wide / "adapter")
    cases.append(
        (
            {"--adapter": str(wide / "adapter")},
            r"module model.layers.0.mlp.down_proj expects a \(64 x 128\) weight but the adapter is \(32 x 64\)",
        )
    )
    cases.append(
        (
            {"--model_name_or_path": str(tmp_path / "nobase")},
            r"model directory .*nobase does not exist",
        )
    )
    big_ids = tmp_path / "big_ids.jsonl"
    big_ids.write_text('{"input_ids": [1, 500, 3], "labels": [-100, 500, 3]}\n')
    cases.append(
        (
            {"--data": str(big_ids), "--num_examples": "1"},
            r"big_ids.jsonl row 1: token id 500 is outside the model's vocabulary of 128",
        )
    )

    for overrides, pattern in cases:
        capsys.readouterr()  # drop progress bars printed while building the fixtures
        code, err = run_main(base_args(workspace, tmp_path, **overrides), capsys)
        assert code == 2, (overrides, err)
        assert len(err.splitlines()) == 1, err
        assert err.startswith("error: ")
        assert re.search(pattern, err), (pattern, err)
        assert not (tmp_path / "scores.json").exists()


def test_exit_status_from_the_shell(workspace, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "alora_ds.score",
            *base_args(workspace, tmp_path, **{"--num_examples": "99"}),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: num_examples 99 is larger than the 10 rows in {workspace / 'val.jsonl'}"
    ]
