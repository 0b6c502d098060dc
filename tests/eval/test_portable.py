"""`python -m eval.portable`: converting an exported adapter to the portable form, and its
one-line refusals. What the portable form means under each engine's rule is tested in
tests/io/test_peft_portable.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from alora_ds.errors import run_cli
from alora_ds.io.peft_portable import write_portable_adapter
from alora_ds.io.peft_write import adapter_tensors_from_model, write_peft_adapter
from eval.portable import main
from tests.helpers import OFFLINE, REPO, build_gated


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """root/adapter (native, ranks 2..7, one scale folded), root/expected (the training's
    portable export of the same tensors) and root/base (a model checkpoint, not an adapter)."""
    root = tmp_path_factory.mktemp("portable")
    config, model, _ = build_gated()
    tensors = adapter_tensors_from_model(model)
    write_peft_adapter(tensors, root / "adapter", base_model_name_or_path="tiny")
    write_portable_adapter(tensors, root / "expected", base_model_name_or_path="tiny")
    config.save_pretrained(root / "base")
    return root


def test_the_command_converts_an_exported_adapter(exported, tmp_path):
    out = tmp_path / "portable"
    result = subprocess.run(
        [sys.executable, "-m", "eval.portable", "--adapter", str(exported / "adapter"),
         "--output_dir", str(out)],
        capture_output=True, text=True, cwd=REPO, env=dict(os.environ, **OFFLINE), timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == (
        f"wrote {out}: 13 modules padded to r=7 (their own ranks 2..7), lora_alpha=17.5 "
        "(scale 2.5); scale ratio folded into lora_B of 1; vLLM needs --max-lora-rank >= 7"
    )
    name = "adapter_model.safetensors"
    assert (out / name).read_bytes() == (exported / "expected" / name).read_bytes()
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (7, 17.5, {})
    assert config["base_model_name_or_path"] == "tiny"


def run_main(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = run_cli(main, args)
    return code, capsys.readouterr().err.strip()


def edited_adapter(exported: Path, tmp_path: Path, **fields) -> Path:
    """A copy of the native adapter with adapter_config.json fields changed."""
    copy = tmp_path / "edited"
    copy.mkdir()
    for file in (exported / "adapter").iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, **fields}))
    return copy


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("model", r"base has no adapter_config\.json: not a PEFT adapter \(a model checkpoint\?"),
        ("run_dir", r"is a training output directory, not an adapter: pass .*/adapter"),
        ("ia3", r"peft_type is 'IA3', only LORA is supported"),
        ("rslora", r"use_rslora is set; a portable adapter needs the plain alpha / r scale"),
        ("dora", r"use_dora is set; DoRA's magnitude vectors have no portable LoRA form"),
        ("in_place", r"--output_dir .* would replace the adapter directory"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(exported, tmp_path, capsys, case, message):
    adapter, out = exported / "adapter", tmp_path / "out"
    if case == "model":
        adapter = exported / "base"
    elif case == "run_dir":
        adapter = exported.parent / exported.name  # holds adapter/: a run's output directory
    elif case == "ia3":
        adapter = edited_adapter(exported, tmp_path, peft_type="IA3")
    elif case in ("rslora", "dora"):
        adapter = edited_adapter(exported, tmp_path, **{f"use_{case}": True})
    elif case == "in_place":
        out = adapter
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = run_main(["--adapter", str(adapter), "--output_dir", str(out)], capsys)
    assert code == 2
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (exported / "adapter" / "adapter_config.json").is_file()  # never replaced
