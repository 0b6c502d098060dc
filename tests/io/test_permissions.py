"""What the atomic writers leave behind gets the permissions the umask allows, as open() and
mkdir() would give: not the private ones of temporary files, nor safetensors' 0600."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from alora_ds.io.files import atomic_output_dir, atomic_write_json


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_atomic_writes_follow_the_umask(umask, tmp_path):
    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "summary.json", {"a": 1})
        with atomic_output_dir(tmp_path / "adapter", marker="adapter_config.json") as staging:
            save_file({"w": torch.zeros(2)}, str(staging / "adapter_model.safetensors"))
            (staging / "nested").mkdir()
            (staging / "nested" / "notes.txt").write_text("x")
    finally:
        os.umask(old)
    mode = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
            for p in [tmp_path / "summary.json", *tmp_path.glob("adapter/**/*"), tmp_path / "adapter"]}  # fmt: skip
    files, folders = 0o666 & ~umask, 0o777 & ~umask
    assert mode == {
        "summary.json": files, "adapter": folders, "adapter/adapter_model.safetensors": files,
        "adapter/nested": folders, "adapter/nested/notes.txt": files,
    }  # fmt: skip
