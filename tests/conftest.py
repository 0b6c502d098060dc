"""Shared fixtures. Tests never touch the network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402

from alora_ds.io.models import build_random_llama, tiny_llama_config  # noqa: E402


@pytest.fixture
def tiny_model():
    """A seeded tiny LLaMA (hidden 64, 2 layers, vocab 128) in fp32."""
    return build_random_llama(tiny_llama_config(), seed=0)
