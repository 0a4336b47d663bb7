"""Training on a CPU: keep freed memory in the process instead of handing it back to the kernel.

TRL scores answers with a chunked LM head: every step allocates and frees tiles of
[tokens, 32768 vocab] fp32 (~180 MB each, a dozen per step). glibc serves any allocation over its
mmap threshold (at most 32 MB) with a fresh `mmap` and unmaps it on free, so every tile is new memory
that the kernel zero-fills page by page: an element-wise pass over a tile ran at ~1 GB/s instead of
the machine's ~25. With mmap off and trimming raised, freed tiles go back to malloc's own heap and the
next step reuses the same pages: a KTO step (batch 8, ~170 tokens) took 8.6 s instead of 11.7 s on a
2-core AVX-512 VM (`bench/training_step.py`). The cost is a process that keeps its peak heap until it
exits, which a round's process does right after.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache

import structlog

log = structlog.get_logger(__name__)

# mallopt(3) parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_KEEP_UP_TO = 2**31 - 1  # bytes of free memory at the heap's top kept before trimming (mallopt takes an int)


@cache
def keep_freed_memory() -> bool:
    """Once per process; True where it took effect (glibc on Linux), False elsewhere (nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    done = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, _KEEP_UP_TO) == 1
    log.debug("malloc keeps freed memory", applied=done)
    return done
