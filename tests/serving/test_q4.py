"""4-bit projections (`serving/engine/q4.py`): only weights that are 4-bit grids get the 4-bit form, it gives the
bf16 weights' products, and a lean model's small steps run on it (adapters too) with bf16-sized differences."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from serving.engine import q4
from serving.engine.lora import SERVABLE_MODULES
from serving.engine.model import LeanLlama
from serving.engine.q4 import GROUP_SIZE, Q4Weight
from tests.helpers import step_logits, stored_random_adapter

pytestmark = pytest.mark.skipif(
    not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"), reason="this torch build has no CPU int4 kernel"
)


def test_the_start_up_probe_trusts_the_kernel() -> None:
    assert q4.q4_kernel_works()  # else no model would get 4-bit layers


# Logits of order 1 (the tiny model's) through the 4-bit and the bf16 weights: both round in bf16, so they
# agree to about what bf16 batched and alone agree to (BF16_LOGIT_TOLERANCE in test_batched_engine).
Q4_LOGIT_TOLERANCE = 0.03  # observed: 0.004 on the base model, 0.010 with a rank-8 adapter on all projections


def snap_to_q4_1(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [out, in] as a Q4_1 GGUF stores it: per block of 32 inputs, 16 levels from the block's minimum."""
    blocks = weight.float().view(weight.shape[0], -1, GROUP_SIZE)
    low = blocks.amin(-1, keepdim=True)
    step = (blocks.amax(-1, keepdim=True) - low) / 15
    return (low + step * ((blocks - low) / step).round()).view_as(weight).to(torch.bfloat16)


def test_a_q4_1_grid_gets_a_4_bit_form_with_the_weights_products() -> None:
    torch.manual_seed(0)
    weight = snap_to_q4_1(torch.randn(96, 4 * GROUP_SIZE))
    bias = torch.randn(96, dtype=torch.bfloat16)
    four_bit = Q4Weight.from_grid(weight, bias)
    assert four_bit is not None
    x = torch.randn(5, 4 * GROUP_SIZE, dtype=torch.bfloat16)
    exact = x.float() @ weight.float().T + bias.float()
    bf16_error = (F.linear(x, weight, bias).float() - exact).abs().max()
    q4_error = (four_bit(x).float() - exact).abs().max()
    assert 0 < bf16_error < 0.01 * exact.abs().max()
    assert q4_error <= 2 * bf16_error  # observed: 0.15 against bf16's 0.12 on outputs up to 38


def test_weights_that_are_not_a_4_bit_grid_keep_their_own_form() -> None:
    torch.manual_seed(0)
    assert Q4Weight.from_grid(torch.randn(64, 64, dtype=torch.bfloat16)) is None  # a real bf16 weight
    assert Q4Weight.from_grid(snap_to_q4_1(torch.randn(64, 64)).float()) is None  # fp32: the model is not bf16
    assert Q4Weight.from_grid(snap_to_q4_1(torch.randn(64, 64))[:, :48].contiguous()) is None  # not whole blocks
    nearly = snap_to_q4_1(torch.randn(64, 64))
    nearly[3, 5] += (nearly[3, :32].amax() - nearly[3, :32].amin()) / 15 * 0.4  # one value between two levels
    assert Q4Weight.from_grid(nearly) is None


def _q4_1_model(tiny_model_dir: Path) -> torch.nn.Module:
    """The tiny model with every projection on a Q4_1 grid, in bf16: a miniature of the bundled model."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("_proj"):
                module.weight.copy_(snap_to_q4_1(module.weight))
    return model


def test_a_random_bf16_model_gets_no_4_bit_layers(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    lean = LeanLlama(model, max_positions=64, q4_max_rows=4)
    assert lean.q4_layers == [] and lean.q4_rows == 0


def test_small_steps_run_on_the_4_bit_form_and_agree_with_bf16(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _q4_1_model(tiny_model_dir)
    four_bit = LeanLlama(model, max_positions=64, q4_max_rows=2)
    dense = LeanLlama(model, max_positions=64, q4_small_steps=False)
    assert four_bit.q4_rows == 2 and len(four_bit.q4_layers) == model.config.num_hidden_layers
    _, weights = stored_random_adapter(tiny_model_dir, tmp_path, 2, tuple(sorted(SERVABLE_MODULES)))  # rank 8
    q4_calls: list[int] = []
    q4_forward = Q4Weight.__call__
    monkeypatch.setattr(Q4Weight, "__call__", lambda self, x: q4_calls.append(x.shape[0]) or q4_forward(self, x))

    prompt = list(range(10, 22))
    q4_by_adapter = []
    for use_adapter in (False, True):
        logits: dict[str, list[torch.Tensor]] = {}
        for name, lean in (("q4", four_bit), ("dense", dense)):
            cache, adapters = lean.new_cache(slots=2, capacity=64), lean.new_adapter_slots(num_slots=1, max_rank=8)
            if use_adapter:
                adapters.fill(1, weights)
            slot = 1 if use_adapter else 0
            rows = [(0, prompt, 0)]  # a 12-token prompt chunk: more rows than q4_rows, the bf16 weights
            logits[name] = [step_logits(lean, cache, adapters, rows, slot)]
            for i in range(4):  # one decode row a step: the 4-bit weights (four_bit only)
                logits[name].append(step_logits(lean, cache, adapters, [(0, [30 + i], len(prompt) + i)], slot))
        q4_steps, dense_steps = torch.stack(logits["q4"]), torch.stack(logits["dense"])
        assert dense_steps.abs().max() > 0.1  # real logits, not zeros
        torch.testing.assert_close(q4_steps, dense_steps, atol=Q4_LOGIT_TOLERANCE, rtol=0)
        assert not torch.equal(q4_steps[1:], dense_steps[1:])  # the decode steps did take another kernel
        torch.testing.assert_close(q4_steps[0], dense_steps[0], atol=0, rtol=0)  # the chunk did not
        q4_by_adapter.append(q4_steps)
    assert (q4_by_adapter[1] - q4_by_adapter[0]).abs().max() > 10 * Q4_LOGIT_TOLERANCE  # the LoRA was applied
    assert set(q4_calls) == {1}  # only the one-row steps, 4 groups x 2 layers x 4 steps x 2 passes
    assert len(q4_calls) == 4 * 2 * 4 * 2
