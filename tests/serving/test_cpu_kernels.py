"""The engine's C++ kernels (the LoRA one mostly with the adapter slots; here the shapes those never have): decode
attention gives each
row's query against its own KV slot's first `length` positions the numbers PyTorch's SDPA gives (fp32 to
rounding, bf16 within its precision) and reads nothing past a row's length; the residual add + RMSNorm
rounds exactly where transformers' LlamaRMSNorm does."""

from __future__ import annotations

import pytest
import torch

from serving.engine.cpu_kernels import (
    AddRmsNorm,
    DecodeAttention,
    LoraKernel,
    RopeAndStore,
    find_compiler,
    load_cpu_kernels,
    reference_add_rms_norm,
    reference_attention,
    reference_lora,
    rope,
)


def _built(name: str) -> object:
    if find_compiler() is None:
        pytest.skip("no C++ compiler here: the engine uses PyTorch ops")
    kernel = getattr(load_cpu_kernels(), name)
    assert kernel is not None, "a compiler is here, so the kernel must build and agree with PyTorch"
    return kernel


@pytest.fixture
def attention() -> DecodeAttention:
    return _built("attention")


@pytest.fixture
def norm() -> AddRmsNorm:
    return _built("norm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("in_features", "rank", "outs"),
    [(64, 8, (64, 16)), (96, 6, (40, 23)), (23, 3, (17,)), (48, 5, (33, 80, 7))],
    ids=["whole-vectors", "column-tails", "odd-depths", "odd-rank"],
)
def test_lora_gives_each_token_its_slots_lora_for_any_shape(
    in_features: int, rank: int, outs: tuple[int, ...], dtype: torch.dtype
) -> None:
    """Columns that fill no whole vector (masked on the AVX512-BF16 path) and odd depths (which that path's pairs
    cannot take: the widening path runs them) give the reference's numbers too."""
    kernel: LoraKernel = _built("lora")
    gen = torch.Generator().manual_seed(0)
    slots = torch.tensor([0, 2, 1, 2, 2, 0, 1, 3] * 3 + [2] * 21)  # and more than a 16-token work item of slot 2
    a = torch.randn(4, in_features, len(outs) * rank, generator=gen).to(dtype)
    bs = [torch.randn(4, rank, out, generator=gen).to(dtype) for out in outs]
    x = torch.randn(len(slots), in_features, generator=gen).to(dtype)
    y = torch.randn(len(slots), sum(outs), generator=gen).to(dtype)
    expected = y.float() + reference_lora(a, bs, slots, x)
    kernel.apply(kernel.group(a, bs), slots, x, y)
    # bf16: x @ A is rounded to bf16 before B (as PyTorch's bf16 matmuls round it), and so is the sum.
    rtol, atol = (1e-5, 1e-4) if dtype == torch.float32 else (2e-2, 0.5)
    torch.testing.assert_close(y.float(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 2, 16), (8, 8, 128), (8, 1, 32)])
def test_every_row_attends_over_its_own_slot_as_sdpa_does(
    attention: DecodeAttention, heads: int, kv_heads: int, dim: int, dtype: torch.dtype
) -> None:
    assert attention.supports(heads, kv_heads, dim)
    gen = torch.Generator().manual_seed(heads * dim)
    slots = torch.tensor([5, 0, 3, 6, 1])  # rows in any slot order, slots 2 and 4 unused
    lengths = torch.tensor([1, 16, 17, 100, 64])  # one position, exactly one vector block, just over, long
    # The rows' queries are a strided view, as in the engine (q beside k in one projection output).
    q = torch.randn(len(slots), heads + kv_heads, dim, generator=gen).to(dtype)[:, :heads]
    k = torch.randn(7, kv_heads, 128, dim, generator=gen).to(dtype)
    v = torch.randn(7, kv_heads, 128, dim, generator=gen).to(dtype)
    got = attention(q, k, v, slots, lengths, dim**-0.5)
    expected = reference_attention(q, k, v, slots, lengths)
    assert got.shape == (len(slots), heads * dim) and got.dtype == dtype
    # fp32: summation order only. bf16: inputs and output are rounded to 8 bits of mantissa (outputs ~0.1-1).
    atol = 2e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), expected, atol=atol, rtol=0)


def test_positions_past_a_rows_length_are_never_read(attention: DecodeAttention) -> None:
    """The engine zeroes nothing for the kernel: whatever sits past a row's length (an earlier sequence's
    keys, uninitialised memory) must not reach its output."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 64, generator=gen)
    k, v = torch.randn(2, 2, 64, 64, generator=gen), torch.randn(2, 2, 64, 64, generator=gen)
    slots, lengths = torch.tensor([0, 1]), torch.tensor([20, 33])
    clean = attention(q, k, v, slots, lengths, 0.125)
    k[0, :, 20:], v[0, :, 20:], k[1, :, 33:], v[1, :, 33:] = float("nan"), float("nan"), float("inf"), float("inf")
    assert torch.equal(attention(q, k, v, slots, lengths, 0.125), clean)


def test_shapes_without_a_variant_are_refused(attention: DecodeAttention) -> None:
    assert not attention.supports(9, 3, 48)  # head_dim not 16/32/64/128: the engine keeps SDPA
    assert not attention.supports(32, 2, 64)  # 16 query heads per KV head
    assert not attention.supports(9, 2, 64)  # heads not a multiple of KV heads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_adds_the_residual_in_place_and_rounds_as_transformers(
    norm: AddRmsNorm, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(40, 576, generator=gen)).to(dtype)
    delta = torch.randn(40, 576, generator=gen).to(dtype)
    weight = (2 * torch.rand(576, generator=gen)).to(dtype)
    expected_x, expected = reference_add_rms_norm(x.clone(), delta, weight, 1e-5)
    got = norm(x, delta, weight, 1e-5)
    assert torch.equal(x, expected_x)  # x + delta, rounded once, written into x
    if dtype == torch.bfloat16:  # the sum of squares' order moves rstd by an fp32 ulp: bf16 hides it
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=2e-6)
    before = x.clone()
    torch.testing.assert_close(norm(x, None, weight, 1e-5), reference_add_rms_norm(before, None, weight, 1e-5)[1])
    assert torch.equal(x, before)  # no residual: x untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("q_heads", "kv_heads", "dim"), [(9, 3, 64), (4, 2, 48), (8, 8, 128), (2, 1, 6)])
def test_rope_rotates_in_place_as_pytorch_does_and_stores_only_the_decode_rows(
    q_heads: int, kv_heads: int, dim: int, dtype: torch.dtype
) -> None:
    """Bit-equal to the PyTorch ops (two rounded products, a rounded sum) for vector-wide and odd half widths;
    the first rows' keys and values land at their slots' positions and nothing else in the cache changes."""
    kernel: RopeAndStore = _built("rope")
    gen = torch.Generator().manual_seed(0)
    tokens, table = 7, 50
    angles = torch.rand(table, dim, generator=gen) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    positions = torch.tensor([3, 49, 0, 17, 18, 19, 20])
    slots, at = torch.tensor([4, 0, 2]), torch.tensor([11, 0, 5])  # three decode rows, then a prompt chunk
    k_cache = torch.full((5, kv_heads, 12, dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    heads = qkv.view(tokens, -1, dim)
    expected = rope(heads[:, : q_heads + kv_heads].clone(), cos[positions, None], sin[positions, None])
    values = heads[:, q_heads + kv_heads :].clone()
    kernel(qkv, positions, cos, sin, (q_heads, kv_heads), k_cache, v_cache, slots, at)
    assert torch.equal(heads[:, : q_heads + kv_heads], expected)
    assert torch.equal(heads[:, q_heads + kv_heads :], values)  # v is not rotated
    for t, (slot, place) in enumerate(zip(slots.tolist(), at.tolist(), strict=True)):
        assert torch.equal(k_cache[slot, :, place], expected[t, q_heads:])
        assert torch.equal(v_cache[slot, :, place], values[t])
        k_cache[slot, :, place] = v_cache[slot, :, place] = float("nan")
    assert k_cache.isnan().all() and v_cache.isnan().all()  # nothing else was written
