"""Which thread gets the CPU cores for tensor maths: the engine's, not the event loop's.

PyTorch's CPU kernels parallelise with OpenMP, which keeps a pool of worker threads per thread that
starts parallel work. When the main thread (model loading, the event loop) had run parallel work
first, the engine thread's own pool ran bf16 matmuls ~1.6x slower on a 2-core VM: a 1x576 @ 576x3072
linear took 185 us in the main thread, 292 us in the engine thread after it, and 173 us in the
engine thread when the main thread had stayed serial; a whole decode step went from 33 to 49 ms.
So a server process keeps its main thread serial and gives the cores to the engine thread.
"""

from __future__ import annotations

import os

import torch


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def keep_this_thread_serial() -> None:
    """For the server's main thread, before it touches the model."""
    torch.set_num_threads(1)


def claim_cores(threads: int = 0) -> None:
    """For the engine thread, first thing: `threads` intra-op threads (0: every usable core)."""
    torch.set_num_threads(threads or usable_cores())
