"""bench/real.py at a smoke size: the embedded tiny LLaMA, ALoRA for a few steps with two rounds,
on data the fetch script writes from the committed VADER excerpt; every test set scored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alora_ds.config import TrainConfig
from alora_ds.errors import run_cli
from tests.helpers import RANK_COSTS, REPO, load_script, vader_sdist

real = load_script("bench_real", REPO / "bench" / "real.py")
fetch = load_script("fetch_rotten_tomatoes", REPO / "scripts" / "fetch_rotten_tomatoes.py")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The fetch script's output for the excerpt: 24 train, 6 dev, 7 test sentences."""
    root = tmp_path_factory.mktemp("rt")
    sdist = vader_sdist(root / fetch.SDIST_NAME, fetch.ARCHIVE)
    argv = ["--sdist", str(sdist), "--no_hash_check", "--out", str(root / "data"), "--train",
            "24", "--dev", "6"]  # fmt: skip
    assert fetch.main(argv) == 0
    return root / "data"


def test_smoke_run_scores_every_test_set_and_is_reused(data_dir, tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "real.json"
    argv = ["--model_name_or_path", "tiny", "--data_dir", str(data_dir), "--work_dir", str(work),
            "--methods", "alora", "--seeds", "1", "--train_rows", "24", "--steps", "6",
            "--batch", "4", "--initial_steps", "3", "--round_steps", "1", "--test_rows", "5",
            "--ood_rows", "4", "--json", str(out)]  # fmt: skip
    assert real.main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["size"] == "cpu" and result["settings"]["steps"] == 6
    assert result["sentences"] == {"train": 24, "dev": 6, "rt": 5, "tweets": 4, "nyt": 4,
                                   "amazon": 4}  # fmt: skip
    (row,) = result["rows"]
    assert row["method"] == "alora" and row["scoring"] == TrainConfig().scoring
    assert set(row["accuracy"]) == set(real.TEST_SETS)
    run = work / "seed0" / "alora"
    for key, count in (("rt", 5), ("amazon", 4)):
        metrics = json.loads((run / "eval" / key / "metrics.json").read_text())
        assert metrics["counts"]["examples"] == count
        assert metrics["decoding"]["mode"] == "greedy"
        assert row["accuracy"][key] == round(metrics["accuracy"], 2)
    assert len(list((run / "allocation").glob("round_*.json"))) == 2
    # ALoRA exports the adapters it trains: the merged export has the trainer's dev loss.
    assert row["exported_dev_loss"] == pytest.approx(row["dev_loss"], rel=1e-4)
    # 120 ranks over q_proj and v_proj of the tiny LLaMA's 2 layers: r_init 30.
    assert row["adapter_params_start"] == 2 * 30 * (RANK_COSTS["q_proj"] + RANK_COSTS["v_proj"])
    assert row["adapter_params_peak"] >= max(row["adapter_params_start"], row["adapter_params_end"])
    assert "| alora | 1 |" in printed

    # Started again with the same settings, the finished run is reused, not trained again.
    log = work / "seed0" / "alora.log"
    stamp = log.stat().st_mtime_ns
    assert real.main(argv) == 0
    assert log.stat().st_mtime_ns == stamp
    assert json.loads(out.read_text())["rows"] == [row]


def test_missing_data_names_the_fetch_script(tmp_path, capsys):
    argv = ["--data_dir", str(tmp_path), "--work_dir", str(tmp_path / "w"), "--methods", "lora",
            "--model_name_or_path", "tiny"]  # fmt: skip
    assert run_cli(real.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --data_dir ") and "scripts/fetch_rotten_tomatoes.py" in err
    assert len(err.splitlines()) == 1
