"""Adapter slots apply each token's own LoRA, whichever path a step takes: one slot for all, decode rows
grouped and padded into batched matmuls, a slice of rows per prompt chunk, or rows by index per slot."""

from __future__ import annotations

import pytest
import torch

from serving.adapters.store import LoRAWeights
from serving.engine.adapter_slots import GROUPS, AdapterSlots, GroupShape
from serving.engine.cpu_kernels import CpuKernels, LoraKernel, find_compiler, load_cpu_kernels
from serving.engine.lora import BASE_SLOT

SHAPES = {
    "qkv": GroupShape(16, (16, 8, 8)),
    "o": GroupShape(16, (16,)),
    "gate_up": GroupShape(16, (24, 24)),
    "down": GroupShape(24, (16,)),
}
LAYERS = 2


def _weights(rank: int, seed: int, modules: tuple[str, ...]) -> LoRAWeights:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        for group, shape in SHAPES.items():
            for name, out in zip(GROUPS[group], shape.outs, strict=True):
                if name not in modules:
                    continue
                part = "self_attn" if group in ("qkv", "o") else "mlp"
                key = f"base_model.model.model.layers.{layer}.{part}.{name}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, shape.in_features, generator=generator)
                tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=generator)
    return LoRAWeights(rank=rank, alpha=2.0 * rank, target_modules=modules, tensors=tensors)


def _reference(weights: LoRAWeights | None, group: str, layer: int, x: torch.Tensor) -> torch.Tensor:
    """One token's LoRA output for one group: the members' B @ A x, concatenated (zeros where untargeted)."""
    shape = SHAPES[group]
    parts = []
    for name, out in zip(GROUPS[group], shape.outs, strict=True):
        part = "self_attn" if group in ("qkv", "o") else "mlp"
        key = f"base_model.model.model.layers.{layer}.{part}.{name}"
        if weights is None or f"{key}.lora_A.weight" not in weights.tensors:
            parts.append(torch.zeros(out))
            continue
        a, b = weights.tensors[f"{key}.lora_A.weight"], weights.tensors[f"{key}.lora_B.weight"]
        parts.append(weights.scaling * (b @ (a @ x)))
    return torch.cat(parts)


@pytest.fixture
def slots() -> tuple[AdapterSlots, dict[int, LoRAWeights]]:
    table = AdapterSlots(
        layers=LAYERS, shapes=SHAPES, num_slots=4, max_rank=16, dtype=torch.float32, device=torch.device("cpu")
    )
    everything = tuple(name for names in GROUPS.values() for name in names)
    loaded = {
        1: _weights(4, 1, ("q_proj", "v_proj", "down_proj")),
        2: _weights(8, 2, everything),  # a larger rank re-allocates the slots and keeps slot 1
        4: _weights(2, 4, ("gate_proj", "o_proj")),
    }
    for slot, weights in loaded.items():
        table.fill(slot, weights)
    return table, loaded


@pytest.mark.parametrize(
    ("token_slots", "decode_rows", "paths"),
    [
        ([2, 2, 2], None, {"single"}),
        ([1, 2, 0, 4, 2, 1, 0], None, {"padded"}),  # decode rows of three adapters and the base
        ([1, 2, 0, 4] + [2] * 20 + [0] * 5 + [1] * 7, 4, {"padded", "slices"}),  # and three prompt chunks
        ([2, 2, 2] + [1] * 10, 3, {"slices"}),  # decode rows of one adapter, a chunk of another
        ([1] * 5 + [0] * 3 + [2] * 6, 0, {"slices"}),  # prompt chunks only
        ([0, 2] + [4] * 90, None, {"indexed"}),  # nearly all decode rows on one slot: padding would cost 3 x 90
    ],
)
def test_every_token_gets_its_own_adapters_lora(
    slots, token_slots: list[int], decode_rows: int | None, paths: set[str]
) -> None:
    table, loaded = slots
    plan = table.plan(token_slots, decode_rows)
    taken = {
        "single": plan.single is not None,
        "padded": plan.padded is not None,
        "slices": any(isinstance(rows, slice) for _, rows in plan.segments),
        "indexed": any(isinstance(rows, torch.Tensor) for _, rows in plan.segments),
    }
    assert {path for path, used in taken.items() if used} == paths
    torch.manual_seed(0)
    for layer in range(LAYERS):
        for group, shape in SHAPES.items():
            x = torch.randn(len(token_slots), shape.in_features)
            base = torch.randn(len(token_slots), shape.out_features)
            y = base.clone()
            table.apply(plan, group, layer, x, y)
            for token, slot in enumerate(token_slots):
                weights = None if slot == BASE_SLOT else loaded[slot]
                expected = base[token] + _reference(weights, group, layer, x[token])
                torch.testing.assert_close(y[token], expected, rtol=1e-5, atol=1e-4)


def test_a_cleared_slot_adds_nothing_and_merging_factors_match(slots) -> None:
    table, loaded = slots
    b, a = table.factors("qkv", 1, 2)  # what merging folds into the weights: W + B @ A
    x = torch.randn(SHAPES["qkv"].in_features)
    torch.testing.assert_close(b @ (a @ x), _reference(loaded[2], "qkv", 1, x), rtol=1e-5, atol=1e-4)
    table.clear(2)
    assert table.factors("qkv", 1, 2) is None
    plan = table.plan([1, 2])
    y = torch.zeros(2, SHAPES["down"].out_features)
    table.apply(plan, "down", 0, torch.ones(2, SHAPES["down"].in_features), y)
    assert torch.count_nonzero(y[1]) == 0 and torch.count_nonzero(y[0]) > 0


def test_a_refilled_slot_s_single_adapter_steps_use_the_new_adapter(slots) -> None:
    """A step of one adapter multiplies a block-diagonal B kept for that slot: a new adapter in the slot replaces it."""
    table, loaded = slots
    x = torch.randn(3, SHAPES["qkv"].in_features)

    def single(slot: int) -> torch.Tensor:
        y = torch.zeros(3, SHAPES["qkv"].out_features)
        table.apply(table.plan([slot] * 3), "qkv", 1, x, y)
        return y

    torch.testing.assert_close(single(2)[0], _reference(loaded[2], "qkv", 1, x[0]), rtol=1e-5, atol=1e-4)
    replacement = _weights(8, 7, ("q_proj", "k_proj"))
    table.fill(2, replacement)
    torch.testing.assert_close(single(2)[0], _reference(replacement, "qkv", 1, x[0]), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(single(1)[0], _reference(loaded[1], "qkv", 1, x[0]), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(single(2)[0], _reference(replacement, "qkv", 1, x[0]), rtol=1e-5, atol=1e-4)


@pytest.fixture
def kernel() -> LoraKernel:
    if find_compiler() is None:
        pytest.skip("no C++ compiler here: the engine uses the PyTorch paths above")
    built = load_cpu_kernels().lora
    assert built is not None, "a compiler is here, so the kernel must build and agree with PyTorch"
    return built


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("token_slots", "decode_rows"),
    [
        ([2, 2, 2], None),  # one adapter
        ([1, 2, 0, 4, 2, 1, 0], None),  # three adapters and the base
        ([1, 2, 0, 4] + [2] * 20 + [0] * 5 + [1] * 7, 4),  # and prompt chunks
        ([4] * 37 + [0, 1], None),  # more rows of one slot than a work item holds (16)
    ],
)
def test_the_kernel_gives_every_decode_row_its_own_adapters_lora(
    kernel: LoraKernel, token_slots: list[int], decode_rows: int | None, dtype: torch.dtype
) -> None:
    table = AdapterSlots(
        layers=LAYERS, shapes=SHAPES, num_slots=4, max_rank=16, dtype=dtype, device=torch.device("cpu"), kernel=kernel
    )
    everything = tuple(name for names in GROUPS.values() for name in names)
    loaded = {
        1: _weights(4, 1, ("q_proj", "v_proj", "down_proj")),
        2: _weights(8, 2, everything),
        4: _weights(2, 4, ("gate_proj", "o_proj")),
    }
    for slot, weights in loaded.items():
        table.fill(slot, weights)
    plan = table.plan(token_slots, decode_rows)
    assert plan.per_token is not None and plan.per_token.tolist() == token_slots
    assert plan.padded is None and not plan.segments
    # bf16: the factors and activations are rounded to bf16 (sums stay fp32); rank-8 random factors
    # give outputs of ~10-100, so the bound is relative.
    rtol, atol = (1e-5, 1e-4) if dtype == torch.float32 else (2e-2, 0.5)
    torch.manual_seed(0)
    for layer in range(LAYERS):
        for group, shape in SHAPES.items():
            x = torch.randn(len(token_slots), shape.in_features).to(dtype)
            base = torch.randn(len(token_slots), shape.out_features).to(dtype)
            y = base.clone()
            table.apply(plan, group, layer, x, y)
            for token, slot in enumerate(token_slots):
                weights = None if slot == BASE_SLOT else loaded[slot]
                expected = base[token].float() + _reference(weights, group, layer, x[token].float())
                torch.testing.assert_close(y[token].float(), expected, rtol=rtol, atol=atol)


def test_without_a_compiler_the_slots_keep_their_pytorch_paths(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LORALOOP_KERNEL_CACHE_DIR", str(tmp_path / "kernels"))
    assert load_cpu_kernels.__wrapped__() == CpuKernels()
    table = AdapterSlots(
        layers=LAYERS, shapes=SHAPES, num_slots=4, max_rank=16, dtype=torch.float32, device=torch.device("cpu")
    )
    table.fill(1, _weights(4, 1, ("q_proj",)))
    assert table.plan([1, 0, 1]).padded is not None
