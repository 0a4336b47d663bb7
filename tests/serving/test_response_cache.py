"""The response pre-cache: repeats of deterministic requests are answered from it, keyed by the adapter *version*
(and its load), so a hot-swap never serves the previous version's answer; a hit is still a recorded completion
that takes feedback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from litestar.testing import AsyncTestClient
from peft import PeftModel
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from transformers import AutoModelForCausalLM, AutoTokenizer

from feedback.db import make_sync_engine, session_scope
from feedback.models import Completion, Feedback
from serving.adapters.store import read_version, write_version
from serving.api.app import build_runtime, create_app
from serving.engine.batched import BatchedEngine
from serving.engine.lora import SERVABLE_MODULES
from serving.engine.types import GenerationRequest, SamplingParams
from serving.prompt import render_prompt
from serving.response_cache import CachingEngine, ResponseCache
from serving.settings import Settings
from tests.helpers import make_random_adapter
from tests.serving.test_hot_swap import _publish, _wait_for_fingerprint

GREEDY = SamplingParams(max_tokens=10, temperature=0.0)


async def _answer(engine: CachingEngine, request: GenerationRequest) -> tuple[str, list[int], str | None]:
    text, tokens, cache = "", [], None
    async for chunk in engine.generate(request):
        text += chunk.text
        tokens += chunk.token_ids
        cache = chunk.cache or cache
    return text, tokens, cache


def test_keys_cover_only_deterministic_requests() -> None:
    cache = CachingEngine(engine=None, cache=ResponseCache(4))  # type: ignore[arg-type]
    prompt = [1, 2, 3]
    greedy = cache.key(GenerationRequest("a", prompt, GREEDY))
    assert greedy is not None
    assert cache.key(GenerationRequest("b", prompt, SamplingParams(10, 0.0, top_p=0.5, seed=3))) == greedy
    assert cache.key(GenerationRequest("c", prompt, SamplingParams(10, 0.7))) is None  # unseeded sampling
    seeded = cache.key(GenerationRequest("d", prompt, SamplingParams(10, 0.7, seed=1)))
    assert seeded is not None and seeded != cache.key(GenerationRequest("e", prompt, SamplingParams(10, 0.7, seed=2)))
    assert cache.key(GenerationRequest("f", prompt, SamplingParams(11, 0.0))) != greedy
    assert cache.key(GenerationRequest("g", prompt, SamplingParams(10, 0.0, stop=("x",)))) != greedy
    assert cache.key(GenerationRequest("h", prompt, GREEDY, adapter_key="default@1")) is None  # not loaded


def test_the_lru_keeps_its_bound() -> None:
    from serving.response_cache import CachedAnswer

    lru = ResponseCache(2)
    for i in range(3):
        lru.put(i, CachedAnswer(str(i), "stop", 1, 1, (i,)))
    assert len(lru) == 2 and lru.get(0) is None and lru.get(2) is not None


async def test_versions_never_share_answers_even_reloaded_under_the_same_key(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    weights = []
    for number in (1, 2):
        source = make_random_adapter(tiny_model_dir, tmp_path / f"src{number}", rank=4, seed=number)
        stored = write_version(tmp_path / "store", "default", number, source)
        weights.append(
            read_version(
                tmp_path / "store", stored.relative_path, stored.sha256, max_rank=32, allowed_modules=SERVABLE_MODULES
            )
        )
    batched = BatchedEngine(model, tokenizer, max_loaded_adapters=2)
    batched.eos_ids = frozenset()
    engine = CachingEngine(batched, ResponseCache(16))
    prompt = render_prompt(tokenizer, [{"role": "user", "content": "Say something."}])

    def request(key: str | None) -> GenerationRequest:
        return GenerationRequest("r", prompt, GREEDY, adapter_key=key)

    await engine.start()
    try:
        base_miss = await _answer(engine, request(None))
        base_hit = await _answer(engine, request(None))
        await engine.load_adapter("default@1", weights[0])
        await engine.load_adapter("default@2", weights[1])
        v1 = await _answer(engine, request("default@1"))
        v2 = await _answer(engine, request("default@2"))
        v1_again = await _answer(engine, request("default@1"))
        # The same key unloaded and loaded with other weights (never done by the registry, which keeps versions
        # immutable) still gets a fresh answer: each load has its own generation in the key.
        await engine.unload_adapter("default@1")
        await engine.load_adapter("default@1", weights[1])
        reloaded = await _answer(engine, request("default@1"))
    finally:
        await engine.stop()
    assert base_miss[2] == "miss" and base_hit[2] == "hit" and base_hit[:2] == base_miss[:2]
    assert len({tuple(base_miss[1]), tuple(v1[1]), tuple(v2[1])}) == 3  # three versions, three answers
    assert v1[2] == v2[2] == "miss" and v1_again[2] == "hit" and v1_again[:2] == v1[:2]
    assert reloaded[2] == "miss" and reloaded[:2] == v2[:2]


def _metric(text: str, name: str, **labels: str) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and set(labels.items()) <= set(s.labels.items())
    )


@pytest.fixture
async def cached_client(settings: Settings):
    settings = settings.model_copy(update={"response_cache_entries": 64})
    app = create_app(settings, runtime=build_runtime(settings))
    async with AsyncTestClient(app, timeout=60) as client:
        yield client, settings


def _reference_text(tiny_model_dir: Path, adapter_dir: Path, messages: list[dict[str, str]], n: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    prompt = render_prompt(tokenizer, messages)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)


async def test_a_swap_never_serves_the_old_versions_cached_answer_and_hits_are_recorded(
    cached_client: tuple[AsyncTestClient, Settings], tiny_model_dir: Path, tmp_path: Path
) -> None:
    client, settings = cached_client
    messages = [{"role": "user", "content": "Say something."}]
    chat = {"model": "default", "messages": messages, "temperature": 0, "max_tokens": 12}
    first = (await client.post("/v1/chat/completions", json=chat)).json()
    second = (await client.post("/v1/chat/completions", json=chat)).json()
    assert first["id"] != second["id"]
    assert second["choices"][0]["message"] == first["choices"][0]["message"]
    metrics = (await client.get("/metrics")).text
    assert _metric(metrics, "loraloop_response_cache_lookups_total", result="hit") == 1
    assert _metric(metrics, "loraloop_response_cache_lookups_total", result="miss") == 1

    # The cache hit is a completion like any other: recorded, and feedback on it is accepted and stored.
    rated = await client.post("/v1/feedback", json={"completion_id": second["id"], "rating": 1})
    assert rated.status_code == 200, rated.text
    db = make_sync_engine(settings.database_url)
    with session_scope(db) as session:
        hit = session.get(Completion, second["id"])
        assert hit is not None and hit.answer == second["choices"][0]["message"]["content"]
        assert hit.served_by == second["system_fingerprint"]
        assert [f.completion_id for f in session.scalars(select(Feedback))] == [second["id"]]

    # Promote a new version of the alias. The same request must now be generated by default@1, not replayed.
    _publish(settings, tiny_model_dir, tmp_path, 1)
    await _wait_for_fingerprint(client, "default@1")  # (its own repeated probes may hit the cache)
    hits_before = _metric((await client.get("/metrics")).text, "loraloop_response_cache_lookups_total", result="hit")
    swapped = (await client.post("/v1/chat/completions", json=chat)).json()
    assert swapped["system_fingerprint"] == "default@1"
    expected = _reference_text(tiny_model_dir, tmp_path / "src1", messages, 12)
    assert swapped["choices"][0]["message"]["content"] == expected
    assert expected != first["choices"][0]["message"]["content"]  # the adapter really answers differently
    metrics = (await client.get("/metrics")).text
    assert _metric(metrics, "loraloop_response_cache_lookups_total", result="hit") == hits_before
    with session_scope(db) as session:
        assert session.get(Completion, swapped["id"]).served_by == "default@1"
    db.dispose()
