"""Reading and writing files safely.

Writes go to a temporary file renamed into place, so a crash or a full disk never leaves a
half-written file behind. Output locations are checked before any work starts, so a mistyped or
read-only path fails in a second rather than after hours of work. Text input is decoded as UTF-8
with a one-line error naming the file and line when it is not.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from alora_ds.errors import InputError


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to a temporary file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    """JSON version of atomic_write_text (indented, keys in insertion order)."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def decode_utf8(data: bytes, source: str | Path, first_line: int = 1) -> str:
    """`data` (the text of `source` from line `first_line` on) decoded, a leading byte-order
    mark dropped; bytes that are not UTF-8 are an InputError naming the file and line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = first_line + data.count(b"\n", 0, exc.start)
        column = exc.start - data.rfind(b"\n", 0, exc.start)  # 1-based
        raise InputError(
            f"{source} line {line}: not UTF-8 text (byte {data[exc.start]:#04x} at column {column})"
        ) from None


def read_utf8(path: str | Path) -> str:
    """The text of a UTF-8 file; bytes that are not UTF-8 are an InputError naming the line."""
    return decode_utf8(Path(path).read_bytes(), path)


def check_output_location(path: str | Path, flag: str, *, inside: bool) -> None:
    """Raise InputError, naming `flag` and the culprit, unless `path` can be written.

    inside=True: `path` is a directory the command writes files into; it must be a writable
    directory or be creatable (its nearest existing ancestor is a writable directory).
    inside=False: `path` is renamed into place (a file, or a directory swapped in whole), so the
    same holds for its parent. Whether an existing `path` may be replaced is the caller's rule.
    """
    path = Path(path)
    existing = path if inside else path.parent
    while not (existing.exists() or existing.is_symlink()):
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{flag} {path} cannot be written: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path} cannot be written: directory {existing} is not writable")


def check_output_file(path: str | Path, flag: str) -> None:
    """check_output_location for a file written by a rename: it must not be a directory."""
    if Path(path).is_dir():
        raise InputError(f"{flag} {path} is a directory, not a file")
    check_output_location(path, flag, inside=False)


def fsync_path(path: str | Path) -> None:
    """fsync a file, or a directory, which makes its entries (renames into it) durable too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
