"""LoRA: fixed ranks, the baseline at the same budget (every hook is the default)."""

from __future__ import annotations

from alora_ds.methods.base import Method


class LoRA(Method):
    """r_init on every module for the whole run: the same loop with no rounds."""

    name = "lora"
