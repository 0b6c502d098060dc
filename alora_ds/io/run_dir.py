"""The run directory: refusing to overwrite another run, the resolved configuration a resumed run
must match, and putting the logs back to a checkpoint's step when a run is resumed.

    output_dir/config.json         the options and what they resolved to (marks the run)
    output_dir/metrics.jsonl       one line per logged step
    output_dir/allocation/         round_NN.json and their heatmaps
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from alora_ds.errors import InputError
from alora_ds.io.files import atomic_write_text, check_output_location

RUN_MARKER = "config.json"
METRICS_FILE = "metrics.jsonl"
ALLOCATION_DIR = "allocation"

# Options that may change when a run is resumed: where and how often it logs and saves, how
# processes are laid out (the global batch itself must stay), and how long collectives wait.
RESUME_MAY_DIFFER = frozenset(
    {
        "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "local_rank",
        "dist_timeout", "logging_steps", "save_steps", "save_total_limit", "progress_bar",
        "report_to", "per_device_train_batch_size", "gradient_accumulation_steps",
        "skip_nonfinite", "scoring", "scoring_max_rows", "scoring_batch_size",
        "screen_candidates", "screen_verify", "screen_exact_means",
    }
)  # fmt: skip


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse to write into a directory that holds another run, unless told to overwrite."""
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"output_dir {output_dir} exists and is not a directory")
    check_output_location(output_dir, "--output_dir", inside=True)
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise InputError(
            f"output_dir {output_dir} already holds another run; pass --overwrite_output_dir "
            "to replace it or choose another directory"
        )


def holds_run(output_dir: Path) -> bool:
    return (output_dir / RUN_MARKER).is_file()


def check_resume_config(output_dir: Path, options: Mapping[str, Any], global_batch: int) -> None:
    """A run is resumed with the options it was started with (RESUME_MAY_DIFFER aside) and the
    same global batch."""
    marker = output_dir / RUN_MARKER
    try:
        saved = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot resume: {marker} cannot be read ({exc})") from exc
    for key, value in options.items():
        if key not in RESUME_MAY_DIFFER and key in saved and saved[key] != value:
            raise InputError(
                f"cannot resume: --{key} is {value!r} but the run in {output_dir} was started "
                f"with {saved[key]!r}; resume with the same value"
            )
    started = saved.get("resolved", {}).get("global_batch", global_batch)
    if started != global_batch:
        raise InputError(
            f"cannot resume: the global batch is {global_batch} but the run was started with "
            f"{started}; set --gradient_accumulation_steps so that micro batch x accumulation x "
            "processes is the same"
        )


def rewind(output_dir: Path, step: int, round_index: int) -> None:
    """What a run logged after the checkpoint it resumes from is redone: drop the metric lines
    after `step` and the round files after `round_index`."""
    metrics = output_dir / METRICS_FILE
    if metrics.exists():
        kept = [
            line
            for line in metrics.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step
        ]
        atomic_write_text(metrics, "".join(f"{line}\n" for line in kept))
    else:
        atomic_write_text(metrics, "")
    for stale in (output_dir / ALLOCATION_DIR).glob("*round_*"):
        if int(stale.stem.rsplit("_", 1)[1]) > round_index:
            stale.unlink()
