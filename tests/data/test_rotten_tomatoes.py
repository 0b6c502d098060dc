"""scripts/fetch_rotten_tomatoes.py on a real excerpt of the VADER ratings (tests/data/vader_excerpt,
MIT), packed the way the vaderSentiment source distribution packs them. No network: the script
downloads only when no --sdist is given."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from alora_ds.errors import InputError, run_cli
from alora_ds.io.tasks import load_task_examples
from tests.helpers import REPO, load_script, tar_gz, vader_sdist

fetch = load_script("fetch_rotten_tomatoes", REPO / "scripts" / "fetch_rotten_tomatoes.py")

SST_FIRST = "The Rock is destined to be the 21st Century's new ''Conan'' and that he's going to"


@pytest.fixture
def sdist(tmp_path) -> Path:
    """The excerpt, packed as the vaderSentiment source distribution packs the whole."""
    return vader_sdist(tmp_path / fetch.SDIST_NAME, fetch.ARCHIVE)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_converts_the_excerpt_into_sst2_splits(sdist, tmp_path, capsys):
    out = tmp_path / "rt"
    argv = ["--sdist", str(sdist), "--no_hash_check", "--out", str(out), "--train", "20",
            "--dev", "6"]  # fmt: skip
    assert fetch.main(argv) == 0
    report = capsys.readouterr().out
    # 39 lines: 19 positive, 19 negative, one zero; one sentence twice.
    assert (
        "movieReviewSnippets_GroundTruth.txt: 39 lines, 19 positive, 19 negative, 1 zero "
        "(dropped), 1 repeated sentences (dropped)" in report
    )
    assert "train.jsonl: 20 rows" in report and "test.jsonl: 11 rows" in report
    splits = {name: read_rows(out / f"{name}.jsonl") for name in ("train", "dev", "test")}
    assert [len(rows) for rows in splits.values()] == [20, 6, 11]
    every = [row for rows in splits.values() for row in rows]
    assert len({row["sentence"] for row in every}) == 37  # no sentence in two splits
    assert all(row["label"] == int(row["rating"] > 0) and row["rating"] != 0 for row in every)
    assert any(row["sentence"].startswith(SST_FIRST) for row in every)
    # Runs of spaces (in 3 of these lines, where the source dropped a dash) become one.
    assert not any("  " in row["sentence"] for row in every)
    for name in ("tweets", "nyt_editorials", "amazon_reviews"):
        rows = read_rows(out / f"{name}.jsonl")
        assert len(rows) == 6 and all(row["rating"] != 0 for row in rows)
    # The files are what --task sst2 reads.
    pairs = load_task_examples("sst2", out / "test.jsonl")
    assert pairs[0][1] in ("negative", "positive") and len(pairs) == 11
    assert "MIT licence" in (out / "SOURCE.md").read_text()

    # The same seed gives the same files; another seed another order.
    again = tmp_path / "again"
    assert fetch.main([*argv[:3], "--out", str(again), *argv[5:]]) == 0
    assert (again / "train.jsonl").read_bytes() == (out / "train.jsonl").read_bytes()
    assert fetch.main([*argv, "--seed", "1"]) == 0  # replaces out (it holds SOURCE.md)
    assert read_rows(out / "train.jsonl") != splits["train"]


def test_bad_input_is_one_line(sdist, tmp_path, capsys):
    out = tmp_path / "rt"

    def error(*argv: str) -> str:
        assert run_cli(fetch.main, ["--out", str(out), *argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
        return lines[0]

    assert re.search(r"has sha256 [0-9a-f]{64}, not vaderSentiment-3\.3\.2\.tar\.gz's 5d7c06e0",
                     error("--sdist", str(sdist)))  # fmt: skip
    assert "leave a test split of the 37 labelled sentences" in error(
        "--sdist", str(sdist), "--no_hash_check", "--train", "30", "--dev", "7"
    )
    other = tmp_path / "other.tar.gz"
    other.write_bytes(tar_gz({"x.txt": b"x"}))
    assert "other.tar.gz: not the expected archive (KeyError" in error(
        "--sdist", str(other), "--no_hash_check"
    )
    assert not out.exists()
    with pytest.raises(InputError, match=r"^t\.txt line 2: 2 tab-separated fields, expected 3$"):
        fetch.parse_ratings("1\t0.5\tfine\r\n2\t-1\r\n", "t.txt")
    with pytest.raises(InputError, match=r"^t\.txt line 1: rating 7\.0 outside -4\.\.4$"):
        fetch.parse_ratings("1\t7\tloud\r\n", "t.txt")
