"""bench/planted.py: the pattern file, Spearman's rho, and a small run through the real trainer."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from alora_ds.errors import InputError, run_cli
from alora_ds.scoring.screened import average_ranks
from tests.helpers import REPO

_spec = importlib.util.spec_from_file_location("bench_planted", REPO / "bench" / "planted.py")
planted = importlib.util.module_from_spec(_spec)
sys.modules["bench_planted"] = planted  # dataclasses look their module up while the file runs
_spec.loader.exec_module(planted)

TINY = planted.ModelSize(
    layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=128, seq_len=16, init_std=0.3
)
O_PROJ_1 = "model.layers.1.self_attn.o_proj"


def write_pattern(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pattern.json"
    path.write_text(text)
    return path


# ---- Spearman ------------------------------------------------------------------------------


def test_average_ranks_share_ties():
    assert average_ranks([10, 20, 20, 30]) == [1.0, 2.5, 2.5, 4.0]
    assert average_ranks([3, 1, 3, 3]) == [3.0, 1.0, 3.0, 3.0]


def test_spearman_pinned_values():
    # Monotone but not linear: rho is exactly +-1.
    assert planted.spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)
    assert planted.spearman([1, 2, 3, 4], [16, 9, 4, 1]) == pytest.approx(-1.0)
    # With ties in y (ranks 1, 2, 3.5, 5, 3.5): 8 / sqrt(10 * 9.5) = 0.8207826816681233.
    assert planted.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(0.8207826816681233)
    # Planted (0, 0, 4, 4) against found (1, 2, 3, 2): ranks (1.5, 1.5, 3.5, 3.5) and
    # (1, 2.5, 4, 2.5), 3 / sqrt(4 * 4.5) = 1 / sqrt(2).
    assert planted.spearman([0, 0, 4, 4], [1, 2, 3, 2]) == pytest.approx(0.5**0.5)


def test_spearman_is_undefined_for_a_constant_side():
    assert planted.spearman([2, 2, 2, 2], [0, 0, 8, 8]) is None  # uniform LoRA
    assert planted.spearman([1, 2, 3], [5, 5, 5]) is None
    assert planted.spearman([1], [2]) is None
    with pytest.raises(ValueError, match="equal lengths"):
        planted.spearman([1, 2], [1, 2, 3])


# ---- the pattern file ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("{", r"pattern file .*pattern\.json is not valid JSON: .* at line 1"),
        ("[1, 2]", r"pattern file .*pattern\.json: expected a non-empty JSON object"),
        ("{}", r"pattern file .*pattern\.json: expected a non-empty JSON object"),
        ('{"layers\\\\.(0": 4}', r"entry 'layers\\\\.\(0' is not a valid regular expression"),
        ('{"q_proj": 0}', r"entry 'q_proj' has rank 0; a rank must be a positive integer"),
        ('{"q_proj": -2}', r"entry 'q_proj' has rank -2"),
        ('{"q_proj": "4"}', r"entry 'q_proj' has rank '4'"),
        ('{"q_proj": true}', r"entry 'q_proj' has rank True"),
        ('{"q_proj": 2.5}', r"entry 'q_proj' has rank 2.5"),
    ],
)
def test_bad_pattern_files(tmp_path, text, message):
    with pytest.raises(InputError, match=message) as info:
        planted.load_pattern(write_pattern(tmp_path, text))
    assert "\n" not in str(info.value)


def test_missing_pattern_file(tmp_path):
    with pytest.raises(InputError, match=r"pattern file .*nope\.json does not exist"):
        planted.load_pattern(tmp_path / "nope.json")


@pytest.mark.parametrize(
    "pattern, message",
    [
        ({"lm_head": 2}, r"pattern file P: entry 'lm_head' matches no adapted module \(14 modules"),
        ({"layers\\.7\\.": 2}, r"entry 'layers\\\\.7\\\\.' matches no adapted module"),
        (
            {"layers\\.0\\.self_attn": 2, "q_proj": 4},
            r"module model\.layers\.0\.self_attn\.q_proj is matched by both "
            r"'layers\\\\.0\\\\.self_attn' and 'q_proj'",
        ),
        ({"k_proj": 33}, r"entry 'k_proj' plants rank 33 in model\.layers\.0\.self_attn\.k_proj, "
                         r"above its min\(d_in, d_out\) = 32"),
    ],
)  # fmt: skip
def test_patterns_that_do_not_fit_the_model(pattern, message):
    with pytest.raises(InputError, match=message):
        planted.planted_ranks(pattern, planted.module_shapes(TINY), "P")


def test_planted_ranks_search_the_full_name():
    ranks = planted.planted_ranks(
        {"layers\\.1\\.self_attn\\.o_proj": 8, "layers\\.0\\.mlp\\.(up|down)_proj": 3},
        planted.module_shapes(TINY),
        "P",
    )
    assert len(ranks) == 14
    assert {n: r for n, r in ranks.items() if r} == {
        O_PROJ_1: 8,
        "model.layers.0.mlp.up_proj": 3,
        "model.layers.0.mlp.down_proj": 3,
    }


def test_cli_reports_a_bad_pattern_in_one_line(tmp_path, capsys):
    path = write_pattern(tmp_path, '{"v_proj": 2, "nothing_here": 1}')
    assert run_cli(planted.main, ["--pattern", str(path), "--work_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"error: pattern file {path}: entry 'nothing_here' matches no adapted module" in err


def test_budget_must_divide_over_the_modules(tmp_path):
    path = write_pattern(tmp_path, '{"v_proj": 2}')
    with pytest.raises(InputError, match=r"rank_budget 30 does not divide evenly over 28"):
        planted.run_benchmark(planted.parse_args(["--pattern", str(path), "--budget", "30"]))


# ---- a small run through launch/train.py ---------------------------------------------------------


def test_alora_moves_ranks_to_the_one_planted_module(tmp_path):
    """One o_proj carries a large planted delta: ALoRA must end with more ranks there than its
    initial share (lora's fixed rank), and the rows and table must be complete."""
    pattern = write_pattern(tmp_path, json.dumps({"layers\\.1\\.self_attn\\.o_proj": 32}))
    rows_file = tmp_path / "rows.json"
    argv = [
        "--pattern", str(pattern), "--budget", "28", "--methods", "lora,alora", "--seeds", "1",
        "--layers", "2", "--seq_len", "16", "--steps", "60", "--batch_size", "16",
        "--initial_steps", "20", "--round_steps", "10", "--rounds", "3", "--prune_per_round", "4",
        "--val_examples", "16", "--dev_sequences", "16", "--heldout_sequences", "64",
        "--work_dir", str(tmp_path / "work"), "--json", str(rows_file),
    ]  # fmt: skip
    assert planted.main(argv) == 0
    rows = {row["method"]: row for row in json.loads(rows_file.read_text())}
    assert list(rows) == ["lora", "alora"]
    assert all(list(row) == list(planted.ROW_KEYS) and row["seed"] == 0 for row in rows.values())
    for row in rows.values():
        assert 0 < row["heldout_loss"] < 10
        assert row["adapter_params"] > 0 and row["peak_mem_mb"] > 0 and row["wall_s"] > 0

    modules = list(planted.module_shapes(TINY))
    run_dir = tmp_path / "work" / "seed0"
    lora = planted.final_ranks(run_dir / "lora" / "adapter", modules)
    alora = planted.final_ranks(run_dir / "alora" / "adapter", modules)
    assert set(lora.values()) == {2} and rows["lora"]["spearman"] is None  # uniform: undefined
    assert alora[O_PROJ_1] > lora[O_PROJ_1], alora
    assert alora[O_PROJ_1] == max(alora.values()), alora
    assert rows["alora"]["spearman"] > 0


def test_a_method_the_trainer_refuses_is_reported_not_fatal(tmp_path, capsys):
    pattern = write_pattern(tmp_path, json.dumps({"layers\\.1\\.self_attn\\.o_proj": 8}))
    argv = [
        "--pattern", str(pattern), "--budget", "28", "--methods", "no-such-method", "--seeds",
        "1", "--layers", "2", "--seq_len", "8", "--steps", "2", "--dev_sequences", "32",
        "--heldout_sequences", "8", "--work_dir", str(tmp_path / "work"),
    ]  # fmt: skip
    assert planted.main(argv) == 1
    out = capsys.readouterr().out
    assert "no-such-method: train.py refused it: --method 'no-such-method' is not one of" in out
