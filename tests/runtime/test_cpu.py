"""CPU process settings (alora_ds.runtime.cpu)."""

from __future__ import annotations

import pytest


def test_cpu_runs_keep_freed_memory_for_the_next_op():
    """glibc here: mallopt accepts every setting (see alora_ds/runtime/cpu.py for the measured cost)."""
    import platform

    from alora_ds.runtime.cpu import keep_freed_memory

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert keep_freed_memory()
