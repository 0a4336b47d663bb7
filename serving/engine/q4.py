"""4-bit projections for small steps: a Q4 model's weights served in the 4-bit form they came in.

The bundled model ships as a Q4_1 GGUF: every projection row is blocks of 32 weights, each block 16
evenly spaced levels (`min + step * q`, q in 0..15). Loaded to bf16 those values take 3.2x the bytes,
and a decode step of a few rows is bound by reading them: at one row on an AMX Xeon the 30 layers'
projections took 11.8 ms of a 24 ms step as packed bf16, 3.6 ms in the 4-bit form through PyTorch's
group-wise int4 kernel (`_weight_int4pack_mm_for_cpu`, the one gpt-fast and torchao use on CPU).
That kernel unpacks to fp32 and multiplies on the vector units, so its cost grows with the rows
where packed bf16 (AMX) stays flat: 6.2 vs 11.5 ms at 4 rows, even at 6-8, slower beyond. So the
lean model keeps both forms and uses the 4-bit one for steps of up to `q4_rows` rows, a number timed
once at load on this CPU (`rows_where_q4_pays`).

A weight gets a 4-bit copy only when it *is* such a grid: quantising it must give back every value
within a tenth of a level (a real bf16/fp16 model, or a merged adapter, lands up to half a level
off and is left alone). So the 4-bit form is another encoding of the same weights, never a coarser
model; what differs is rounding (the kernel's scale and zero are bf16; it accumulates in fp32):
on the bundled model a projection's outputs differ from bf16's by ~0.4 % of their range, the size
of bf16's own rounding. CPU only: CUDA's int4 kernel wants another layout and is not measured here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import structlog
import torch

from serving.engine.linear import best_seconds

log = structlog.get_logger(__name__)

GROUP_SIZE = 32  # Q4_0 / Q4_1 block length: the weights one scale and one minimum cover
LEVELS = 15  # q in 0..15
ON_GRID_SLACK = 0.1  # how far from a level (in levels) a value may be and still count as on the grid
PAYS_BELOW = 0.9  # the 4-bit form must be this much faster: near the crossover timing noise decides
_KERNEL_ZERO_LEVEL = 8  # the int4 kernel dequantises (q - 8) * scale + zero


@cache
def q4_kernel_works() -> bool:
    """Whether this PyTorch has the CPU int4 kernel and it gives the dequantised weights' answer."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return False
    try:  # an internal op: prove it before trusting it
        levels = torch.randint(0, LEVELS + 1, (64, 2 * GROUP_SIZE), generator=torch.Generator().manual_seed(0))
        levels[:, ::GROUP_SIZE], levels[:, 1::GROUP_SIZE] = 0, LEVELS  # as in Q4_1: each block spans all 16 levels
        weight = (levels.float() * 0.5 - 3.0).to(torch.bfloat16)  # a grid: step 0.5 from -3
        q4 = Q4Weight.from_grid(weight)
        x = torch.randn(3, 2 * GROUP_SIZE, dtype=torch.bfloat16)
        reference = x.float() @ weight.float().T
        return q4 is not None and bool(torch.allclose(q4(x).float(), reference, atol=0.1, rtol=0.02))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


@dataclass(frozen=True)
class Q4Weight:
    """A frozen projection y = x @ W.T (+ bias) with W held as 4-bit levels plus a bf16 scale and zero per block."""

    packed: torch.Tensor  # the kernel's packed int4 layout of W's levels
    scales_and_zeros: torch.Tensor  # [in / 32, out, 2] in the activations' dtype
    bias: torch.Tensor | None

    @classmethod
    def from_grid(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Q4Weight | None:
        """The 4-bit form of `weight` [out, in] (bf16, on a CPU), or None when it is not a 4-bit grid."""
        out_features, in_features = weight.shape
        if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or in_features % GROUP_SIZE:
            return None
        blocks = weight.float().view(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
        low = blocks.amin(-1, keepdim=True)
        step = (blocks.amax(-1, keepdim=True) - low) / LEVELS
        step = torch.where(step > 0, step, torch.ones_like(step))  # a constant block: every value is level 0
        exact = (blocks - low) / step
        levels = exact.round()
        if (exact - levels).abs().max().item() > ON_GRID_SLACK:
            return None
        zeros = low + _KERNEL_ZERO_LEVEL * step
        scales_and_zeros = torch.cat((step, zeros), -1).transpose(0, 1).to(weight.dtype).contiguous()
        try:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                levels.view(out_features, in_features).to(torch.int32), 1
            )
        except RuntimeError:  # a shape the kernel does not take
            return None
        return cls(packed, scales_and_zeros, bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP_SIZE, self.scales_and_zeros)
        return y if self.bias is None else y.add_(self.bias)


def rows_where_q4_pays(
    dense: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    q4: Sequence[Q4Weight],
    in_features: Sequence[int],
    *,
    max_rows: int = 16,
) -> int:
    """The most rows a step may have for the 4-bit projections to beat the dense ones (0: never).

    Times every projection of the model in turn, as a step reads them (from memory, not cache), at
    1, 2, 3, ... rows until the 4-bit form stops winning."""
    best = 0
    for rows in range(1, max_rows + 1):
        inputs = {n: torch.randn(rows, n, dtype=torch.bfloat16) for n in set(in_features)}
        dense_s = best_seconds(lambda inputs=inputs: _run_all(dense, in_features, inputs))
        q4_s = best_seconds(lambda inputs=inputs: _run_all(q4, in_features, inputs))
        log.debug("q4 projections", rows=rows, ms_dense=round(dense_s * 1e3, 2), ms_q4=round(q4_s * 1e3, 2))
        if q4_s > PAYS_BELOW * dense_s:
            break
        best = rows
    return best


def _run_all(
    projections: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    in_features: Sequence[int],
    inputs: dict[int, torch.Tensor],
) -> None:
    for project, n in zip(projections, in_features, strict=True):
        project(inputs[n])
