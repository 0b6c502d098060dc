"""Metric sinks, progress bars and library noise (alora_ds/report/tracking.py)."""

from __future__ import annotations

import json
import logging
import socket
import sys
import warnings

import pytest
import torch
import torch.distributed as dist

from alora_ds.errors import InputError
from alora_ds.report.tracking import (
    MetricsSink,
    ScoringProgress,
    TrainProgress,
    check_report_to,
    print_line,
    quiet_library_noise,
)

RECORDS = [
    {"step": 1, "epoch": 0.5, "loss": 2.5, "lr": 1e-3, "tokens_per_s": 120.0},
    {"step": 2, "epoch": 1.0, "loss": 2.25, "lr": 5e-4, "tokens_per_s": 130.0, "dev_loss": 2.0},
    {"step": 3, "epoch": 1.5, "loss": 2.0, "lr": 2.5e-4, "tokens_per_s": 90.5, "round": 1,
     "pruned": 7, "note": "not a number", "skipped": True},
]  # fmt: skip


def log_all(sink: MetricsSink) -> None:
    for record in RECORDS:
        sink.log(record, step=record["step"])


def test_metrics_jsonl_holds_one_json_object_per_line(tmp_path):
    with MetricsSink(tmp_path / "run", is_main=True, report_to=["none"]) as sink:
        log_all(sink)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == RECORDS
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_tensorboard_scalars_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsSink(tmp_path, is_main=True, report_to=["tensorboard"]) as sink:
        log_all(sink)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    # Every numeric value but the step, under its own key; strings and bools are left out.
    assert tags == {"epoch", "loss", "lr", "tokens_per_s", "dev_loss", "round", "pruned"}
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([2.5, 2.25, 2.0])
    assert [(e.step, e.value) for e in events.Scalars("dev_loss")] == [(2, 2.0)]
    assert [e.value for e in events.Scalars("lr")] == pytest.approx([1e-3, 5e-4, 2.5e-4])
    assert [(e.step, e.value) for e in events.Scalars("pruned")] == [(3, 7.0)]


def test_a_resumed_run_replaces_the_steps_logged_after_its_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsSink(tmp_path, is_main=True) as sink:
        log_all(sink)  # steps 1-3; the checkpoint was at step 1
    with MetricsSink(tmp_path, is_main=True, resume_step=1) as sink:
        sink.log({"step": 2, "loss": 9.0}, step=2)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.5), (2, 9.0)]


def test_off_the_main_process_nothing_is_written(tmp_path):
    with MetricsSink(tmp_path / "run", is_main=False, report_to=["tensorboard"]) as sink:
        log_all(sink)
    assert not (tmp_path / "run").exists()


def test_wandb_asked_but_not_installed_fails_at_construction(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    for is_main in (True, False):  # every process stops, not only the one that would log
        with pytest.raises(InputError, match=r"^report_to wandb needs the wandb package"):
            MetricsSink(tmp_path / "run", is_main=is_main, report_to=["tensorboard", "wandb"])
    assert not (tmp_path / "run").exists()


def test_unknown_sink_is_an_error():
    with pytest.raises(InputError, match="report_to mlflow is not one of tensorboard, wandb"):
        check_report_to(["mlflow"])


def test_wandb_offline_run_gets_the_values(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # never the network
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    logged = []
    sink = MetricsSink(
        tmp_path / "run", is_main=True, report_to=["wandb"], run_config={"lora_alpha": 8}
    )
    run = sink._wandb
    real_log = run.log
    monkeypatch.setattr(run, "log", lambda data, step: (logged.append((step, data)), real_log(data, step=step)))  # fmt: skip
    assert run.project == "alora-ds"  # unless WANDB_PROJECT says otherwise
    with sink:
        log_all(sink)
        assert run.config["lora_alpha"] == 8
        assert run.summary["dev_loss"] == 2.0  # W&B holds a step's row until the next step
    assert [step for step, _ in logged] == [1, 2, 3]
    assert logged[1][1] == {"epoch": 1.0, "loss": 2.25, "lr": 5e-4, "tokens_per_s": 130.0,
                            "dev_loss": 2.0}  # fmt: skip
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3


def test_wandb_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    import wandb

    def refuse(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty). call wandb.login(key=...)")

    monkeypatch.setattr(wandb, "init", refuse)
    with pytest.raises(InputError, match=r"^cannot start Weights & Biases: api_key not configured"):
        MetricsSink(tmp_path, is_main=True, report_to=["tensorboard", "wandb"])
    assert not (tmp_path / "tensorboard").exists()


# ---- progress bars ------------------------------------------------------------------------------


@pytest.mark.parametrize(("is_main", "progress_bar"), [(False, True), (True, False)])
def test_bars_are_off_the_main_process_and_when_not_asked(is_main, progress_bar, capsys):
    enabled = is_main and progress_bar  # what train.py passes
    with TrainProgress(10, enabled=enabled) as bar:
        bar.update(1, loss=2.0, lr=1e-3, tokens_per_s=100.0)
        with ScoringProgress(8, enabled=enabled, round_index=1) as scoring:
            scoring(8)
        assert not bar.enabled and not scoring.enabled
    assert capsys.readouterr().err == ""


def test_train_bar_shows_loss_lr_tokens_and_eta(capsys):
    with TrainProgress(10, enabled=True, initial=2) as bar:
        bar.update(3, loss=2.5, lr=1e-3, tokens_per_s=1234.0)
        bar.update(5, loss=2.25, lr=5e-4, tokens_per_s=1500.0)
        assert bar.bar.n == 5
        bar.bar.refresh()
    err = capsys.readouterr().err
    assert "5/10" in err
    assert "loss=2.2500" in err and "lr=5.00e-04" in err and "tok/s=1,500" in err
    assert "<" in err  # tqdm's elapsed<remaining


def test_log_lines_printed_between_updates_stay_whole(capsys):
    with TrainProgress(4, enabled=True) as bar:
        bar.update(1, loss=2.0)
        print_line("step=1 loss=2")
        bar.update(2, loss=1.5)
        print_line("round 1: pruned 7")
    captured = capsys.readouterr()
    assert captured.out == "step=1 loss=2\nround 1: pruned 7\n"  # the bar never lands on stdout
    assert "2/4" in captured.err or "4/4" in captured.err


def test_scoring_bar_is_the_scorers_callback(capsys):
    from alora_ds.core.inject import inject_gated_lora, rank_map
    from alora_ds.io.examples import make_batches
    from alora_ds.io.models import build_random_llama, tiny_llama_config
    from alora_ds.scoring.fast import fast_ablation_scores
    from tests.helpers import random_examples

    model = build_random_llama(tiny_llama_config(), seed=0)
    inject_gated_lora(model, 28, seed=0)
    live = sum(rank_map(model).values())
    with ScoringProgress(live, enabled=True, round_index=3) as scoring:
        fast_ablation_scores(model, make_batches(random_examples(6), 3), progress=scoring)
        assert scoring.bar.n == live
        scoring.bar.refresh()
    assert "round 3 scoring: 100%" in capsys.readouterr().err


# ---- library noise ------------------------------------------------------------------------------


@pytest.fixture
def restore_logging():
    names = ("DeepSpeed", "transformers")
    levels = {name: logging.getLogger(name).level for name in names}
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    if bars:
        hf_logging.enable_progress_bar()


def _warn_from(module: str, message: str, category: type[Warning]) -> None:
    warnings.warn_explicit(message, category, filename="x.py", lineno=1, module=module)


def test_noisy_warnings_are_filtered_and_others_kept(restore_logging):
    noisy = "`torch.distributed.all_gather_into_tensor` is deprecated. Please use X instead."
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_library_noise(is_main=True)
        _warn_from("torch.distributed.c10d_logger", noisy, FutureWarning)
        _warn_from(
            "transformers.modeling_utils",
            "`gradient_checkpointing_enable` is deprecated and will be removed in v6.",
            FutureWarning,
        )
        # Same text from elsewhere, another category, or another message: all still shown.
        _warn_from("alora_ds.core.layer", noisy, FutureWarning)
        _warn_from("torch.distributed.c10d_logger", noisy, UserWarning)
        _warn_from("torch.distributed.c10d_logger", "`all_reduce` is deprecated", FutureWarning)
    assert [(w.category, str(w.message)[:12]) for w in seen] == [
        (FutureWarning, noisy[:12]), (UserWarning, noisy[:12]), (FutureWarning, "`all_reduce`")
    ]  # fmt: skip
    assert logging.getLogger("DeepSpeed").level == logging.WARNING


def test_deepspeeds_real_deprecation_warning_is_filtered(restore_logging):
    """The warning DeepSpeed's ZeRO-3 triggers in torch, on a real one-process gloo group."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        out, value = torch.empty(2), torch.ones(2)
        with warnings.catch_warnings(record=True) as unfiltered:
            warnings.simplefilter("always")
            dist.all_gather_into_tensor(out, value)
        assert any("all_gather_into_tensor" in str(w.message) for w in unfiltered)
        with warnings.catch_warnings(record=True) as filtered:
            warnings.simplefilter("always")
            quiet_library_noise(is_main=True)
            dist.all_gather_into_tensor(out, value)
            dist.reduce_scatter_tensor(out[:2], torch.ones(2))
        assert [str(w.message) for w in filtered] == []
    finally:
        dist.destroy_process_group()


def test_other_processes_log_errors_only(restore_logging):
    from transformers.utils import logging as hf_logging

    with warnings.catch_warnings():
        quiet_library_noise(is_main=False)
    assert logging.getLogger("DeepSpeed").level == logging.ERROR
    assert hf_logging.get_verbosity() == logging.ERROR
    assert not hf_logging.is_progress_bar_enabled()
