"""Shared fixtures. Tests never touch the network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

from alora_ds.modeling import build_random_llama, tiny_llama_config  # noqa: E402


@pytest.fixture
def tiny_model():
    """A seeded tiny LLaMA (hidden 64, 2 layers, vocab 128) in fp32."""
    return build_random_llama(tiny_llama_config(), seed=0)


def random_examples(n: int, length: int = 12, vocab: int = 128, seed: int = 0) -> list[dict]:
    """Pre-tokenized rows with a prompt (-100) and a supervised response, lengths varying."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        size = length - (i % 3)
        ids = torch.randint(3, vocab, (size,), generator=generator).tolist()
        prompt = size // 2
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows
