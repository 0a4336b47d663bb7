"""The frozen linear layer gives F.linear's answer whichever CPU kernel its start-up timing picked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from serving.engine import linear
from serving.engine.linear import FrozenLinear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [True, False])
def test_either_kernel_gives_f_linear_s_answer(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, packed: bool
) -> None:
    if packed and not linear._mkldnn_packing_works(dtype):
        pytest.skip("this torch build cannot pack weights for oneDNN")
    monkeypatch.setattr(linear, "packing_pays", lambda *_: packed)
    weight, bias = torch.randn(48, 32, dtype=dtype), torch.randn(48, dtype=dtype)
    layer = FrozenLinear(weight, bias, batch_hint=8)
    assert layer.packed is packed
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for rows in (1, 8, 33):
        x = torch.randn(rows, 32, dtype=dtype)
        torch.testing.assert_close(layer(x), F.linear(x, weight, bias), atol=tolerance, rtol=tolerance)


def test_the_kernel_choice_is_timed_once_per_shape() -> None:
    linear.packing_pays.cache_clear()
    first = linear.packing_pays(64, 32, torch.float32, 8)
    assert isinstance(first, bool)
    assert linear.packing_pays(64, 32, torch.float32, 8) is first
    assert linear.packing_pays.cache_info().hits == 1
