"""User-facing errors.

Every problem a user can cause (a bad path, field, value or flag) raises `InputError` with a
one-line message that names the file, field or value. Command-line entry points catch it, print
`error: <message>` to stderr and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

EXIT_INPUT_ERROR = 2


class InputError(ValueError):
    """Bad input from the user: a one-line message naming the file, field or value."""


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a CLI `main`, turning an InputError into one line on stderr and exit status 2."""
    try:
        return main(argv)
    except InputError as exc:
        message = " ".join(str(exc).split("\n"))
        print(f"error: {message}", file=sys.stderr)
        return EXIT_INPUT_ERROR
