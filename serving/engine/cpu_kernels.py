"""The engine's own CPU kernels (`csrc/`): per-row LoRA (`lora_sgmv.cpp`), decode attention
(`decode_attention.cpp`), the residual add + RMSNorm (`rms_norm.cpp`) and RoPE with the decode rows' KV
writes (`rope_store.cpp`), for what eager PyTorch does in many small ops on a CPU.

They are compiled once per machine with the system's C++ compiler (g++ or `$CXX`, `-march=native`) into
`~/.cache/loraloop/kernels` (`LORALOOP_KERNEL_CACHE_DIR`), loaded with ctypes (no PyTorch headers, so
the build takes a second or two) and each is checked against PyTorch on random data before it is
trusted. Without a compiler, or where a check fails, that kernel is None and the engine keeps its
PyTorch path. OpenMP comes from the `libgomp.so.1` PyTorch has already loaded, so the kernels share
PyTorch's thread pool and thread count instead of starting a second pool.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import structlog
import torch
import torch.nn.functional as F

log = structlog.get_logger(__name__)

SOURCES = sorted(Path(__file__).with_name("csrc").glob("*.cpp"))
HEADERS = sorted(Path(__file__).with_name("csrc").glob("*.h"))
MAX_MEMBERS = 4
_DTYPES = (torch.bfloat16, torch.float32)
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class KernelGroup(ctypes.Structure):
    """Mirrors `struct Group` in lora_sgmv.cpp: one projection group of one layer."""

    _fields_ = [
        ("in_features", _i64),
        ("a_cols", _i64),
        ("members", _i64),
        ("rank", _i64),
        ("num_slots", _i64),
        ("weight_bf16", _i64),
        ("a", _ptr),
        ("b", _ptr * MAX_MEMBERS),
        ("outs", _i64 * MAX_MEMBERS),
        ("y_offsets", _i64 * MAX_MEMBERS),
    ]


class LoraKernel:
    """y[t] += x[t] @ A[slot_t] @ B[slot_t] for each token's own adapter slot, one call per projection group."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._sgmv = library.lora_sgmv
        self._sgmv.restype = None
        self._sgmv.argtypes = [ctypes.POINTER(KernelGroup), _i64, _ptr, _ptr, _i64, _ptr, _i64, _i64]

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


class DecodeAttention:
    """Each decode row's query against its own KV slot's first `length` positions, all rows in one call."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._attend = library.decode_attention
        self._attend.restype = None
        self._attend.argtypes = [_i64, _ptr, _ptr, _ptr, _i64, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64, _ptr, _i64]
        self._attend.argtypes += [ctypes.c_float, _i64]
        self._supports = library.decode_attention_supports
        self._supports.restype = _i64
        self._supports.argtypes = [_i64, _i64]

    def supports(self, heads: int, kv_heads: int, head_dim: int) -> bool:
        """Whether the kernel has a variant for this attention shape (else the engine keeps SDPA)."""
        return heads % kv_heads == 0 and bool(self._supports(heads // kv_heads, head_dim))

    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
        lengths: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """q: [B, Hq, D]; k_cache, v_cache: [slots, Hkv, capacity, D]; slots, lengths: int64 [B] -> [B, Hq * D].

        The shape must be one `supports` accepts, and 1 <= length <= capacity with slots in range (the
        engine's invariants: checked once by the caller or by construction, not per call)."""
        rows, heads, dim = q.shape
        _, kv_heads, capacity, _ = k_cache.shape
        if q.stride(2) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("q needs unit element stride and the caches must be contiguous")
        if not (q.dtype == k_cache.dtype == v_cache.dtype) or q.dtype not in _DTYPES:
            raise ValueError("q and the caches must share a dtype, bf16 or fp32")
        out = torch.empty(rows, heads * dim, dtype=q.dtype)
        self._attend(
            rows,
            slots.data_ptr(),
            lengths.data_ptr(),
            q.data_ptr(),
            q.stride(0),
            q.stride(1),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            kv_heads,
            capacity,
            dim,
            heads // kv_heads,
            out.data_ptr(),
            out.stride(0),
            scale,
            int(q.dtype == torch.bfloat16),
        )
        return out


class AddRmsNorm:
    """x += delta (in place; skipped when delta is None), then RMSNorm(x) * weight rounded as transformers does."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._norm = library.add_rms_norm
        self._norm.restype = None
        self._norm.argtypes = [_i64, _i64, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _i64, ctypes.c_float, _i64]

    def __call__(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x, delta: [T, D] with contiguous rows, weight [D], one dtype (bf16 or fp32) -> [T, D]."""
        rows, dim = x.shape
        if x.stride(1) != 1 or not weight.is_contiguous() or x.dtype not in _DTYPES or weight.dtype != x.dtype:
            raise ValueError("x and weight must be bf16 or fp32 of one dtype, with contiguous rows")
        if delta is not None and (delta.stride(1) != 1 or delta.dtype != x.dtype or delta.shape != x.shape):
            raise ValueError("delta must match x")
        out = torch.empty_like(x)
        self._norm(
            rows,
            dim,
            x.data_ptr(),
            x.stride(0),
            None if delta is None else delta.data_ptr(),
            0 if delta is None else delta.stride(0),
            weight.data_ptr(),
            out.data_ptr(),
            out.stride(0),
            eps,
            int(x.dtype == torch.bfloat16),
        )
        return out


class RopeAndStore:
    """RoPE on a step's query and key heads in place; the decode rows' new keys and values into their KV slots."""

    MAX_HEAD_DIM = 256

    def __init__(self, library: ctypes.CDLL) -> None:
        self._run = library.rope_and_store
        self._run.restype = None
        self._run.argtypes = [_i64, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64, _ptr, _ptr, _i64, _ptr, _ptr]
        self._run.argtypes += [_i64]

    def supports(self, head_dim: int) -> bool:
        return head_dim % 2 == 0 and head_dim <= self.MAX_HEAD_DIM

    def __call__(
        self,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin_signed: torch.Tensor,
        heads: tuple[int, int],
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
        write_positions: torch.Tensor,
    ) -> None:
        """qkv: [T, (Hq + 2 Hkv) * D] (q, k, v heads side by side), rotated in place at `positions` [T] by the
        cos/sin tables [P, D]; rows t < len(slots) also go to k_cache/v_cache [slots, Hkv, capacity, D] at
        (slots[t], write_positions[t]). heads: (Hq, Hkv). Positions and cache places must be in range (the
        engine's invariants, not checked per call)."""
        q_heads, kv_heads = heads
        dim = cos.shape[1]
        tensors = (qkv, cos, sin_signed, k_cache, v_cache)
        if qkv.stride(1) != 1 or not all(t.is_contiguous() for t in tensors[1:]) or not self.supports(dim):
            raise ValueError("qkv needs contiguous rows, the tables and caches must be contiguous")
        if len({t.dtype for t in tensors}) != 1 or qkv.dtype not in _DTYPES:
            raise ValueError("qkv, the tables and the caches must share a dtype, bf16 or fp32")
        if qkv.shape[1] != (q_heads + 2 * kv_heads) * dim or len(slots) > qkv.shape[0]:
            raise ValueError("qkv's rows must hold the q, k and v heads")
        self._run(
            qkv.shape[0],
            len(slots),
            qkv.data_ptr(),
            qkv.stride(0),
            positions.data_ptr(),
            cos.data_ptr(),
            sin_signed.data_ptr(),
            q_heads,
            kv_heads,
            dim,
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            k_cache.shape[2],
            slots.data_ptr(),
            write_positions.data_ptr(),
            int(qkv.dtype == torch.bfloat16),
        )


def rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin in PyTorch ops, rounding as transformers does (the path without the
    kernel, and its reference). x: [T, H, D]; cos, sin_signed: [T, 1, D], sin's first half negated."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin_signed


@dataclass(frozen=True)
class CpuKernels:
    """The kernels that built and passed their check here; None for each that did not (PyTorch ops then)."""

    lora: LoraKernel | None = None
    attention: DecodeAttention | None = None
    norm: AddRmsNorm | None = None
    rope: RopeAndStore | None = None


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
    """The shared library for these sources, compiler and CPU, compiled now if it is not cached."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    identity = [p.read_text() for p in SOURCES + HEADERS] + [version, _cpu_flags(), *_FLAGS]
    key = hashlib.sha256("\0".join(identity).encode()).hexdigest()[:16]
    target = _cache_dir() / f"loraloop_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        command = [compiler, *_FLAGS, *map(str, SOURCES), "-o", str(built)]
        subprocess.run(command, capture_output=True, text=True, check=True)
        os.replace(built, target)  # atomic: a concurrent build of the same key writes the same bytes
    log.info("cpu kernels built", path=str(target), seconds=round(time.perf_counter() - started, 1))
    return target


def reference_lora(a: torch.Tensor, bs: list[torch.Tensor], slots: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What the LoRA kernel adds, in fp32 PyTorch: [T, sum(outs)]."""
    rank = bs[0].shape[1]
    rows = []
    for t, slot in enumerate(slots.tolist()):
        if slot == 0:
            rows.append(torch.zeros(sum(b.shape[2] for b in bs)))
            continue
        h = x[t].float() @ a[slot].float()
        rows.append(torch.cat([h[m * rank : (m + 1) * rank] @ b[slot].float() for m, b in enumerate(bs)]))
    return torch.stack(rows)


def reference_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """What the attention kernel returns (scale 1/sqrt(D)), in fp32 PyTorch SDPA, row by row: [B, Hq * D]."""
    rows = []
    for b, (slot, length) in enumerate(zip(slots.tolist(), lengths.tolist(), strict=True)):
        out = F.scaled_dot_product_attention(
            q[b].float()[None, :, None, :],  # [1, Hq, 1, D]
            k_cache[slot : slot + 1, :, :length].float(),
            v_cache[slot : slot + 1, :, :length].float(),
            enable_gqa=True,
        )
        rows.append(out.reshape(-1))
    return torch.stack(rows)


def _lora_works(kernel: LoraKernel) -> bool:
    gen = torch.Generator().manual_seed(0)
    slots = torch.tensor([0, 2, 1, 2, 2, 0, 1, 3] * 5)  # 40 tokens: more than one chunk of one slot
    for act_dtype in _DTYPES:
        for weight_dtype in _DTYPES:
            a = torch.randn(4, 24, 2 * 8, generator=gen).to(weight_dtype)
            bs = [torch.randn(4, 8, out, generator=gen).to(weight_dtype) for out in (40, 24)]
            x = torch.randn(len(slots), 24, generator=gen).to(act_dtype)
            y = torch.randn(len(slots), 64, generator=gen).to(act_dtype)
            expected = y.float() + reference_lora(a, bs, slots, x)
            kernel.apply(kernel.group(a, bs), slots, x, y)
            tolerance = 0.05 if act_dtype == torch.bfloat16 else 1e-4
            if not torch.allclose(y.float(), expected, atol=tolerance, rtol=tolerance):
                return False
    return True


def _attention_works(kernel: DecodeAttention) -> bool:
    gen = torch.Generator().manual_seed(0)
    slots, lengths = torch.tensor([3, 0, 2]), torch.tensor([37, 1, 64])
    for dtype in _DTYPES:
        q = torch.randn(3, 6, 64, generator=gen).to(dtype)  # 6 query heads over 2 KV heads
        k = torch.randn(4, 2, 80, 64, generator=gen).to(dtype)
        v = torch.randn(4, 2, 80, 64, generator=gen).to(dtype)
        got = kernel(q, k, v, slots, lengths, 64**-0.5)
        tolerance = 0.02 if dtype == torch.bfloat16 else 1e-5
        if not torch.allclose(got.float(), reference_attention(q, k, v, slots, lengths), atol=tolerance, rtol=0):
            return False
    return True


def reference_add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, RMSNorm(x + delta) * weight) in PyTorch, rounding as transformers' LlamaRMSNorm."""
    summed = x if delta is None else x + delta
    return summed, F.rms_norm(summed, (x.shape[1],), None, eps) * weight


def _norm_works(kernel: AddRmsNorm) -> bool:
    gen = torch.Generator().manual_seed(0)
    for dtype in _DTYPES:
        x, delta = torch.randn(5, 72, generator=gen).to(dtype), torch.randn(5, 72, generator=gen).to(dtype)
        weight = torch.randn(72, generator=gen).to(dtype)
        expected_x, expected = reference_add_rms_norm(x, delta, weight, 1e-5)
        got = kernel(x, delta, weight, 1e-5)  # x becomes x + delta
        tolerance = 0.02 if dtype == torch.bfloat16 else 1e-5  # bf16: one rounding step at most
        if not (torch.equal(x, expected_x) and torch.allclose(got, expected, atol=tolerance, rtol=tolerance)):
            return False
    return True


def _rope_works(kernel: RopeAndStore) -> bool:
    gen = torch.Generator().manual_seed(0)
    q_heads, kv_heads, dim, tokens = 6, 2, 64, 5
    positions, slots, at = torch.tensor([7, 0, 33, 4, 5]), torch.tensor([2, 0]), torch.tensor([7, 0])
    for dtype in _DTYPES:
        angles = torch.rand(40, dim, generator=gen) * 6
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
        k_cache, v_cache = torch.zeros(3, kv_heads, 9, dim, dtype=dtype), torch.zeros(3, kv_heads, 9, dim, dtype=dtype)
        heads = qkv.view(tokens, -1, dim)
        rotated = rope(heads[:, : q_heads + kv_heads], cos[positions, None], sin[positions, None])
        kernel(qkv, positions, cos, sin, (q_heads, kv_heads), k_cache, v_cache, slots, at)
        stored = all(
            torch.equal(k_cache[s, :, p], rotated[t, q_heads:]) and torch.equal(v_cache[s, :, p], heads[t, -kv_heads:])
            for t, (s, p) in enumerate(zip(slots.tolist(), at.tolist(), strict=True))
        )
        if not (torch.equal(heads[:, : q_heads + kv_heads], rotated) and stored):
            return False
    return True


def find_compiler() -> str | None:
    """The C++ compiler the kernels are built with: `$CXX`, else g++ on the PATH."""
    return os.environ.get("CXX") or shutil.which("g++")


@cache
def load_cpu_kernels() -> CpuKernels:
    """The compiled kernels that agree with PyTorch here; None for each that cannot be built or does not."""
    compiler = find_compiler()
    if compiler is None:
        log.info("cpu kernels unavailable: no C++ compiler; the engine runs PyTorch ops")
        return CpuKernels()
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        log.warning("cpu kernels unavailable: build failed; the engine runs PyTorch ops", error=detail[-2000:])
        return CpuKernels()
    lora, attention, norm = LoraKernel(library), DecodeAttention(library), AddRmsNorm(library)
    rope_store = RopeAndStore(library)
    checked = CpuKernels(
        lora if _lora_works(lora) else None,
        attention if _attention_works(attention) else None,
        norm if _norm_works(norm) else None,
        rope_store if _rope_works(rope_store) else None,
    )
    names = {
        "lora": checked.lora,
        "decode attention": checked.attention,
        "rms norm": checked.norm,
        "rope": checked.rope,
    }
    for name, kernel in names.items():
        if kernel is None:
            log.warning(f"cpu kernel for {name} disagrees with PyTorch; that step runs PyTorch ops")
    return checked
