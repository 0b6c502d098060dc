"""launch.estimate reads a recipe and a ds config as training does, takes the training option
names, and says that the peak is the larger of a training step and a scoring round; so its
figure for each recipe is the one the recipe's header states."""

from __future__ import annotations

import json
import re

import pytest

from alora_ds.errors import run_cli
from launch import estimate as E
from tests.helpers import REPO, recipe_estimate

RECIPES = sorted((REPO / "configs").glob("llama2-*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_the_recipe_header_is_what_the_estimate_of_the_recipe_says(recipe, capsys):
    argv, stated = recipe_estimate(recipe)
    assert argv[:2] == ["--config", f"configs/{recipe.name}"]  # the recipe itself, not a copy
    assert run_cli(E.main, argv) == 0
    table = capsys.readouterr().out
    run = re.search(r"This run \(gradient checkpointing (on|off)\): ([\d.]+) GB per GPU, set by "
                    r"(a training step|a scoring round) \(training step ([\d.]+), scoring round "
                    r"([\d.]+)\)\.", table)  # fmt: skip
    assert run, table
    assert run.group(2) == stated
    assert float(run.group(2)) == max(float(run.group(4)), float(run.group(5)))
    assert "The peak per GPU is the larger of a training step's and a scoring round's" in table


def test_the_70b_figure_comes_from_the_recipe_and_the_defaults_are_said(tmp_path, capsys):
    recipe = str(REPO / "configs" / "llama2-70b-alora.yaml")
    out = tmp_path / "e.json"
    argv = ["--config", recipe, "--ds_config", "zero3_offload_bf16.json", "--json", str(out)]
    assert run_cli(E.main, argv) == 0
    data = json.loads(out.read_text())
    resolved = data["arguments"]
    # From the recipe (its training names) and from the ds config (the engine's settings).
    assert (resolved["seq_len"], resolved["micro_batch"], resolved["scoring_rows"]) == (2048, 1, 1)
    assert resolved["gradient_checkpointing"] is True and resolved["rank_budget"] == 4480
    assert (resolved["zero_stage"], resolved["dtype"], resolved["offload"]) == (3, "bf16", True)
    assert f"{data['bytes']['peak_checkpointed'] / 1e9:.1f}" == "18.7"
    capsys.readouterr()
    # The command line wins, under the training name or the estimator's own.
    assert run_cli(E.main, [*argv[:4], "--max_seq_length", "1024", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["arguments"]["seq_len"] == 1024
    capsys.readouterr()
    # Without the recipe and ds config: the estimator's defaults, which the README states.
    assert run_cli(E.main, ["--model_name_or_path", "meta-llama/Llama-2-70b-hf"]) == 0
    table = capsys.readouterr().out
    default_peak = re.search(r"^peak per GPU +([\d.]+)$", table, re.MULTILINE).group(1)
    readme = " ".join((REPO / "README.md").read_text().split())
    assert f"for 70B on 8 GPUs that is {float(default_peak):.1f} GB per GPU" in readme


def test_bad_recipe_input_is_one_line(tmp_path, capsys):
    half = tmp_path / "half_offload.json"
    half.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}))  # fmt: skip
    cases = [
        (["--config", str(tmp_path / "none.yaml")], r"config file .*none\.yaml does not exist"),
        (["--ds_config", "zero3.json"], r"give --model_name_or_path, or a --config recipe"),
        (["--model_name_or_path", "meta-llama/Llama-2-7b-hf", "--ds_config", str(half)],
         r"only offload_optimizer is offloaded"),
        (["--model_name_or_path", "meta-llama/Llama-2-7b-hf", "--gradient_checkpointing", "maybe"],
         r"argument --gradient_checkpointing: not a bool: 'maybe'"),
    ]  # fmt: skip
    for argv, pattern in cases:
        assert run_cli(E.main, argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(pattern, err), err
