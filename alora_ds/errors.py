"""User-facing errors.

Every problem a user can cause (a bad path, field, value or flag) raises `InputError` with a
one-line message that names the file, field or value. Command-line entry points catch it, print
`error: <message>` to stderr and exit with status 2; anything else is a bug and keeps its traceback.
Under a launcher that starts one process per GPU, every process finds the same bad input: only the
first process prints it (all of them exit with status 2).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

EXIT_INPUT_ERROR = 2
EXIT_RUN_FAILURE = 1


class InputError(ValueError):
    """Bad input from the user: a one-line message naming the file, field or value."""


class RunFailure(RuntimeError):
    """A run that cannot go on (non-finite loss, full disk, lost process): one line saying what
    happened and what is left to resume from."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (a mistyped flag, a value of the wrong type, a missing argument)
    raise InputError instead of printing the usage and exiting, so they reach the user as the
    same one `error: ...` line as every other bad input. `--help` still prints and exits."""

    def error(self, message: str) -> NoReturn:
        raise InputError(f"{self.prog}: {message} (see --help)")


def is_first_process() -> bool:
    """Whether this is process 0 of its launch (RANK from deepspeed / torchrun, SLURM_PROCID
    under srun), or a process started alone. Read from the environment: bad input is found
    before any process group exists."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    return rank.strip() in ("", "0")


def print_input_error(exc: InputError) -> None:
    """The one `error: ...` line of a bad input, on the first process only."""
    if is_first_process():
        message = " ".join(str(exc).split("\n"))
        print(f"error: {message}", file=sys.stderr, flush=True)


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a CLI `main`, turning an InputError into one line on stderr (first process only) and
    exit status 2, and a RunFailure into one line and exit status 1."""
    try:
        return main(argv)
    except InputError as exc:
        print_input_error(exc)
        return EXIT_INPUT_ERROR
    except RunFailure as exc:
        message = " ".join(str(exc).split("\n"))
        print(f"error: {message}", file=sys.stderr, flush=True)
        return EXIT_RUN_FAILURE
