"""What a new user reads first holds: the README's training example uses files that ship, its
table of task fields is the tasks' own, nothing points outside the repository (the method is in
docs/method.md), requirements.txt's transformers range holds the version the suite runs on, and
every benchmark table is the one bench/tables.py renders from its committed results file."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement

from alora_ds.config import resolve_ds_config
from alora_ds.io.tasks import TASKS
from tests.helpers import REPO

README = (REPO / "README.md").read_text()
_spec = importlib.util.spec_from_file_location("bench_tables", REPO / "bench" / "tables.py")
tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tables)


def repository_files() -> list:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        capture_output=True, text=True, cwd=REPO, check=True,
    ).stdout.split()  # fmt: skip
    return [REPO / name for name in listed if (REPO / name).is_file()]


def test_nothing_points_outside_the_repository():
    assert (REPO / "docs" / "method.md").is_file()
    outside = re.compile(r"\.\./shared|shared/docs|(?<![\w/])method\.md")
    found = []
    for path in repository_files():
        if path.suffix in (".png", ".gz", ".safetensors", ".parquet") or path == Path(__file__):
            continue
        text = path.read_text(errors="replace")
        found += [f"{path.relative_to(REPO)}: {m.group(0)}" for m in outside.finditer(text)]
    assert not found, found


def test_the_training_example_uses_files_that_ship():
    block = README[README.index("## Training") :].split("```bash")[1].split("```")[0]
    paths = re.findall(r"--(train_file|validation_file|ds_config) (\S+)", block)
    assert {flag for flag, _ in paths} == {"train_file", "validation_file", "ds_config"}
    for flag, path in paths:
        shipped = resolve_ds_config(path) if flag == "ds_config" else REPO / path
        assert (REPO / shipped).is_file(), (flag, path)


def test_the_task_table_is_the_tasks_own():
    table = README[README.index("### Your own data") :].split("\n\n")[1:4]
    rows = [line for part in table for line in part.splitlines() if line.startswith("| `")]
    listed = {}
    for row in rows:
        tasks_cell, fields_cell = row.split(" | ")[:2]
        for task in re.findall(r"`(\w+)`", tasks_cell):
            listed[task] = set(re.findall(r"`(\w+)`", fields_cell))
    assert set(TASKS) | {"prompt_completion", "chat", "pretokenized"} == set(listed)
    for name, spec in TASKS.items():
        fields = {*spec.required_fields, *spec.optional_fields}
        if name == "copa":
            fields |= {"cause", "effect"}  # the two values of `question`
        if name in ("squad", "record"):  # one row for both: each names the other's fields
            fields |= {*TASKS["squad"].required_fields, *TASKS["record"].required_fields}
        assert listed[name] == fields, name


def test_the_installed_transformers_is_in_the_pinned_range():
    lines = (REPO / "requirements.txt").read_text().splitlines()
    (line,) = [line for line in lines if line.startswith("transformers")]
    requirement = Requirement(line)
    assert requirement.specifier.contains(version("transformers")), (line, version("transformers"))
    assert any(op in str(requirement.specifier) for op in ("<", "==")), "an upper bound: tested"


def test_every_benchmark_table_is_rendered_from_its_results_file(tmp_path):
    """BENCHMARKS.md's tables and the README's performance table are bench/tables.py's output
    from bench/results/, so a figure cannot drift from its file; the check catches a figure
    edited by hand and a table that no results file renders."""
    assert tables.problems() == []
    rendered = tables.planted("attention-late")
    assert "| lora | ZeRO-2 | 3 | 3.4666 [3.3183-3.4832] |" in rendered  # the file's median
    benchmarks = (REPO / "BENCHMARKS.md").read_text()
    hand_made = "| method | wall s |\n| --- | ---: |\n| lora | 1.0 |\n"
    (tmp_path / "README.md").write_text(README)
    (tmp_path / "BENCHMARKS.md").write_text(
        benchmarks.replace(rendered, rendered.replace("3.4666", "3.4665")) + "\n" + hand_made
    )
    assert tables.problems(tmp_path) == [
        "BENCHMARKS.md: the 'planted attention-late' table is not the one rendered from "
        "planted-attention-late.json, planted-attention-late-zero3.json",
        "BENCHMARKS.md: a table no results file renders: | method | engine | seeds | held-out "
        "loss | adapter params | peak MB | wall s | Spearman |",
        "BENCHMARKS.md: a table no results file renders: | method | wall s |",
    ]
