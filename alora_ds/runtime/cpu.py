"""Process settings for runs on CPU (tests, demos, the benchmarks).

glibc returns every block above 128 KB-32 MB to the kernel when it is freed, so a forward whose
activations are tens of MB (a scoring block of several candidates, a training micro-batch)
page-faults its memory in afresh at every op: measured on the 2-core machines, a scoring block
of 8 candidates took 56-65 ms per layer pass with glibc's defaults and 41-44 ms with freed memory
kept for reuse (single candidates, whose activations stay small, 34-43 ms either way). GPU runs
never reach this: the CUDA caching allocator already keeps its blocks.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt's parameter numbers (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Ask glibc to serve allocations below 1 GB from its heap and keep freed memory for the next
    op instead of unmapping it. The process's resident memory then stays at its peak, which a
    run reaches anyway. Returns False (and changes nothing) where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((_M_MMAP_THRESHOLD, 1 << 30), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20))
    return all(mallopt(param, value) == 1 for param, value in settings)
