"""Every shipped config parses and resolves: the recipes in configs/ and the engine settings in
ds_configs/, paired the way a launch pairs them."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from alora_ds.config import load_ds_config, parse_args, resolve_batch_sizes, resolve_ds_config
from tests.helpers import REPO

RECIPES = sorted((REPO / "configs").glob("*.yaml"))
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))


def test_there_is_something_to_check():
    names = {p.name for p in RECIPES}
    assert {
        "demo.yaml",
        "llama2-7b-alora.yaml",
        "llama2-13b-alora.yaml",
        "llama2-70b-alora.yaml",
    } <= names
    assert {"zero3.json", "zero3_offload.json"} <= {p.name for p in DS_CONFIGS}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
@pytest.mark.parametrize("ds_path", DS_CONFIGS, ids=lambda p: p.name)
def test_recipe_resolves_with_every_ds_config(recipe, ds_path):
    cfg = parse_args(
        ["--config", str(recipe), "--output_dir", "unused", "--ds_config", str(ds_path)]
    )
    for world_size in (1, 8, 16):
        resolved = resolve_batch_sizes(load_ds_config(str(ds_path)), cfg, world_size, str(ds_path))
        micro, accumulation = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
        assert resolved["train_batch_size"] == micro * accumulation * world_size


@pytest.mark.parametrize(
    "recipe", [p for p in RECIPES if p.name.startswith("llama2-")], ids=lambda p: p.name
)
def test_llama2_recipes_carry_the_papers_settings(recipe):
    cfg = parse_args(["--config", str(recipe), "--output_dir", "unused", "--ds_config", "unused"])
    size = re.search(r"llama2-(\d+b)", recipe.name).group(1)
    assert cfg.model_name_or_path == f"meta-llama/Llama-2-{size}-hf"
    assert cfg.learning_rate == 1e-4 and cfg.warmup_ratio == 0.06 and cfg.max_seq_length == 2048
    assert len(cfg.target_modules) == 7
    layers = {"7b": 32, "13b": 40, "70b": 80}[size]
    assert cfg.rank_budget == 8 * 7 * layers  # r_init = 8
    assert (cfg.initial_epochs, cfg.round_epochs, cfg.num_rounds) == (1, 0.25, 8)
    assert (cfg.prune_per_round, cfg.val_examples) == (7, 32)
    # The header gives the launch commands, the GPU count and the memory per GPU.
    header = recipe.read_text()
    assert "launch/train.py" in header and "sbatch" in header and "GB" in header
    # The global batch the header states is the one the file configures.
    stated = re.search(r"Global batch (\d+) x (\d+) accumulation x (\d+) GPUs = (\d+)", header)
    micro, accumulation, gpus, total = map(int, stated.groups())
    assert (micro, accumulation) == (
        cfg.per_device_train_batch_size,
        cfg.gradient_accumulation_steps,
    )
    assert micro * accumulation * gpus == total == 128


@pytest.mark.parametrize(
    "recipe", [p for p in RECIPES if p.name.startswith("llama2-")], ids=lambda p: p.name
)
def test_stated_memory_is_the_estimators(recipe, tmp_path):
    """The header's "Memory per GPU from `python -m launch.estimate ...`: N GB" is what that
    command computes today (the peak, without gradient checkpointing unless the recipe has it)."""
    from launch import estimate

    comments = " ".join(
        line.lstrip("# ").strip()
        for line in recipe.read_text().splitlines()
        if line.startswith("#")
    )
    match = re.search(r"`python -m launch\.estimate ([^`]+)`: ([\d.]+) GB", comments)
    assert match, recipe.name
    out = tmp_path / "estimate.json"
    assert estimate.main([*match.group(1).split(), "--json", str(out)]) == 0
    numbers = json.loads(out.read_text())["bytes"]
    cfg = parse_args(["--config", str(recipe), "--output_dir", "unused", "--ds_config", "unused"])
    args = json.loads(out.read_text())["arguments"]
    assert args["micro_batch"] == cfg.per_device_train_batch_size
    assert args["scoring_rows"] == cfg.scoring_batch_size
    assert args["seq_len"] == cfg.max_seq_length
    peak = numbers["peak_checkpointed" if cfg.gradient_checkpointing else "peak"]
    assert f"{peak / 1e9:.1f}" == match.group(2)


def test_recipes_hold_only_known_keys():
    # parse_args already refuses unknown keys; this names the file if a recipe is not a mapping.
    for recipe in RECIPES:
        assert isinstance(yaml.safe_load(recipe.read_text()), dict), recipe.name


def test_a_bare_ds_config_name_is_one_of_the_shipped_ones(tmp_path, monkeypatch):
    # The card's command, `--ds_config zero3.json`, from a directory that has no such file.
    monkeypatch.chdir(tmp_path)
    assert resolve_ds_config("zero3.json") == str(REPO / "ds_configs" / "zero3.json")
    assert load_ds_config(resolve_ds_config("zero3.json"))["zero_optimization"]["stage"] == 3
    # A file that is there wins; a path with a directory part is never rewritten.
    (tmp_path / "zero3.json").write_text("{}")
    assert resolve_ds_config("zero3.json") == "zero3.json"
    assert resolve_ds_config("configs/zero3.json") == "configs/zero3.json"
    with pytest.raises(ValueError, match=r"ds config configs/zero3\.json does not exist"):
        load_ds_config(resolve_ds_config("configs/zero3.json"))
    shipped = r"zero2\.json, zero3\.json, zero3_bf16\.json"
    with pytest.raises(ValueError, match=rf"ds config zero4\.json does not exist, here or in .*ds_configs \(which holds: {shipped}"):  # fmt: skip
        resolve_ds_config("zero4.json")
