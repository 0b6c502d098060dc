"""A user's first run, read from the outside: what it says at start (the cost of a scoring round,
then its estimated time), what it leaves behind (train.log, loss.png, heatmaps on one scale,
files the umask allows teammates to read), and the rank budgets it refuses."""

from __future__ import annotations

import os
import re
import stat

import pytest
import torch

from alora_ds.config import parse_args
from alora_ds.errors import run_cli
from alora_ds.io import pretrained
from alora_ds.io.models import TINY_LLAMA_CONFIG, build_random_llama, read_model_config
from alora_ds.io.tasks import build_tiny_tokenizer
from alora_ds.runtime import process as P
from launch import train
from launch.prepare import prepare
from tests.helpers import REPO

RUN = "alora-1p"  # python launch/train.py, ZeRO-3, the tiny LLaMA: 14 modules x r_init 2


def log_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.strip()]


def test_the_start_says_what_a_scoring_round_costs(golden_run):
    output_dir, result = golden_run(RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    # Counted on the model before it loads: 28 ranks, one chunk of |B_val| = 8; the fast path
    # runs 2 prefix passes and 8 candidate blocks, the work of 38 forwards of B_val where the
    # naive path runs 58 (2 + 2 x 28).
    assert (
        "scoring (fast): each round scores 28 ranks on 8 dev examples (1 chunk); per process "
        "10 forwards, the work of 38.0 forwards of B_val (naive: 58.0)"
    ) in result.stdout
    # After the first steps: the round's time, in seconds and in training steps, said once and
    # before the first round.
    estimates = [line for line in log_lines(result.stdout) if line.startswith("scoring estimate")]
    assert len(estimates) == 1, estimates
    match = re.fullmatch(
        r"scoring estimate: a round takes about ([\d.]+) s, the time of ([\d.]+) training steps "
        r"\(steps 2-4: ([\d.]+) s each; a forward of 8 dev rows [\d.]+ s, of 64 [\d.]+ s\)",
        estimates[0],
    )
    assert match, estimates[0]
    seconds, steps, step_s = map(float, match.groups())
    # steps = seconds / step_s, within what the printed roundings allow
    assert seconds > 0 and abs(steps * step_s - seconds) <= 0.05 + 0.005 * steps + 0.05 * step_s
    lines = log_lines(result.stdout)
    first_round = next(i for i, line in enumerate(lines) if line.startswith("round 1:"))
    assert lines.index(estimates[0]) < first_round


def test_the_run_leaves_its_log_and_pictures(golden_run):
    output_dir, result = golden_run(RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = (output_dir / "train.log").read_text().splitlines()
    # Every log line the main process printed, in order, and nothing else.
    assert logged == [line for line in result.stdout.splitlines() if line in set(logged)]
    assert logged[0].startswith("alora-ds: alora on sst2, 1 process(es)")
    assert logged[-1].startswith(f"outputs in {output_dir}: ") and "train.log" in logged[-1]
    assert any(line.startswith("round 2:") for line in logged)
    png = b"\x89PNG\r\n\x1a\n"
    for picture in ("loss.png", "ranks.png", "allocation/ranks_round_01.png",
                    "allocation/ranks_round_02.png"):  # fmt: skip
        assert (output_dir / picture).read_bytes()[:8] == png, picture


def test_written_files_get_the_umask_permissions(golden_run):
    """Adapters, checkpoints and json files are readable by teammates on a shared file system:
    what the umask allows (0644 files, 0755 directories under umask 022), not 0600 / 0700."""
    output_dir, result = golden_run(RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    umask = os.umask(0)
    os.umask(umask)  # the run inherited this process's umask
    paths = [
        output_dir / "config.json", output_dir / "summary.json", output_dir / "train.log",
        output_dir / "adapter", output_dir / "adapter" / "adapter_model.safetensors",
        output_dir / "adapter" / "adapter_config.json", output_dir / "adapter_portable",
        output_dir / "allocation" / "round_01.json", output_dir / "allocation" / "lora_config.json",
        output_dir / "checkpoints", *sorted((output_dir / "checkpoints").glob("step_*")),
        *sorted((output_dir / "checkpoints").glob("step_*/*")),
    ]  # fmt: skip
    assert len(paths) > 12
    for path in paths:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, (path, oct(path.stat().st_mode))
    if umask == 0o022:
        assert stat.S_IMODE((output_dir / "adapter").stat().st_mode) == 0o755
        assert stat.S_IMODE((output_dir / "config.json").stat().st_mode) == 0o644


class Started(Exception):
    """Raised in place of init_distributed: the input was accepted."""


def start_nothing(*args, **kwargs):
    raise Started


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # 14 modules x r_init 72: k_proj maps 64 -> 32 (2 KV heads of 16), so at most 32 ranks.
        (["--rank_budget", "1008"],
         "--rank_budget 1008 starts every one of the 14 adapted modules at r_init = 72, above what "
         "model.layers.0.self_attn.k_proj can use (64 -> 32: at most min(d_in, d_out) = 32 ranks); "
         "the most this model takes is --rank_budget 448"),
        (["--rank_budget", "100002"], "at r_init = 7143, above what"),
        # SoRA starts at twice the budget: 2 x 252 / 14 = 36 > 32.
        (["--rank_budget", "252", "--method", "sora"],
         "at r_init = 36 (the method starts at 2 x the budget), above what "
         "model.layers.0.self_attn.k_proj can use (64 -> 32: at most min(d_in, d_out) = 32 "
         "ranks); the most this model takes is --rank_budget 224"),
    ],
)  # fmt: skip
def test_a_budget_above_what_the_modules_can_use_is_refused(args, message, tmp_path, monkeypatch,
                                                            capsys):  # fmt: skip
    monkeypatch.setattr(P, "init_distributed", start_nothing)
    argv = ["--ds_config", str(REPO / "ds_configs" / "zero3.json"),
            "--output_dir", str(tmp_path / "run"), *args]  # fmt: skip
    assert run_cli(train.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "run").exists()
    # The largest budget it names is taken.
    largest = re.search(r"takes is --rank_budget (\d+)", err[0]).group(1)
    with pytest.raises(Started):
        train.main([*argv[:4], *args[2:], "--rank_budget", largest])


def test_the_smollm2_alias_says_where_its_checkpoint_is(tmp_path, monkeypatch):
    # A cache where `smollm2` was converted before (a tiny LLaMA stands in for the 135M model,
    # whose conversion tests/io/test_pretrained.py runs).
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path / "cache"))
    converted = tmp_path / "cache" / pretrained.SMOLLM2_DIR_NAME
    build_tiny_tokenizer(converted)
    build_random_llama(read_model_config(TINY_LLAMA_CONFIG), seed=0).save_pretrained(converted)
    cfg = parse_args(["--ds_config", str(REPO / "ds_configs" / "zero3.json"), "--output_dir",
                      str(tmp_path / "run"), "--model_name_or_path", "smollm2"])  # fmt: skip
    setup = prepare(cfg)
    assert setup.cfg.model_name_or_path == str(converted)  # what config.json will record
    assert setup.banner(1, "gloo", torch.float32)[0] == (
        f"model 'smollm2': the converted checkpoint in {converted} (converted once; "
        "ALORA_DS_CACHE moves it)"
    )
