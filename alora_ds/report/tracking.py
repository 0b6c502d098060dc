"""What a user watches while a run goes: metric sinks, progress bars, quiet library logs.

- `MetricsSink`: every logged record goes to output_dir/metrics.jsonl (one JSON object per line)
  and, as asked, to TensorBoard (output_dir/tensorboard) and Weights & Biases. Created on every
  process; only the main process writes anything.
- `TrainProgress`, `ScoringProgress`: tqdm bars on stderr, on the main process only: optimizer
  steps with loss, lr, tokens/s and tqdm's ETA; the candidates of a scoring round. Lines printed
  while a bar is shown go through `print_line`, which clears the bars, prints, and redraws them;
  after `log_to_file(path)` it also appends every line to that file (output_dir/train.log).
- `quiet_library_noise`: DeepSpeed's and transformers' loggers quieter off the main process, and
  the few harmless deprecation warnings every run prints, filtered by message, category and module.

Library code: plain arguments, never the training config.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from alora_ds.errors import InputError

SINKS: tuple[str, ...] = ("tensorboard", "wandb", "none")
TENSORBOARD_DIR = "tensorboard"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"


def check_report_to(report_to: Sequence[str]) -> None:
    """Raise a one-line InputError when a sink is unknown, or asked for but not installed.

    Call it on every process before anything starts, so a run never fails after hours of work
    because its first log line cannot be sent.
    """
    unknown = sorted(set(report_to) - set(SINKS))
    if unknown:
        raise InputError(f"report_to {','.join(unknown)} is not one of {', '.join(SINKS)}")
    if "wandb" in report_to:
        try:
            import wandb  # noqa: F401  (optional: only this sink needs it)
        except ImportError as exc:
            raise InputError(
                "report_to wandb needs the wandb package, which is not installed "
                "(pip install wandb, or leave wandb out of report_to)"
            ) from exc
    if "tensorboard" in report_to:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as exc:
            raise InputError(
                "report_to tensorboard needs the tensorboard package, which is not installed "
                "(pip install tensorboard, or pass report_to none)"
            ) from exc


def _scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numeric values of a record (bools and strings left out), step excluded."""
    return {
        key: float(value)
        for key, value in record.items()
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


class MetricsSink:
    """metrics.jsonl plus the sinks in `report_to` (tensorboard, wandb; none: the file only).

    Every process creates one with its own `is_main`; on the others it writes nothing (and starts
    nothing). Numeric values go to TensorBoard as scalars tagged by their key, at the record's
    optimizer step; W&B gets the same values at the same step. W&B runs as its environment says
    (WANDB_MODE=offline writes output_dir/wandb/ for a later `wandb sync`; WANDB_PROJECT,
    WANDB_ENTITY, WANDB_API_KEY as usual), with `run_config` as the run's config.

    metrics.jsonl is appended to. `resume_step`: the step a resumed run goes on from; TensorBoard
    then drops what the interrupted run logged after it (its purge_step), so the redone steps are
    not shown twice. A resumed run is a new W&B run.
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        is_main: bool,
        report_to: Sequence[str] = ("tensorboard",),
        run_name: str | None = None,
        run_config: Mapping[str, Any] | None = None,
        project: str = "alora-ds",
        resume_step: int | None = None,
    ) -> None:
        check_report_to(report_to)
        self.output_dir = Path(output_dir)
        self.is_main = is_main
        self.metrics_file = self.output_dir / METRICS_FILE
        self._tensorboard = None
        self._wandb = None
        if not is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if "wandb" in report_to:
            import wandb

            try:
                self._wandb = wandb.init(
                    project=os.environ.get("WANDB_PROJECT", project),
                    name=run_name or self.output_dir.name,
                    dir=str(self.output_dir),
                    config=dict(run_config or {}),
                )
            except wandb.errors.Error as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise InputError(
                    f"cannot start Weights & Biases: {first} (log in with `wandb login`, or set "
                    "WANDB_MODE=offline)"
                ) from exc
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(
                log_dir=str(self.output_dir / TENSORBOARD_DIR),
                purge_step=None if resume_step is None else resume_step + 1,
            )

    def log(self, record: Mapping[str, Any], step: int) -> None:
        """Append `record` as one JSON line; send its numeric values to the other sinks."""
        if not self.is_main:
            return
        with self.metrics_file.open("a") as handle:
            handle.write(json.dumps(dict(record)) + "\n")
        scalars = _scalars(record)
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, global_step=step)
            self._tensorboard.flush()  # visible in a running `tensorboard --logdir` at once
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        """Flush and close every sink (idempotent)."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ---- progress bars ------------------------------------------------------------------------------


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """The records of output_dir/metrics.jsonl, in order (none when there is no file yet)."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# Where print_line also appends its lines (the process's run log), or None. One per process:
# the trainer's main process sets it once its output directory exists.
_log_file: Path | None = None


def log_to_file(path: str | Path | None) -> None:
    """From now on, also append every print_line line to `path` (None: stop). Lines are
    appended, so a resumed run's log follows the interrupted one's."""
    global _log_file
    _log_file = None if path is None else Path(path)


def print_line(message: str) -> None:
    """Print a log line to stdout without breaking a progress bar: tqdm clears every bar shown
    on stdout or stderr, prints, then redraws them. Use it for every line printed while a bar may
    be open; with no bar it is a plain print. The line also goes to the log_to_file file."""
    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()
    if _log_file is not None:
        with _log_file.open("a", encoding="utf-8") as handle:  # each line on disk as it comes
            handle.write(message + "\n")


class TrainProgress:
    """A bar over optimizer steps (stderr, main process only): loss, lr, tokens/s beside it and
    tqdm's own elapsed time and ETA. Disabled, it does nothing.

    `initial` is the step a resumed run starts from; `update(step, ...)` takes the absolute step
    number (steps done), so a resumed or skipped step never leaves the bar behind.
    """

    def __init__(self, total_steps: int, *, enabled: bool, initial: int = 0) -> None:
        self.bar = tqdm(
            total=total_steps,
            initial=initial,
            desc="train",
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not enabled,
        )

    @property
    def enabled(self) -> bool:
        return not self.bar.disable

    def update(
        self,
        step: int,
        *,
        loss: float | None = None,
        lr: float | None = None,
        tokens_per_s: float | None = None,
    ) -> None:
        """Move the bar to `step` steps done and show the latest loss, lr and tokens/s."""
        if not self.enabled:
            return
        postfix = {}
        if loss is not None:
            postfix["loss"] = f"{loss:.4f}"
        if lr is not None:
            postfix["lr"] = f"{lr:.2e}"
        if tokens_per_s is not None:
            postfix["tok/s"] = f"{tokens_per_s:,.0f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> TrainProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ScoringProgress:
    """A bar over the candidates (live ranks) of one AB-LoRA scoring round, main process only,
    removed when closed. The object is the scorers' `progress` callback: calling it with n
    advances the bar by n ranks (alora_ds.scoring.direct / .fast call it so that the calls add up
    to the number of live ranks)."""

    def __init__(self, num_candidates: int, *, enabled: bool, round_index: int) -> None:
        self.bar = tqdm(
            total=num_candidates,
            desc=f"round {round_index} scoring",
            unit="rank",
            file=sys.stderr,
            dynamic_ncols=True,
            leave=False,
            disable=not enabled,
        )

    @property
    def enabled(self) -> bool:
        return not self.bar.disable

    def __call__(self, finished: int) -> None:
        self.bar.update(finished)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> ScoringProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ---- library noise ------------------------------------------------------------------------------

# (message regex, category, module regex) of warnings every run prints that say nothing about the
# run. Each is matched exactly, so any other warning from the same place still shows.
HARMLESS_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # DeepSpeed 0.19's ZeRO-3 calls torch.distributed's old collective names, which torch 2.13
    # deprecates; printed at every engine creation on every process. Nothing for us to change.
    (
        r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
        FutureWarning,
        r"torch\.distributed\.c10d_logger",
    ),
    (
        r"`torch\.distributed\.reduce_scatter_tensor` is deprecated",
        FutureWarning,
        r"torch\.distributed\.c10d_logger",
    ),
    # transformers 5 renamed gradient_checkpointing_enable; the old name is the only one that
    # also exists in transformers 4.x, which requirements.txt still allows.
    (
        r"`gradient_checkpointing_enable` is deprecated",
        FutureWarning,
        r"transformers\.modeling_utils",
    ),
)


def quiet_library_noise(is_main: bool) -> None:
    """Keep the log readable: DeepSpeed's logger at WARNING on the main process and ERROR on the
    others; transformers' logger and its progress bars (checkpoint loading) at their defaults on
    the main process, errors only on the others (each process would repeat the same lines); and
    the HARMLESS_WARNINGS filtered out. Every other warning still shows."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING if is_main else logging.ERROR)
    if not is_main:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    for message, category, module in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
