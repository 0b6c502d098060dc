"""Fetch real labelled sentiment text from the package registry and write it as `--task sst2` data.

    .venv/bin/python scripts/fetch_rotten_tomatoes.py [--out data/rotten_tomatoes] [--seed 0]

The source distribution of vaderSentiment 3.3.2 (MIT licence, C.J. Hutto; the wheel lacks the
data) holds `additional_resources/hutto_ICWSM_2014.tar.gz`, the human ratings of the VADER paper
(Hutto & Gilbert, ICWSM 2014): tab-separated lines of id, mean rating from -4 to +4, text.
`movieReviewSnippets_GroundTruth.txt` is 10,605 Rotten Tomatoes review sentences from the Pang &
Lee corpus that SST-2's sentences come from (its first line is SST's first sentence). A positive
mean rating is label 1, a negative one label 0, and a zero rating is dropped; a sentence seen
before is dropped too (two appear twice), so that no sentence is in two splits. The rest is
shuffled with a fixed seed and cut into train / dev / test (8,000 / 1,000 / the rest). The tweets,
New York Times editorial snippets and Amazon review snippets of the same archive, rated the same
way, become three extra test files for an out-of-domain check:

    OUT/train.jsonl  dev.jsonl  test.jsonl               Rotten Tomatoes
    OUT/tweets.jsonl  nyt_editorials.jsonl  amazon_reviews.jsonl
    OUT/SOURCE.md                                        where it came from, the licence, counts

Rows are `{"id", "sentence", "label", "rating"}`, so training on them is
`--task sst2 --train_file OUT/train.jsonl --validation_file OUT/dev.jsonl`. The source
distribution is downloaded with `pip download` into data/downloads/ (checked against its
sha256) unless `--sdist` names a copy; nothing fetched is committed. OUT is written atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from alora_ds.errors import ArgumentParser, InputError, run_cli  # noqa: E402
from alora_ds.io.files import atomic_output_dir  # noqa: E402

PACKAGE = "vaderSentiment==3.3.2"
SDIST_NAME = "vaderSentiment-3.3.2.tar.gz"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
MOVIES = "movieReviewSnippets_GroundTruth.txt"
# Extra test sets: output name -> file in the archive.
EXTRA = {
    "tweets": "tweets_GroundTruth.txt",
    "nyt_editorials": "nytEditorialSnippets_GroundTruth.txt",
    "amazon_reviews": "amazonReviewSnippets_GroundTruth.txt",
}
MARKER = "SOURCE.md"


@dataclass(frozen=True)
class Rated:
    """One line of a ground-truth file."""

    id: str
    rating: float
    text: str

    def row(self) -> dict:
        """The `--task sst2` row: positive -> 1, negative -> 0 (zeros are dropped before)."""
        return {"id": self.id, "sentence": self.text, "label": int(self.rating > 0),
                "rating": self.rating}  # fmt: skip


def download_sdist(folder: Path) -> Path:
    """The source distribution in `folder`, fetched with pip the first time."""
    target = folder / SDIST_NAME
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--dest", str(folder), PACKAGE]  # fmt: skip
        print(f"fetching {PACKAGE} (source distribution) into {folder}", flush=True)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not target.is_file():
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise InputError(f"pip download {PACKAGE} failed: {last}")
    return target


def read_ground_truth(sdist: Path, check_hash: bool = True) -> dict[str, str]:
    """The text of every ground-truth file of the archive inside the source distribution."""
    if not sdist.is_file():
        raise InputError(f"--sdist {sdist} does not exist")
    data = sdist.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if check_hash and digest != SDIST_SHA256:
        raise InputError(f"{sdist} has sha256 {digest}, not {SDIST_NAME}'s {SDIST_SHA256}")
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as outer:
            inner = outer.extractfile(ARCHIVE)
            if inner is None:
                raise KeyError(ARCHIVE)
            archive = inner.read()
        texts = {}
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            for name in (MOVIES, *EXTRA.values()):
                member = tar.extractfile(f"hutto_ICWSM_2014/{name}")
                if member is None:
                    raise KeyError(name)
                texts[name] = member.read().decode("utf-8")
    except (tarfile.TarError, KeyError) as exc:
        raise InputError(
            f"{sdist}: not the expected archive ({type(exc).__name__}: {exc})"
        ) from exc
    return texts


def parse_ratings(text: str, source: str) -> list[Rated]:
    """Every line of a ground-truth file: `id<TAB>mean rating<TAB>text` (CRLF line ends)."""
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t")
        try:
            if len(parts) != 3:
                raise ValueError(f"{len(parts)} tab-separated fields, expected 3")
            rating = float(parts[1])
            if not -4 <= rating <= 4:
                raise ValueError(f"rating {rating} outside -4..4")
        except ValueError as exc:
            raise InputError(f"{source} line {number}: {exc}") from exc
        rows.append(Rated(parts[0].strip(), rating, " ".join(parts[2].split())))
    return rows


def labelled(rows: Sequence[Rated]) -> tuple[list[Rated], int, int]:
    """(the rows with a non-zero rating, each text once; zeros dropped; repeats dropped)."""
    kept, seen = [], set()
    zeros = repeats = 0
    for row in rows:
        if row.rating == 0:
            zeros += 1
        elif row.text in seen:
            repeats += 1
        else:
            seen.add(row.text)
            kept.append(row)
    return kept, zeros, repeats


def split(rows: Sequence[Rated], train: int, dev: int, seed: int) -> dict[str, list[Rated]]:
    """Shuffled with `seed`, then the first `train`, the next `dev`, and the rest as test."""
    if train <= 0 or dev <= 0 or train + dev >= len(rows):
        raise InputError(
            f"--train {train} and --dev {dev} must be positive and leave a test split of the "
            f"{len(rows)} labelled sentences"
        )
    order = list(rows)
    random.Random(seed).shuffle(order)
    return {"train": order[:train], "dev": order[train : train + dev], "test": order[train + dev :]}


def balance(rows: Sequence[Rated]) -> str:
    positive = sum(row.rating > 0 for row in rows)
    return (
        f"{len(rows):,} rows, {positive:,} positive ({100 * positive / len(rows):.1f}%), "
        f"{len(rows) - positive:,} negative"
    )


def convert(texts: dict[str, str], out: Path, train: int, dev: int, seed: int) -> list[str]:
    """Write every output file into `out` (atomically); returns the lines of the report."""
    movies = parse_ratings(texts[MOVIES], MOVIES)
    positive = sum(r.rating > 0 for r in movies)
    negative = sum(r.rating < 0 for r in movies)
    kept, zeros, repeats = labelled(movies)
    report = [
        f"{MOVIES}: {len(movies):,} lines, {positive:,} positive, {negative:,} negative, "
        f"{zeros} zero (dropped), {repeats} repeated sentences (dropped)"
    ]
    files = split(kept, train, dev, seed)
    for name, source in EXTRA.items():
        rows, zeros, repeats = labelled(parse_ratings(texts[source], source))
        files[name] = rows
        report.append(f"{source}: {zeros} zero and {repeats} repeated dropped")
    for name, rows in files.items():
        report.append(f"{name}.jsonl: {balance(rows)}")
    with atomic_output_dir(out, marker=MARKER) as staging:
        for name, rows in files.items():
            lines = (json.dumps(row.row(), ensure_ascii=False) + "\n" for row in rows)
            (staging / f"{name}.jsonl").write_text("".join(lines), encoding="utf-8")
        (staging / MARKER).write_text(source_note(seed, train, dev, report), encoding="utf-8")
    return report


def source_note(seed: int, train: int, dev: int, report: Sequence[str]) -> str:
    lines = [
        "# Rotten Tomatoes sentences and three other rated sets, as `--task sst2` rows",
        "",
        f"From the source distribution of {PACKAGE} on PyPI",
        f"({SDIST_NAME}, sha256 {SDIST_SHA256}),",
        f"file `{ARCHIVE}`: the human",
        "ratings of Hutto & Gilbert, VADER (ICWSM 2014). MIT licence, Copyright (c) 2016",
        "C.J. Hutto. Written by scripts/fetch_rotten_tomatoes.py: rating > 0 -> label 1,",
        f"< 0 -> 0, zeros and repeated sentences dropped; shuffled with seed {seed}, then",
        f"{train} train, {dev} dev and the rest test.",
        "",
        *(f"- {line}" for line in report),
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="scripts/fetch_rotten_tomatoes.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default=str(REPO / "data" / "rotten_tomatoes"))
    parser.add_argument("--sdist", help=f"a copy of {SDIST_NAME} (default: pip download it)")
    parser.add_argument("--downloads", default=str(REPO / "data" / "downloads"))
    parser.add_argument("--seed", type=int, default=0, help="shuffles the sentences before the cut")
    parser.add_argument("--train", type=int, default=8000, help="training sentences")
    parser.add_argument("--dev", type=int, default=1000, help="dev sentences; the rest is test")
    parser.add_argument(
        "--no_hash_check",
        action="store_true",
        help="accept an --sdist whose sha256 differs (tests build a small one)",
    )
    args = parser.parse_args(argv)
    sdist = Path(args.sdist) if args.sdist else download_sdist(Path(args.downloads))
    texts = read_ground_truth(sdist, check_hash=not args.no_hash_check)
    for line in convert(texts, Path(args.out), args.train, args.dev, args.seed):
        print(line)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
