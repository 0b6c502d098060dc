"""Checkpoints on disk: what a run needs to pick up exactly where it stopped.

A checkpoint is a directory `output_dir/checkpoints/step_NNNNNNN/` holding

    adapter_state.safetensors  every adapter's full fp32 master values, Adam moments and gates
    rng.safetensors            every process's torch generator states (CPU, and CUDA if used)
    trainer_state.json         step, round index, rank map, scores history, early-stopping state

and `output_dir/checkpoints/latest` names the newest complete one. Everything is read with
safetensors and json only: loading a checkpoint never unpickles anything.

A checkpoint is written into a hidden temporary directory, every file fsynced, then renamed into
place (alora_ds.io.files.atomic_output_dir), and `latest` is replaced last (atomically). A crash
or a full disk at any moment leaves the previous checkpoint and `latest` as they were. The
newest `keep` checkpoints are kept.

Plain file I/O and the tensor layout: gathering the tensors is alora_ds.runtime's job.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from alora_ds.core.layer import ADAPTER_PARAM_NAMES, GATE_PARAM_NAMES
from alora_ds.core.surgery import ADAM_STATE_KEYS, AdapterState
from alora_ds.errors import InputError
from alora_ds.io.files import atomic_output_dir, atomic_write_text, remove_temporaries

CHECKPOINTS = "checkpoints"
LATEST = "latest"
ADAPTER_FILE = "adapter_state.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d+)$")


@dataclass
class Checkpoint:
    """A checkpoint read back: flat tensors plus the trainer's JSON state."""

    path: Path
    tensors: dict[str, torch.Tensor]  # "<module>.<param>[.<moment>]" -> fp32 tensor
    rng: dict[str, torch.Tensor]  # "<cpu|cuda>.<process rank>" -> uint8 state
    state: dict[str, Any]


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    except SafetensorError as exc:  # safetensors reports a failed write (full disk) this way
        raise OSError(f"{exc}") from exc


def write_checkpoint(
    output_dir: Path,
    step: int,
    tensors: Mapping[str, torch.Tensor],
    rng: Mapping[str, torch.Tensor],
    state: Mapping[str, Any],
    *,
    keep: int,
) -> Path:
    """Write a checkpoint atomically, point `latest` at it, drop all but the newest `keep`."""
    root = output_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    remove_temporaries(root)  # left by a run killed mid-write
    final = root / checkpoint_name(step)
    # A resumed run re-saving the same step replaces it (it holds STATE_FILE).
    with atomic_output_dir(final, marker=STATE_FILE) as tmp:
        save_tensors(tensors, tmp / ADAPTER_FILE)
        save_tensors(rng, tmp / RNG_FILE)
        (tmp / STATE_FILE).write_text(
            json.dumps({"format": FORMAT_VERSION, **state}, indent=1) + "\n"
        )
    atomic_write_text(root / LATEST, final.name + "\n")
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in step order (temporary directories are never listed)."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def find_checkpoint(output_dir: Path, request: str) -> Path | None:
    """The checkpoint `--resume_from_checkpoint` asks for: `auto` is the one `latest` names
    (None when the run has none yet); anything else is a checkpoint directory."""
    if request != "auto":
        path = Path(request)
        if not (path / STATE_FILE).is_file():
            raise InputError(
                f"--resume_from_checkpoint {request}: not a checkpoint directory (no {STATE_FILE})"
            )
        return path
    pointer = output_dir / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    path = output_dir / CHECKPOINTS / pointer.read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise InputError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def read_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint with safetensors and json only; a damaged file names itself."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"checkpoint {path / STATE_FILE} cannot be read: {exc}") from exc
    if state.get("format") != FORMAT_VERSION:
        raise InputError(
            f"checkpoint {path / STATE_FILE}: format {state.get('format')!r}, "
            f"this version reads {FORMAT_VERSION}"
        )
    loaded = {}
    for file in (ADAPTER_FILE, RNG_FILE):
        try:
            loaded[file] = load_file(path / file)
        except (OSError, SafetensorError) as exc:
            raise InputError(f"checkpoint file {path / file} cannot be read: {exc}") from exc
    return Checkpoint(path, loaded[ADAPTER_FILE], loaded[RNG_FILE], state)


# ---- the tensor layout of adapter_state.safetensors -----------------------------------------


def flatten_states(states: Mapping[str, AdapterState]) -> dict[str, torch.Tensor]:
    """AdapterStates as flat safetensors entries: `<module>.<param>`, `<module>.<param>.<moment>`
    and `<module>.lora_gate`."""
    flat: dict[str, torch.Tensor] = {}
    for name, state in states.items():
        for pname in state.values:
            flat[f"{name}.{pname}"] = state.values[pname]
            for key in ADAM_STATE_KEYS:
                flat[f"{name}.{pname}.{key}"] = state.moments[pname][key]
        flat[f"{name}.lora_gate"] = state.gate
    return flat


def unflatten_states(
    flat: Mapping[str, torch.Tensor], names: Sequence[str], source: str
) -> dict[str, AdapterState]:
    """The inverse of flatten_states, for exactly the modules `names`; a module the checkpoint
    does not hold is an InputError naming it."""
    missing = [n for n in names if f"{n}.lora_gate" not in flat]
    if missing:
        raise InputError(f"cannot resume: {source} holds no adapter for module {missing[0]}")
    trained = ADAPTER_PARAM_NAMES + GATE_PARAM_NAMES
    return {
        name: AdapterState(
            values={p: flat[f"{name}.{p}"] for p in trained if f"{name}.{p}" in flat},
            moments={
                p: {key: flat[f"{name}.{p}.{key}"] for key in ADAM_STATE_KEYS}
                for p in trained
                if f"{name}.{p}" in flat
            },
            gate=flat[f"{name}.lora_gate"],
        )
        for name in names
    }
