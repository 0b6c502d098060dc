"""Local data for the task YAMLs in this directory (lm-evaluation-harness `custom_dataset`).

The harness's own tasks download their datasets from the Hugging Face hub; these read local
json / jsonl files instead, so they run offline. A YAML names its files in
`dataset_kwargs.data_files` (split -> path); a relative path is relative to THIS directory, so
the tasks work from any working directory, with `python -m eval.harness` as with
`lm_eval --include_path eval/harness_tasks`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

HERE = Path(__file__).resolve().parent


def load(data_files: dict[str, str], **_metadata: Any) -> datasets.DatasetDict:
    """split -> local json / jsonl file, as a DatasetDict. The harness also passes the task's
    metadata (version, ...) as keywords; they do not concern the data."""
    resolved = {split: str((HERE / path).resolve()) for split, path in data_files.items()}
    missing = [path for path in resolved.values() if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"task data file {missing[0]} does not exist")
    return datasets.load_dataset("json", data_files=resolved)
