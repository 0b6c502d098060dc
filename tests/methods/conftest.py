"""A real engine in this one process (a process group of one, ZeRO stage 0): the methods are
unit-tested through the same Engine the trainer hands them, without any launcher."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import torch.distributed as dist

from alora_ds.core.inject import inject_gated_lora
from alora_ds.core.layer import GateKind
from alora_ds.io.models import build_random_llama, tiny_llama_config
from alora_ds.runtime import process as P
from alora_ds.runtime import zero
from alora_ds.runtime.engine import Engine
from tests.helpers import randomise_adapters

_GROUP_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
    "train_batch_size": 4, "zero_optimization": {"stage": 0}, "steps_per_print": 10**9,
}  # fmt: skip


@pytest.fixture(scope="module")
def info() -> Iterator[P.DistInfo]:
    """A process group of one for the module; the variables it sets are put back after, so
    launches of later tests do not inherit them."""
    saved = {name: os.environ.get(name) for name in _GROUP_VARS}
    info = P.init_distributed(60)
    yield info
    dist.destroy_process_group()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def make_engine(info) -> Callable[..., Engine]:
    """engine(gate_kind, rank_budget=28, seed=0): the tiny LLaMA with random adapters."""

    def build(gate_kind: GateKind = GateKind.HARD, rank_budget: int = 28, seed: int = 0) -> Engine:
        model = build_random_llama(tiny_llama_config(), seed=seed)
        modules = inject_gated_lora(model, rank_budget, seed=seed, gate_kind=gate_kind)
        randomise_adapters(modules, seed + 1, scale=0.3)
        settings = zero.OptimizerSettings(1e-2, (0.9, 0.999), 1e-8, 0.0)
        return Engine(model, DS_CONFIG, settings, info)

    return build
