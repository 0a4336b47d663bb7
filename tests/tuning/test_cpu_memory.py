"""Training on a CPU keeps freed memory for reuse: large tensors stop being fresh mmaps."""

from __future__ import annotations

import ctypes.util
import json
import subprocess
import sys
import textwrap

import pytest

# In a child process: glibc's own counters of memory held in mmapped chunks, around a 64 MB tensor,
# before and after `keep_freed_memory()`.
CHILD = textwrap.dedent(
    """
    import ctypes, json, torch
    from tuning.cpu_memory import keep_freed_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2

    def mmapped_while_allocated() -> int:
        tensor = torch.empty(16 * 2**20, dtype=torch.float32)  # 64 MB: over glibc's largest mmap threshold
        held = libc.mallinfo2().hblkhd
        del tensor
        return held

    before = mmapped_while_allocated()
    applied = keep_freed_memory()
    after = mmapped_while_allocated()
    print(json.dumps({"applied": applied, "before": before, "after": after}))
    """
)


def _has_mallinfo2() -> bool:
    name = ctypes.util.find_library("c")
    try:
        return hasattr(ctypes.CDLL(name or "libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _has_mallinfo2(), reason="glibc's malloc only")
def test_large_tensors_come_from_the_heap_once_freed_memory_is_kept() -> None:
    child = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    figures = json.loads(child.stdout.strip().splitlines()[-1])
    assert figures["applied"] is True
    assert figures["before"] >= 64 * 2**20  # glibc's default: a fresh mmap, unmapped again on free
    assert figures["after"] < 64 * 2**20  # kept: served from malloc's heap, whose pages are reused
