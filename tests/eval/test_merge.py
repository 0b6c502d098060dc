"""`python -m eval.merge`: merging a PEFT adapter into its base model, checked against peft."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from alora_ds.core.inject import inject_gated_lora
from alora_ds.errors import run_cli
from alora_ds.io.models import build_random_llama, load_causal_lm, tiny_llama_config
from alora_ds.io.peft_write import adapter_tensors_from_model, write_peft_adapter
from eval.merge import main, parse_size
from tests.helpers import REPO, build_gated, randomise_adapters


def save_tokenizer(directory: Path) -> None:
    """A word-level tokenizer over the 128 ids of the tiny model."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, 128)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tokenizer.save_pretrained(directory)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("merge")
    config, model, _ = build_gated(seed=0)
    build_random_llama(config, seed=0).save_pretrained(root / "base")
    save_tokenizer(root / "base")
    write_peft_adapter(
        adapter_tensors_from_model(model),
        root / "adapter",
        base_model_name_or_path=str(root / "base"),
    )
    return root


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run_cli(main, args)
    captured = capsys.readouterr()
    return code, captured.out.strip(), captured.err.strip()


def merge_args(workspace: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path",
        str(workspace / "base"),
        "--adapter",
        str(workspace / "adapter"),
        "--output_dir",
        str(out),
        *extra,
    ]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))


def peft_logits(workspace: Path) -> torch.Tensor:
    reference = PeftModel.from_pretrained(
        load_causal_lm(str(workspace / "base")), workspace / "adapter"
    )
    return logits(reference, IDS)


def test_merged_checkpoint_matches_peft(workspace, tmp_path, capsys):
    out = tmp_path / "merged"
    code, stdout, err = run_main(merge_args(workspace, out), capsys)
    assert code == 0, err
    # It says where it wrote (not the base's directory, which it leaves as it was).
    assert stdout.startswith(f"wrote the merged checkpoint to {out.resolve()}: "), stdout
    assert re.search(r"\d+ ranks in 13 modules, .*tokenizer files: .*tokenizer.json", stdout)
    assert "the base model was not changed" in stdout
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    expected = peft_logits(workspace)
    assert not torch.allclose(expected, logits(load_causal_lm(str(workspace / "base")), IDS))
    torch.testing.assert_close(logits(merged, IDS), expected, rtol=1e-5, atol=1e-5)

    assert (out / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("w5 w7 w9")["input_ids"] == [5, 7, 9]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temp dir left


def test_small_shards_and_bf16(workspace, tmp_path, capsys):
    out = tmp_path / "merged"
    code, _, err = run_main(merge_args(workspace, out, "--max_shard_size", "100KB"), capsys)
    assert code == 0, err
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert not (out / "model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(merged, IDS), peft_logits(workspace), rtol=1e-5, atol=1e-5)

    # bf16 output replaces the fp32 checkpoint in place: one file set, bf16 weights.
    code, _, err = run_main(merge_args(workspace, out, "--dtype", "bfloat16"), capsys)
    assert code == 0, err
    assert not list(out.glob("model-*-of-*.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("100kb") == 10**5
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5MB") == 1_500_000
    assert parse_size("4096") == 4096


def test_bad_input_errors(workspace, tmp_path, capsys):
    out = tmp_path / "merged"
    wide = tmp_path / "wide"
    _, model, _ = build_gated(seed=1, hidden_size=32, intermediate_size=64)
    write_peft_adapter(adapter_tensors_from_model(model), wide, base_model_name_or_path=None)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")

    base = ["--model_name_or_path", str(workspace / "base")]
    adapter = ["--adapter", str(workspace / "adapter")]
    output = ["--output_dir", str(out)]
    cases = [
        (
            ["--model_name_or_path", str(tmp_path / "nobase"), *adapter, *output],
            r"model directory .*nobase does not exist",
        ),
        (
            [*base, "--adapter", str(tmp_path / "noadapter"), *output],
            r"adapter directory .*noadapter does not exist",
        ),
        (
            [*base, "--adapter", str(wide), *output],
            r"wide: module model.layers.0.mlp.down_proj expects a \(64 x 128\) weight but the "
            r"adapter is \(32 x 64\) \(is the adapter for another model\?\)",
        ),
        (
            [*base, *adapter, *output, "--max_shard_size", "5 parsecs"],
            r"--max_shard_size '5 parsecs' is not a size such as 5GB",
        ),
        (
            [*base, *adapter, "--output_dir", str(precious)],
            r"precious exists, is not empty and holds no config.json: refusing to replace it",
        ),
        (
            [*base, *adapter, "--output_dir", str(workspace)],
            r"--output_dir .* would replace the base model directory",
        ),
        (
            [*base, *adapter, *output, "--dtype", "float64"],
            r"argument --dtype: invalid choice: 'float64'",  # argparse's message, on one line
        ),
    ]
    for args, pattern in cases:
        code, _, err = run_main(args, capsys)
        assert code == 2, (args, err)
        assert len(err.splitlines()) == 1, err
        assert err.startswith("error: ")
        assert re.search(pattern, err), (pattern, err)
        assert not out.exists()
    assert (precious / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious", "wide"]


def test_exit_status_from_the_shell(workspace, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "eval.merge",
            *merge_args(workspace, tmp_path / "merged"),
            "--adapter",
            str(tmp_path / "missing"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: adapter directory {tmp_path / 'missing'} does not exist"
    ]
    assert not (tmp_path / "merged").exists()


def test_refuses_to_merge_into_a_tied_weight(tmp_path, capsys):
    # lm_head shares the embedding matrix: adding B A to it would change the embeddings too.
    config = tiny_llama_config(tie_word_embeddings=True)
    build_random_llama(config, seed=0).save_pretrained(tmp_path / "base")
    model = build_random_llama(config, seed=0)
    modules = inject_gated_lora(model, 2, target_modules=["lm_head"])
    randomise_adapters(modules, 1, scale=0.3)
    write_peft_adapter(
        adapter_tensors_from_model(model), tmp_path / "adapter", base_model_name_or_path=None
    )
    args = [
        "--model_name_or_path",
        str(tmp_path / "base"),
        "--adapter",
        str(tmp_path / "adapter"),
        "--output_dir",
        str(tmp_path / "merged"),
    ]
    code, _, err = run_main(args, capsys)
    assert code == 2
    assert re.fullmatch(
        r"error: .*adapter: module lm_head shares its weight with "
        r"(lm_head.weight, model.embed_tokens.weight|model.embed_tokens.weight, lm_head.weight): "
        r"merging would change both",
        err,
    ), err
    assert not (tmp_path / "merged").exists()
