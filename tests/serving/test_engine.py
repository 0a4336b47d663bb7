"""The engine on a tiny random model: same tokens as transformers, per-row adapters equal PEFT, streaming rules."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from serving.adapters.store import read_version, write_version
from serving.engine.lora import SERVABLE_MODULES, LoRASlots
from serving.engine.simple import SimpleEngine
from serving.engine.types import GenerationRequest, SamplingParams
from serving.prompt import render_prompt
from tests.helpers import greedy_reference, make_random_adapter

PROMPT = [{"role": "user", "content": "Name three colours."}]


def _model(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


async def _collect(engine: SimpleEngine, request: GenerationRequest) -> tuple[list[int], str, str]:
    tokens: list[int] = []
    text = ""
    finish = ""
    async for chunk in engine.generate(request):
        tokens += chunk.token_ids
        text += chunk.text
        finish = chunk.finish_reason or finish
    return tokens, text, finish


@pytest.fixture
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def adapter_weights(tmp_path: Path, tiny_model_dir: Path):
    source = make_random_adapter(tiny_model_dir, tmp_path / "src", rank=4, targets=("q_proj", "v_proj", "down_proj"))
    stored = write_version(tmp_path / "store", "default", 1, source)
    weights = read_version(
        tmp_path / "store", stored.relative_path, stored.sha256, max_rank=8, allowed_modules=SERVABLE_MODULES
    )
    return source, weights


async def test_greedy_tokens_match_transformers_generate(tiny_model_dir: Path, tokenizer) -> None:
    prompt = render_prompt(tokenizer, PROMPT)
    expected = greedy_reference(_model(tiny_model_dir), prompt, 12)
    engine = SimpleEngine(_model(tiny_model_dir), tokenizer)
    engine.eos_ids = frozenset()  # a random model may emit EOS early; compare the full 12 tokens
    await engine.start()
    try:
        request = GenerationRequest("r1", prompt, SamplingParams(max_tokens=12, temperature=0.0))
        tokens, _, finish = await _collect(engine, request)
    finally:
        await engine.stop()
    assert finish == "length"
    assert tokens == expected[: len(tokens)] and len(tokens) >= 10  # multi-byte pieces may hold a token back


def test_per_row_adapters_equal_peft_in_one_mixed_batch(tiny_model_dir: Path, adapter_weights) -> None:
    source, weights = adapter_weights
    prompt = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
    base_logits = _model(tiny_model_dir)(prompt).logits
    peft_logits = PeftModel.from_pretrained(_model(tiny_model_dir), source).eval()(prompt).logits
    assert not torch.allclose(base_logits, peft_logits, atol=1e-4)  # the adapter really changes the output

    served = _model(tiny_model_dir)
    slots = LoRASlots(served, num_slots=2, max_rank=8)
    slots.fill(2, weights)
    with torch.no_grad():
        slots.rows.slots = torch.tensor([0, 2])  # row 0 base, row 1 adapter, one forward pass
        mixed = served(prompt).logits
    torch.testing.assert_close(mixed[0], base_logits[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mixed[1], peft_logits[1], atol=1e-5, rtol=1e-4)


async def test_each_request_answers_with_its_own_adapter(tiny_model_dir: Path, tokenizer, adapter_weights) -> None:
    source, weights = adapter_weights
    prompt = render_prompt(tokenizer, PROMPT)
    with_adapter = greedy_reference(PeftModel.from_pretrained(_model(tiny_model_dir), source).eval(), prompt, 8)
    base_only = greedy_reference(_model(tiny_model_dir), prompt, 8)
    engine = SimpleEngine(_model(tiny_model_dir), tokenizer, max_loaded_adapters=2)
    engine.eos_ids = frozenset()
    await engine.start()
    try:
        await engine.load_adapter("default@1", weights)
        params = SamplingParams(max_tokens=8, temperature=0.0)
        results = await asyncio.gather(
            _collect(engine, GenerationRequest("a", prompt, params, adapter_key="default@1")),
            _collect(engine, GenerationRequest("b", prompt, params, adapter_key=None)),
        )
        await engine.unload_adapter("default@1")
        assert engine.loaded_adapters == frozenset()
    finally:
        await engine.stop()
    assert results[0][0] == with_adapter[: len(results[0][0])]
    assert results[1][0] == base_only[: len(results[1][0])]
    assert with_adapter != base_only


async def test_seed_reproduces_and_cancel_frees_the_engine(tiny_model_dir: Path, tokenizer) -> None:
    prompt = render_prompt(tokenizer, PROMPT)
    engine = SimpleEngine(_model(tiny_model_dir), tokenizer)
    engine.eos_ids = frozenset()
    await engine.start()
    try:
        sampled = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=42)
        first = await _collect(engine, GenerationRequest("s1", prompt, sampled))
        second = await _collect(engine, GenerationRequest("s2", prompt, sampled))
        assert first[0] == second[0]

        stream = engine.generate(GenerationRequest("c", prompt, SamplingParams(max_tokens=500, temperature=0.0)))
        await anext(stream)
        await stream.aclose()  # the client went away
        after = await asyncio.wait_for(_collect(engine, GenerationRequest("n", prompt, sampled)), timeout=30)
        assert after[2] == "length"
    finally:
        await engine.stop()


async def test_stop_sequence_ends_the_answer_without_it(tiny_model_dir: Path, tokenizer) -> None:
    prompt = render_prompt(tokenizer, PROMPT)
    engine = SimpleEngine(_model(tiny_model_dir), tokenizer)
    engine.eos_ids = frozenset()
    await engine.start()
    try:
        _, text, _ = await _collect(
            engine, GenerationRequest("x", prompt, SamplingParams(max_tokens=20, temperature=0.0))
        )
        stop = text[5:8]
        assert len(stop) == 3
        _, stopped, finish = await _collect(
            engine, GenerationRequest("y", prompt, SamplingParams(max_tokens=20, temperature=0.0, stop=(stop,)))
        )
    finally:
        await engine.stop()
    assert finish == "stop"
    assert stopped == text[: text.index(stop)]
