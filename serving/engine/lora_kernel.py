"""The CPU kernel that adds every token's own LoRA in one call per projection group (`lora_kernel.cpp`).

It is compiled once per machine with the system's C++ compiler (g++ or `$CXX`, `-march=native`) into
`~/.cache/loraloop/kernels` (`LORALOOP_KERNEL_CACHE_DIR`), loaded with ctypes (no PyTorch headers, so
the build takes a second or two) and checked against PyTorch on random data before it is trusted.
Without a compiler, or if the check fails, `load_lora_kernel()` returns None and the adapter slots
keep their PyTorch path. OpenMP comes from the `libgomp.so.1` PyTorch has already loaded, so the
kernel shares PyTorch's thread pool and thread count instead of starting a second pool.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from functools import cache
from pathlib import Path

import structlog
import torch

log = structlog.get_logger(__name__)

SOURCE = Path(__file__).with_name("lora_kernel.cpp")
MAX_MEMBERS = 4


class KernelGroup(ctypes.Structure):
    """Mirrors `struct Group` in lora_kernel.cpp: one projection group of one layer."""

    _fields_ = [
        ("in_features", ctypes.c_int64),
        ("a_cols", ctypes.c_int64),
        ("members", ctypes.c_int64),
        ("rank", ctypes.c_int64),
        ("num_slots", ctypes.c_int64),
        ("weight_bf16", ctypes.c_int64),
        ("a", ctypes.c_void_p),
        ("b", ctypes.c_void_p * MAX_MEMBERS),
        ("outs", ctypes.c_int64 * MAX_MEMBERS),
        ("y_offsets", ctypes.c_int64 * MAX_MEMBERS),
    ]


class LoraKernel:
    def __init__(self, library: ctypes.CDLL) -> None:
        self._sgmv = library.lora_sgmv
        self._sgmv.restype = None
        self._sgmv.argtypes = [
            ctypes.POINTER(KernelGroup),
            ctypes.c_int64,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
        ]

    @staticmethod
    def group(a: torch.Tensor, bs: list[torch.Tensor]) -> KernelGroup:
        """The kernel's view of one group: A `[slots, in, members * r]`, each B_m `[slots, r, out_m]`.

        The tensors must stay alive (and in place) while the group is used: it holds their addresses."""
        slots, in_features, a_cols = a.shape
        rank = bs[0].shape[1]
        if not (a.is_contiguous() and all(b.is_contiguous() for b in bs)) or a.dtype not in _DTYPES:
            raise ValueError("LoRA factors must be contiguous bf16 or fp32 CPU tensors")
        if len(bs) > MAX_MEMBERS or a_cols != len(bs) * rank or any(b.dtype != a.dtype for b in bs):
            raise ValueError("A's columns must be the members' ranks side by side")
        outs = [b.shape[2] for b in bs]
        offsets = [sum(outs[:m]) for m in range(len(outs))]
        group = KernelGroup(in_features, a_cols, len(bs), rank, slots, int(a.dtype == torch.bfloat16), a.data_ptr())
        for m, b in enumerate(bs):
            group.b[m], group.outs[m], group.y_offsets[m] = b.data_ptr(), outs[m], offsets[m]
        return group

    def apply(self, group: KernelGroup, slots: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
        """y[t] += LoRA of slot `slots[t]` (0: none) applied to x[t], in place.  x: [T, in], y: [T, out]."""
        if x.dtype != y.dtype or x.dtype not in _DTYPES or x.stride(1) != 1 or y.stride(1) != 1:
            raise ValueError("x and y must be bf16 or fp32 with contiguous rows")
        self._sgmv(
            ctypes.byref(group),
            x.shape[0],
            slots.data_ptr(),
            x.data_ptr(),
            x.stride(0),
            y.data_ptr(),
            y.stride(0),
            int(x.dtype == torch.bfloat16),
        )


_DTYPES = (torch.bfloat16, torch.float32)


# -march=native: the library is built on, and for, the machine that runs it. 512-bit vectors where the CPU
# has them (GCC prefers 256 on Intel), so the tiles' accumulators fit in registers.
_FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]


def _cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "loraloop" / "kernels"
    return Path(os.environ.get("LORALOOP_KERNEL_CACHE_DIR", default))


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _build(compiler: str) -> Path:
    """The shared library for this source, compiler and CPU, compiled now if it is not cached."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    identity = [SOURCE.read_text(), version, _cpu_flags(), *_FLAGS]
    key = hashlib.sha256("\0".join(identity).encode()).hexdigest()[:16]
    target = _cache_dir() / f"lora_kernel-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([compiler, *_FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True, check=True)
        os.replace(built, target)  # atomic: a concurrent build of the same key writes the same bytes
    log.info("lora kernel built", path=str(target), seconds=round(time.perf_counter() - started, 1))
    return target


def reference_apply(a: torch.Tensor, bs: list[torch.Tensor], slots: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What the kernel adds, in fp32 PyTorch: [T, sum(outs)]."""
    rank = bs[0].shape[1]
    rows = []
    for t, slot in enumerate(slots.tolist()):
        if slot == 0:
            rows.append(torch.zeros(sum(b.shape[2] for b in bs)))
            continue
        h = x[t].float() @ a[slot].float()
        rows.append(torch.cat([h[m * rank : (m + 1) * rank] @ b[slot].float() for m, b in enumerate(bs)]))
    return torch.stack(rows)


def _works(kernel: LoraKernel) -> bool:
    """The kernel agrees with PyTorch on random factors and mixed slots, for each dtype pairing."""
    gen = torch.Generator().manual_seed(0)
    slots = torch.tensor([0, 2, 1, 2, 2, 0, 1, 3] * 5)  # 40 tokens: more than one chunk of one slot
    for act_dtype in _DTYPES:
        for weight_dtype in _DTYPES:
            a = torch.randn(4, 24, 2 * 8, generator=gen).to(weight_dtype)
            bs = [torch.randn(4, 8, out, generator=gen).to(weight_dtype) for out in (40, 24)]
            x = torch.randn(len(slots), 24, generator=gen).to(act_dtype)
            y = torch.randn(len(slots), 64, generator=gen).to(act_dtype)
            expected = y.float() + reference_apply(a, bs, slots, x)
            kernel.apply(kernel.group(a, bs), slots, x, y)
            tolerance = 0.05 if act_dtype == torch.bfloat16 else 1e-4
            if not torch.allclose(y.float(), expected, atol=tolerance, rtol=tolerance):
                return False
    return True


@cache
def load_lora_kernel() -> LoraKernel | None:
    """The compiled kernel, or None where it cannot be built or does not agree with PyTorch."""
    compiler = os.environ.get("CXX") or shutil.which("g++")
    if compiler is None:
        log.info("lora kernel unavailable: no C++ compiler; LoRA runs as PyTorch ops")
        return None
    try:
        kernel = LoraKernel(ctypes.CDLL(str(_build(compiler))))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        log.warning("lora kernel unavailable: build failed; LoRA runs as PyTorch ops", error=detail[-2000:])
        return None
    if not _works(kernel):
        log.warning("lora kernel disagrees with PyTorch; LoRA runs as PyTorch ops")
        return None
    return kernel
