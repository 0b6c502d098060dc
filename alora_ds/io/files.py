"""Reading and writing files safely: the one place where files and directories are written
atomically.

Writes go to a hidden temporary file or directory beside the target, are fsynced, and are renamed
into place, so a crash or a full disk never leaves anything half-written under the target's
name. Output locations are checked before any work starts, so a mistyped or read-only path fails
in a second rather than after hours of work. What is written gets the permissions the umask
allows (as `open` and `mkdir` would give), not the private ones of Python's temporary files.
Text input is decoded as UTF-8 with a one-line error naming the file and line when it is not.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alora_ds.errors import InputError

TEMPORARY = ".tmp-"  # in the names of temporary files and directories: `.<name>.tmp-XXXX`


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def _open_permissions(path: Path, directory: bool) -> None:
    """mkstemp and mkdtemp make private files (0600) and directories (0700); give `path` what
    open() and mkdir() would have given it under the umask (0644 / 0755 under umask 022)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def open_permissions_under(directory: str | Path) -> None:
    """Give `directory` and everything in it the umask's permissions. Writers that go through a
    temporary file make private ones: safetensors' save_file writes 0600 whatever the umask, so
    adapters, checkpoints and saved models would be unreadable to teammates on a shared file
    system."""
    directory = Path(directory)
    _open_permissions(directory, directory=True)
    for path in directory.rglob("*"):
        if not path.is_symlink():
            _open_permissions(path, directory=path.is_dir())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to a temporary file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TEMPORARY}")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        _open_permissions(Path(tmp), directory=False)
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


def check_replaceable(out_dir: Path, marker: str) -> None:
    """Refuse an existing `out_dir` unless it is an empty directory or holds `marker`.

    Replacing a directory deletes what it held: this keeps a mistyped path (a run directory, a
    home directory) from being wiped by an export.
    """
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if out_dir.is_symlink() or not out_dir.is_dir():
        raise InputError(f"output path {out_dir} exists and is not a directory")
    if any(out_dir.iterdir()) and not (out_dir / marker).is_file():
        raise InputError(
            f"output directory {out_dir} exists, is not empty and holds no {marker}: "
            "refusing to replace it"
        )


def remove_temporaries(directory: Path) -> None:
    """Remove the temporary files and directories a killed writer left in `directory`."""
    for stale in directory.glob(f".*{TEMPORARY}*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextmanager
def atomic_output_dir(out_dir: str | Path, *, marker: str) -> Iterator[Path]:
    """Yield an empty temporary directory next to `out_dir`; when the block ends without an
    exception, fsync everything in it and move it into place as `out_dir` (replacing an
    existing one, which must be empty or hold `marker`, only then).

    On an exception the temporary directory is removed and `out_dir` is left as it was. The swap
    is two renames on the same filesystem: between them `out_dir` is briefly absent, never
    half-written.
    """
    out_dir = Path(out_dir)
    check_replaceable(out_dir, marker)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}{TEMPORARY}"))
    try:
        yield tmp
        open_permissions_under(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                fsync_path(file)
        fsync_path(tmp)
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if old is not None:
                os.replace(old, out_dir)
            raise
        fsync_path(out_dir.parent)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
