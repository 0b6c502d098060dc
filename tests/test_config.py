"""Every shipped config parses and resolves: the recipes in configs/ and the engine settings in
ds_configs/, paired the way a launch pairs them."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from alora_ds.config import load_ds_config, parse_args, resolve_batch_sizes, resolve_ds_config
from alora_ds.errors import InputError
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


# The batch each recipe is sized for (its header's layout), computed by hand: micro batch x
# accumulation x processes.
RECIPE_BATCHES = {
    "demo.yaml": (2, {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                      "train_batch_size": 8}),  # 4 x 1 x 2
    "llama2-7b-alora.yaml": (8, {"train_micro_batch_size_per_gpu": 2,
                                 "gradient_accumulation_steps": 8,
                                 "train_batch_size": 128}),  # 2 x 8 x 8
    "llama2-13b-alora.yaml": (16, {"train_micro_batch_size_per_gpu": 2,
                                   "gradient_accumulation_steps": 4,
                                   "train_batch_size": 128}),  # 2 x 4 x 16
    "llama2-70b-alora.yaml": (8, {"train_micro_batch_size_per_gpu": 1,
                                  "gradient_accumulation_steps": 16,
                                  "train_batch_size": 128}),  # 1 x 16 x 8
}  # fmt: skip
BATCH_FIELDS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def test_every_recipe_is_sized():
    assert {p.name for p in RECIPES} == set(RECIPE_BATCHES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_shipped_ds_configs_take_the_batch_from_the_recipe(recipe):
    """Every shipped ds config leaves its batch fields "auto"; with the recipe on the process
    count it is sized for, they resolve to the hand-computed numbers."""
    world_size, expected = RECIPE_BATCHES[recipe.name]
    for ds_path in DS_CONFIGS:
        ds = load_ds_config(str(ds_path))
        assert {ds[key] for key in BATCH_FIELDS} == {"auto"}, ds_path.name
        cfg = parse_args(
            ["--config", str(recipe), "--output_dir", "unused", "--ds_config", str(ds_path)]
        )
        resolved = resolve_batch_sizes(ds, cfg, world_size, str(ds_path))
        assert {key: resolved[key] for key in BATCH_FIELDS} == expected, ds_path.name
        # Everything else in the ds config is left as it was.
        assert {k: v for k, v in resolved.items() if k not in BATCH_FIELDS} == {
            k: v for k, v in ds.items() if k not in BATCH_FIELDS
        }


def run_config(micro: int, accumulation: int):
    return parse_args(["--output_dir", "x", "--ds_config", "d", "--per_device_train_batch_size",
                       str(micro), "--gradient_accumulation_steps", str(accumulation)])  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "micro", "accumulation", "world_size", "expected"),
    [
        # every field given, and they agree: 4 x 2 x 4 = 32
        ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
          "train_batch_size": 32}, 4, 2, 4, (4, 2, 32)),
        # the global batch given, the rest "auto": 3 x 4 x 2 = 24
        ({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "train_batch_size": 24}, 3, 4, 2, (3, 4, 24)),
        # the micro batch given, the rest missing (missing means "auto"): 8 x 1 x 3 = 24
        ({"train_micro_batch_size_per_gpu": 8}, 8, 1, 3, (8, 1, 24)),
        # nothing given: 2 x 16 x 1 = 32
        ({}, 2, 16, 1, (2, 16, 32)),
    ],
)  # fmt: skip
def test_explicit_batch_fields_that_agree(fields, micro, accumulation, world_size, expected):
    resolved = resolve_batch_sizes(fields, run_config(micro, accumulation), world_size, "ds.json")
    assert tuple(resolved[key] for key in BATCH_FIELDS) == expected


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"train_batch_size": 16},
         "train_batch_size = 16 but the run has train_batch_size = 24 (micro batch 4 x "
         "accumulation 3 x 2 processes = 24)"),
        ({"train_micro_batch_size_per_gpu": 8, "train_batch_size": 24},
         "train_micro_batch_size_per_gpu = 8 but the run has train_micro_batch_size_per_gpu = 4"),
        ({"gradient_accumulation_steps": 6, "train_batch_size": "auto"},
         "gradient_accumulation_steps = 6 but the run has gradient_accumulation_steps = 3"),
        # a product that agrees does not excuse a field that does not
        ({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 6,
          "train_batch_size": 24},
         "train_micro_batch_size_per_gpu = 2 but the run has train_micro_batch_size_per_gpu = 4"),
    ],
)  # fmt: skip
def test_conflicting_batch_fields_are_one_error_naming_the_field(fields, message):
    with pytest.raises(InputError) as raised:
        resolve_batch_sizes(fields, run_config(4, 3), 2, "ds.json")
    assert str(raised.value).startswith(f"ds config ds.json: {message}")
    assert str(raised.value).endswith('set it to "auto" or make them agree')


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
