"""The prefix cache: a prompt that begins like an earlier one under the same adapter copies those positions'
keys and values instead of computing them, with exactly the tokens it would have had (fp32, greedy), and never
takes them from another adapter, nor from an adapter that an unload and a load replaced in the same slot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from serving.engine import prefix_cache
from serving.engine.batched import BatchedEngine
from serving.engine.kv_cache import KVCache
from serving.engine.lora import SERVABLE_MODULES
from serving.engine.prefix_cache import BLOCK, PrefixCache
from serving.engine.types import GenerationRequest, SamplingParams
from serving.prompt import render_prompt
from tests.helpers import greedy_reference, stored_random_adapter

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


# -- the cache on its own -----------------------------------------------------------------------
def _kv(slots: int = 3) -> KVCache:
    cache = KVCache(
        layers=2, kv_heads=1, head_dim=4, slots=slots, capacity=128, dtype=torch.float32, device=torch.device("cpu")
    )
    for k, v in zip(cache.k, cache.v, strict=True):
        k.normal_()
        v.normal_()
    return cache


def test_the_longest_shared_beginning_is_found_to_the_token_and_copied() -> None:
    cache = _kv()
    prefixes = PrefixCache(budget_bytes=2**20)
    first = list(range(100, 150))  # 50 tokens: 3 whole blocks
    prefixes.store("base", first, cache, slot=0)
    prompt = [*first[:37], 7, 8, 9]  # shares 37 tokens, then differs
    entry, n = prefixes.match("base", prompt)
    assert entry is not None and n == 37
    prefixes.copy_into(entry, n, cache, slot=2)
    for k, v in zip(cache.k, cache.v, strict=True):
        assert torch.equal(k[2, :, :37], k[0, :, :37]) and torch.equal(v[2, :, :37], v[0, :, :37])
        assert not torch.equal(k[2, :, 37:40], k[0, :, 37:40])  # nothing past the shared part
    # The same prompt again: all but its last token (whose logits give the first answer token).
    assert prefixes.match("base", first)[1] == len(first) - 1
    # Shorter than a block in common, or nothing: no hit.
    assert prefixes.match("base", first[: BLOCK - 1] + [1] * 30) == (None, 0)
    assert prefixes.match("base", [5] * 40) == (None, 0)


def test_one_owners_entries_never_answer_another_and_go_when_it_is_dropped() -> None:
    cache = _kv()
    prefixes = PrefixCache(budget_bytes=2**20)
    tokens = list(range(40))
    prefixes.store(("slot 1", 1), tokens, cache, slot=0)
    assert prefixes.match(("slot 1", 2), tokens) == (None, 0)  # the same slot after another load
    assert prefixes.match("base", tokens) == (None, 0)
    assert prefixes.match(("slot 1", 1), tokens)[1] == 39
    prefixes.drop_owner(("slot 1", 1))
    assert prefixes.match(("slot 1", 1), tokens) == (None, 0)
    assert len(prefixes) == 0 and prefixes.bytes == 0


def test_a_matching_hash_is_not_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every block hashing alike (a collision everywhere) must still give no hit for different tokens."""
    monkeypatch.setattr(prefix_cache, "_block_hashes", lambda owner, tokens, blocks: [0] * blocks)
    cache = _kv()
    prefixes = PrefixCache(budget_bytes=2**20)
    prefixes.store("base", list(range(40)), cache, slot=0)
    assert prefixes.match("base", list(range(1, 41))) == (None, 0)
    assert prefixes.match("base", list(range(40)))[1] == 39


def test_least_recently_used_entries_go_first_beyond_the_budget() -> None:
    cache = _kv()
    per_entry = 32 * cache.bytes_per_token
    prefixes = PrefixCache(budget_bytes=2 * per_entry)
    a, b, c = ([n] * 32 for n in (1, 2, 3))
    prefixes.store("base", a, cache, slot=0)
    prefixes.store("base", b, cache, slot=1)
    assert prefixes.match("base", [*a, 0])[1] == 32  # a is now the most recently used
    prefixes.store("base", c, cache, slot=2)
    assert prefixes.bytes == 2 * per_entry
    assert prefixes.match("base", [*b, 0]) == (None, 0)  # b went
    assert prefixes.match("base", [*a, 0])[1] == 32 and prefixes.match("base", [*c, 0])[1] == 32
    # What an entry already covers is not stored twice; more than the budget is not stored at all.
    assert prefixes.store("base", a[:20], cache, slot=0) is None
    assert PrefixCache(budget_bytes=per_entry - 1).store("base", a, cache, slot=0) is None


# -- in the engine --------------------------------------------------------------------------------
def _model(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


async def _run(engine: BatchedEngine, prompt: list[int], key: str | None = None) -> tuple[list[int], int]:
    """(the answer's tokens, prompt tokens taken from the prefix cache), on an idle engine whose KV rows were
    overwritten first, as other sequences would have: what a hit uses must come from the prefix cache."""
    for k, v in zip(engine.cache.k, engine.cache.v, strict=True):
        k.normal_(0, 100)  # large: attending to these would change the answer
        v.normal_(0, 100)
    tokens, cached = [], -1
    async for chunk in engine.generate(GenerationRequest("p", prompt, GREEDY, adapter_key=key)):
        tokens += chunk.token_ids
        if chunk.finish_reason is not None:
            cached = chunk.cached_tokens
    return tokens, cached


@pytest.fixture
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


async def test_a_shared_beginning_is_reused_with_the_same_tokens_and_a_conversation_reuses_its_answer(
    tiny_model_dir: Path, tokenizer
) -> None:
    def chat(*turns: str) -> list[int]:
        roles = ["user", "assistant"] * len(turns)
        return render_prompt(tokenizer, [{"role": r, "content": t} for r, t in zip(roles, turns, strict=False)])

    first, second = chat("Name three colours."), chat("What is the capital of France?")
    model = _model(tiny_model_dir)
    engine = BatchedEngine(_model(tiny_model_dir), tokenizer)
    engine.eos_ids = frozenset()  # a random model may stop early; compare full lengths
    await engine.start()
    try:
        answer, cached_first = await _run(engine, first)
        again, cached_second = await _run(engine, second)  # the chat template's system prompt is shared
        follow_up = first + answer[:-1]  # the cache holds the answer but its last token, never fed back
        more = follow_up + tokenizer.encode(" And three more?")
        continued, cached_more = await _run(engine, more)
    finally:
        await engine.stop()
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    assert shared >= BLOCK
    assert (cached_first, cached_second) == (0, shared)
    assert cached_more == len(follow_up)
    assert answer == greedy_reference(model, first, 12)
    assert again == greedy_reference(model, second, 12)
    assert continued == greedy_reference(model, more, 12)


async def test_no_adapter_is_answered_from_another_adapters_keys_and_values(
    tiny_model_dir: Path, tmp_path: Path, tokenizer
) -> None:
    """The same prompt under one adapter, then another, then a third loaded into the slot the first had: each
    answer is its own adapter's (as PEFT computes it) and only a repeat under the same loaded adapter reuses
    anything (llama.cpp's server answered a prompt under one adapter from another adapter's cache)."""
    adapters = {
        n: stored_random_adapter(tiny_model_dir, tmp_path, n, tuple(sorted(SERVABLE_MODULES))) for n in (1, 2, 3)
    }
    prompt = render_prompt(tokenizer, [{"role": "user", "content": "Name three colours."}])
    expected = {
        n: greedy_reference(PeftModel.from_pretrained(_model(tiny_model_dir), source).eval(), prompt, 12)
        for n, (source, _) in adapters.items()
    }
    assert len({tuple(tokens) for tokens in expected.values()}) == 3
    engine = BatchedEngine(_model(tiny_model_dir), tokenizer, max_loaded_adapters=2)
    engine.eos_ids = frozenset()
    await engine.start()
    try:
        await engine.load_adapter("default@1", adapters[1][1])
        await engine.load_adapter("default@2", adapters[2][1])
        one = await _run(engine, prompt, "default@1")
        two = await _run(engine, prompt, "default@2")  # adapter 1's entry holds this very prompt
        two_again = await _run(engine, prompt, "default@2")
        slot_of_one = engine._slot_of["default@1"]
        await engine.unload_adapter("default@1")
        await engine.load_adapter("default@3", adapters[3][1])
        assert engine._slot_of["default@3"] == slot_of_one  # the same slot, other weights
        three = await _run(engine, prompt, "default@3")
    finally:
        await engine.stop()
    assert one == (expected[1], 0) and two == (expected[2], 0) and three == (expected[3], 0)
    assert two_again == (expected[2], len(prompt) - 1)
