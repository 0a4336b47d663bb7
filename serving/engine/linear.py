"""A frozen linear layer that uses the faster of two CPU kernels for its shape.

`F.linear` on a CPU goes to MKL (fp32) or re-lays the weight out for oneDNN on every call (bf16).
oneDNN can instead take the weight packed once into its blocked layout (what inductor's weight
prepacking does). Which is faster depends on the CPU, not on a rule one can write down:
- on an AVX512-BF16 / AMX CPU, packed bf16 halves every projection (the re-layout per call costs as
  much as the multiply at decode batch sizes);
- on an AMD EPYC with AVX2 only, MKL's fp32 GEMM runs its generic path: packed oneDNN fp32 took
  24 ms against 69 ms for the lm_head at 32 rows, and 166 against 250 µs for gate/up at one row.
So each distinct weight shape is timed once with both kernels, at one row and at `batch_hint` rows
(a decode step's extremes), and the faster is kept. CUDA always uses `F.linear`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import cache

import structlog
import torch
import torch.nn.functional as F

log = structlog.get_logger(__name__)


@cache
def _mkldnn_packing_works(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    try:  # the ops are internal: prove they give F.linear's answer before trusting them
        probe_w = torch.randn(8, 16, dtype=dtype)
        probe_x = torch.randn(3, 16, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(probe_w, 32)
        out = torch.ops.mkldnn._linear_pointwise(probe_x, packed, None, "none", [], "")
        return bool(torch.allclose(out.float(), F.linear(probe_x, probe_w).float(), atol=1e-2, rtol=1e-2))
    except (RuntimeError, AttributeError):
        return False


def best_seconds(run: Callable[[], object], repeat: int = 3) -> float:
    """The fastest of `repeat` timed calls, after one untimed call (allocation, kernel selection)."""
    run()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


@cache
def packing_pays(out_features: int, in_features: int, dtype: torch.dtype, batch_hint: int) -> bool:
    """Whether packed oneDNN beats `F.linear` on this CPU for a weight of this shape (timed once per shape)."""
    if not _mkldnn_packing_works(dtype):
        return False
    weight = torch.randn(out_features, in_features, dtype=dtype)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
    plain_s = packed_s = 0.0
    for rows in sorted({1, batch_hint}):
        x = torch.randn(rows, in_features, dtype=dtype)
        plain_s += best_seconds(lambda x=x: F.linear(x, weight))
        packed_s += best_seconds(lambda x=x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
    pays = packed_s < plain_s
    log.debug(
        "linear kernel",
        shape=[out_features, in_features],
        dtype=str(dtype),
        kernel="onednn-packed" if pays else "F.linear",
        us_plain=round(plain_s * 1e6),
        us_packed=round(packed_s * 1e6),
    )
    return pays


class FrozenLinear:
    """y = x @ W.T (+ bias) for inference only; W: [out, in]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, batch_hint: int = 32) -> None:
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.packed = weight.device.type == "cpu" and packing_pays(
            self.out_features, self.in_features, weight.dtype, batch_hint
        )
        if self.packed:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch_hint)
        else:
            self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
