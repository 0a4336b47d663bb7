"""The batched engine on a tiny random model: continuous batching gives exactly the tokens of one request at a
time (fp32, greedy), adapters mix in one forward pass, and the streaming, seed, stop, cancel and overload rules."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from peft import PeftModel
from sqlalchemy import select
from transformers import AutoModelForCausalLM, AutoTokenizer

from feedback.db import make_sync_engine, session_scope
from feedback.models import Completion
from serving.api.app import build_runtime, create_app
from serving.engine.adapter_slots import AdapterPlan
from serving.engine.batched import BatchedEngine
from serving.engine.cpu_kernels import find_compiler
from serving.engine.lora import SERVABLE_MODULES
from serving.engine.model import LeanLlama
from serving.engine.types import EngineOverloaded, GenerationChunk, GenerationRequest, SamplingParams
from serving.prompt import render_prompt
from serving.settings import Settings
from tests.helpers import greedy_reference, step_logits, stored_random_adapter

QUESTIONS = ["Name three colours.", "What is the capital of France? Answer in one long sentence, please.", "Hi"]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
BF16_LOGIT_TOLERANCE = 0.02  # observed: at most 0.004 (one bf16 step at 1.0) on an AMX CPU


def _model(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@pytest.fixture
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def prompts(tokenizer) -> list[list[int]]:
    return [render_prompt(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]


async def _collect(engine: BatchedEngine, request: GenerationRequest) -> tuple[list[int], str, str]:
    tokens: list[int] = []
    text = ""
    finish = ""
    async for chunk in engine.generate(request):
        tokens += chunk.token_ids
        text += chunk.text
        finish = chunk.finish_reason or finish
    return tokens, text, finish


async def _started(engine: BatchedEngine) -> BatchedEngine:
    engine.eos_ids = frozenset()  # a random model may emit EOS early; compare full lengths
    await engine.start()
    return engine


def _uses_cpu_kernels(engine: BatchedEngine, wanted: bool) -> bool:
    """Whether the engine runs the C++ kernels as asked (with no compiler here, it never can)."""
    kernels = (engine.lean.attention_kernel, engine.lean.kernels.norm, engine.adapter_slots.kernel)
    return all(k is not None for k in kernels) == (wanted and find_compiler() is not None)


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["cpu-kernels", "pytorch-ops"])
async def test_batched_greedy_equals_transformers_one_at_a_time(
    tiny_model_dir: Path, tokenizer, prompts, cpu_kernels: bool
) -> None:
    expected = [greedy_reference(_model(tiny_model_dir), p, 12) for p in prompts]
    engine = await _started(BatchedEngine(_model(tiny_model_dir), tokenizer, cpu_kernels=cpu_kernels))
    assert _uses_cpu_kernels(engine, cpu_kernels)
    try:
        alone = [await _collect(engine, GenerationRequest(f"a{i}", p, GREEDY)) for i, p in enumerate(prompts)]
        together = await asyncio.gather(
            *(_collect(engine, GenerationRequest(f"b{i}", p, GREEDY)) for i, p in enumerate(prompts))
        )
    finally:
        await engine.stop()
    assert [tokens for tokens, _, _ in alone] == expected
    assert [tokens for tokens, _, _ in together] == expected
    assert all(finish == "length" for _, _, finish in together)


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["cpu-kernels", "pytorch-ops"])
async def test_mixed_adapters_in_one_batch_equal_each_alone(
    tiny_model_dir: Path, tmp_path: Path, tokenizer, prompts, cpu_kernels: bool
) -> None:
    source1, weights1 = stored_random_adapter(tiny_model_dir, tmp_path, 1, ("q_proj", "v_proj", "down_proj"))
    source2, weights2 = stored_random_adapter(tiny_model_dir, tmp_path, 2, tuple(sorted(SERVABLE_MODULES)))
    prompt = prompts[0]
    expected = {
        None: greedy_reference(_model(tiny_model_dir), prompt, 12),
        "default@1": greedy_reference(PeftModel.from_pretrained(_model(tiny_model_dir), source1).eval(), prompt, 12),
        "default@2": greedy_reference(PeftModel.from_pretrained(_model(tiny_model_dir), source2).eval(), prompt, 12),
    }
    assert len({tuple(v) for v in expected.values()}) == 3  # the adapters really change the answer

    engine = BatchedEngine(_model(tiny_model_dir), tokenizer, max_loaded_adapters=2, cpu_kernels=cpu_kernels)
    assert _uses_cpu_kernels(engine, cpu_kernels)
    plans: list[AdapterPlan] = []
    planner = engine.adapter_slots.plan
    engine.adapter_slots.plan = lambda *a, **k: plans.append(planner(*a, **k)) or plans[-1]  # type: ignore[method-assign]
    await _started(engine)
    try:
        await engine.load_adapter("default@1", weights1)
        await engine.load_adapter("default@2", weights2)
        keys = [None, "default@1", "default@2", "default@1", None]
        results = await asyncio.gather(
            *(_collect(engine, GenerationRequest(f"r{i}", prompt, GREEDY, adapter_key=k)) for i, k in enumerate(keys))
        )
    finally:
        await engine.stop()
    for key, (tokens, _, _) in zip(keys, results, strict=True):
        assert tokens == expected[key], key
    assert any(plan.mixed for plan in plans)  # rows of different adapters shared a forward pass


def test_bf16_batched_logits_agree_with_one_at_a_time_within_tolerance(tiny_model_dir: Path, prompts) -> None:
    """bf16 sums depend on the batch's shape, so batched and alone are not identical; they agree to within
    BF16_LOGIT_TOLERANCE (absolute, on logits of order 1), prefill and decode alike."""
    lean = LeanLlama(_model(tiny_model_dir, torch.bfloat16), max_positions=256, batch_hint=4)
    adapters = lean.new_adapter_slots(num_slots=1, max_rank=8)

    def run(groups: list[list[int]]) -> dict[int, list[torch.Tensor]]:
        """Prefill, then 6 decode steps with fixed tokens; the prompts in `groups` share their steps."""
        cache = lean.new_cache(slots=len(prompts), capacity=256)
        out: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(prompts))}
        for group in groups:
            logits = step_logits(lean, cache, adapters, [(i, prompts[i], 0) for i in group])
            for i, row in zip(group, logits, strict=True):
                out[i].append(row)
            for step in range(6):
                rows = [(i, [100 + step], len(prompts[i]) + step) for i in group]
                for i, row in zip(group, step_logits(lean, cache, adapters, rows), strict=True):
                    out[i].append(row)
        return out

    alone = run([[i] for i in range(len(prompts))])
    together = run([list(range(len(prompts)))])
    for i in range(len(prompts)):
        a, b = torch.stack(alone[i]), torch.stack(together[i])
        assert a.abs().max() > 0.1  # real logits, not zeros
        torch.testing.assert_close(b, a, atol=BF16_LOGIT_TOLERANCE, rtol=0)


async def test_a_sequence_joining_mid_batch_gets_the_same_tokens(tiny_model_dir: Path, tokenizer, prompts) -> None:
    long = SamplingParams(max_tokens=30, temperature=0.0)
    expected_long = greedy_reference(_model(tiny_model_dir), prompts[1], 30)
    expected_late = greedy_reference(_model(tiny_model_dir), prompts[0], 12)
    engine = await _started(BatchedEngine(_model(tiny_model_dir), tokenizer))
    try:
        stream = engine.generate(GenerationRequest("long", prompts[1], long))
        first: list[int] = []
        while len(first) < 5:
            first += (await anext(stream)).token_ids

        async def rest() -> list[int]:
            return first + [t async for chunk in stream for t in chunk.token_ids]

        late, long_tokens = await asyncio.gather(
            _collect(engine, GenerationRequest("late", prompts[0], GREEDY)), rest()
        )
    finally:
        await engine.stop()
    assert long_tokens == expected_long
    assert late[0] == expected_late


async def test_long_prompts_are_prefilled_in_chunks_with_the_same_result(
    tiny_model_dir: Path, tokenizer, prompts
) -> None:
    expected = [greedy_reference(_model(tiny_model_dir), p, 12) for p in prompts]
    engine = await _started(BatchedEngine(_model(tiny_model_dir), tokenizer, max_batched_tokens=16))
    chunk_sizes: list[int] = []
    step = engine._step
    engine._step = lambda plan: chunk_sizes.extend(n for _, _, n in plan.prefill) or step(plan)  # type: ignore[method-assign]
    try:
        together = await asyncio.gather(
            *(_collect(engine, GenerationRequest(f"c{i}", p, GREEDY)) for i, p in enumerate(prompts))
        )
    finally:
        await engine.stop()
    assert [tokens for tokens, _, _ in together] == expected
    assert len(chunk_sizes) > len(prompts) and max(chunk_sizes) <= 16


async def test_same_seed_same_output_alone_and_in_a_busy_batch(tiny_model_dir: Path, tokenizer, prompts) -> None:
    sampled = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=42)
    engine = await _started(BatchedEngine(_model(tiny_model_dir), tokenizer))
    try:
        first = await _collect(engine, GenerationRequest("s1", prompts[0], sampled))
        second = await _collect(engine, GenerationRequest("s2", prompts[0], sampled))
        busy = await asyncio.gather(
            _collect(engine, GenerationRequest("s3", prompts[0], sampled)),
            _collect(engine, GenerationRequest("n1", prompts[1], SamplingParams(max_tokens=10, temperature=1.0))),
            _collect(engine, GenerationRequest("n2", prompts[2], GREEDY)),
        )
        other_seed = await _collect(engine, GenerationRequest("s4", prompts[0], SamplingParams(10, 1.0, 0.9, seed=7)))
    finally:
        await engine.stop()
    assert first[0] == second[0] == busy[0][0]
    assert other_seed[0] != first[0]


async def test_stop_sequence_across_tokens_ends_the_answer_without_it(tiny_model_dir: Path, tokenizer, prompts) -> None:
    engine = await _started(BatchedEngine(_model(tiny_model_dir), tokenizer))
    try:
        _, text, _ = await _collect(engine, GenerationRequest("x", prompts[0], SamplingParams(20, 0.0)))
        stop = text[5:9]
        _, stopped, finish = await _collect(
            engine, GenerationRequest("y", prompts[0], SamplingParams(20, 0.0, stop=(stop,)))
        )
    finally:
        await engine.stop()
    assert len(stop) == 4
    assert finish == "stop"
    assert stopped == text[: text.index(stop)]


async def test_multibyte_text_streams_exactly(tiny_model_dir: Path, tokenizer, prompts) -> None:
    """The engine samples a scripted answer whose characters span several tokens: every chunk is whole text."""
    answer = "Grüße 日本語 🎉 café"
    script = tokenizer.encode(answer, add_special_tokens=False)
    engine = BatchedEngine(_model(tiny_model_dir), tokenizer)
    engine._sample = lambda logits, rows: [script[row.generated] for row in rows]  # type: ignore[method-assign]
    await _started(engine)
    try:
        chunks: list[GenerationChunk] = [
            c async for c in engine.generate(GenerationRequest("m", prompts[0], SamplingParams(len(script), 0.0)))
        ]
    finally:
        await engine.stop()
    assert "".join(c.text for c in chunks) == answer
    assert all("\ufffd" not in c.text for c in chunks)
    assert [t for c in chunks for t in c.token_ids] == script


async def _wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def test_cancel_frees_the_slot_and_its_kv_memory(tiny_model_dir: Path, tokenizer, prompts) -> None:
    engine = await _started(BatchedEngine(_model(tiny_model_dir), tokenizer, max_running=1, max_context=512))
    try:
        stream = engine.generate(GenerationRequest("c", prompts[0], SamplingParams(max_tokens=400, temperature=0.0)))
        await anext(stream)
        assert engine.running == 1 and engine.cache.free_slots == 0 and engine.cache.tokens_in_use > 0
        await stream.aclose()  # the client went away
        await _wait_until(lambda: engine.running == 0)
        assert engine.cache.free_slots == 1 and engine.cache.tokens_in_use == 0
        after = await asyncio.wait_for(_collect(engine, GenerationRequest("n", prompts[1], GREEDY)), timeout=30)
        assert after[2] == "length"

        dropped = engine.generate(GenerationRequest("d", prompts[0], SamplingParams(max_tokens=400, temperature=0.0)))
        await anext(dropped)
        del dropped  # garbage-collected without aclose (a handler that forgot it): cancelled all the same
        await _wait_until(lambda: engine.running == 0)
        assert engine.cache.free_slots == 1
    finally:
        await engine.stop()


async def test_a_full_queue_refuses_at_once(tiny_model_dir: Path, tokenizer, prompts) -> None:
    # Not started: nothing leaves the queue. One request may take the free slot, one more may wait.
    engine = BatchedEngine(_model(tiny_model_dir), tokenizer, max_running=1, max_waiting=1)
    first = engine.generate(GenerationRequest("1", prompts[0], GREEDY))
    second = engine.generate(GenerationRequest("2", prompts[0], GREEDY))
    with pytest.raises(EngineOverloaded):
        engine.generate(GenerationRequest("3", prompts[0], GREEDY))
    assert engine.waiting == 2
    await _started(engine)
    try:
        results = await asyncio.gather(*(_collect_stream(s) for s in (first, second)))
        assert engine.waiting == 0
        assert all(tokens for tokens in results)
    finally:
        await engine.stop()


async def _collect_stream(stream) -> list[int]:
    return [t async for chunk in stream for t in chunk.token_ids]


async def test_unloading_an_adapter_in_use_waits_for_its_sequences(
    tiny_model_dir: Path, tmp_path: Path, tokenizer, prompts
) -> None:
    source, weights = stored_random_adapter(tiny_model_dir, tmp_path, 1, ("q_proj", "v_proj"))
    expected = greedy_reference(PeftModel.from_pretrained(_model(tiny_model_dir), source).eval(), prompts[0], 20)
    engine = await _started(BatchedEngine(_model(tiny_model_dir), tokenizer, max_loaded_adapters=1))
    try:
        await engine.load_adapter("default@1", weights)
        request = GenerationRequest("u", prompts[0], SamplingParams(20, 0.0), adapter_key="default@1")
        stream = engine.generate(request)
        first = (await anext(stream)).token_ids
        unload = asyncio.ensure_future(engine.unload_adapter("default@1"))
        tokens = first + await _collect_stream(stream)
        await unload
        assert engine.loaded_adapters == frozenset()
        with pytest.raises(KeyError):
            await _collect(engine, request)
    finally:
        await engine.stop()
    assert tokens == expected


async def test_an_adapter_every_row_uses_is_merged_into_the_weights_with_the_same_tokens(
    tiny_model_dir: Path, tmp_path: Path, tokenizer, prompts
) -> None:
    source, weights = stored_random_adapter(tiny_model_dir, tmp_path, 2, tuple(sorted(SERVABLE_MODULES)))
    peft = PeftModel.from_pretrained(_model(tiny_model_dir), source).eval()
    expected = [greedy_reference(peft, prompt, 20) for prompt in prompts[:2]]
    engine = await _started(
        BatchedEngine(_model(tiny_model_dir), tokenizer, max_loaded_adapters=1, merge_after_steps=4)
    )
    try:
        await engine.load_adapter("default@2", weights)
        requests = [
            GenerationRequest(f"m{i}", prompt, SamplingParams(20, 0.0), adapter_key="default@2")
            for i, prompt in enumerate(prompts[:2])
        ]
        first = await asyncio.gather(*(_collect(engine, r) for r in requests))  # the merge starts on the way
        for _ in range(600):
            if not engine.merging:
                break
            await asyncio.sleep(0.05)
        again = await asyncio.gather(*(_collect(engine, r) for r in requests))  # on the merged weights
        merged_slot = engine.lean.merged_slot
        await engine.unload_adapter("default@2")
        assert engine.lean.merged_slot is None  # an unloaded adapter's merged weights go with it
    finally:
        await engine.stop()
    assert merged_slot is not None  # the later steps really ran on the merged weights
    assert [tokens for tokens, _, _ in first] == expected
    assert [tokens for tokens, _, _ in again] == expected


@contextlib.contextmanager
def _live_server(settings: Settings, engine_setup: Callable[[BatchedEngine], None]) -> Iterator[str]:
    """The real app behind a real uvicorn socket (the test client buffers whole responses, so it never disconnects)."""
    runtime = build_runtime(settings)
    assert isinstance(runtime.engine, BatchedEngine)
    engine_setup(runtime.engine)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings, runtime=runtime), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = 60.0
        while not server.started and deadline > 0 and thread.is_alive():
            threading.Event().wait(0.05)
            deadline -= 0.05
        assert server.started, "the server did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


async def test_full_queue_answers_429_and_a_client_that_leaves_frees_its_slot_and_kv(settings: Settings) -> None:
    """Over HTTP: one sequence slot, no waiting room. A second request is refused at once in OpenAI's error shape;
    when the streaming client hangs up, its sequence is cancelled and its KV slot is free for the next one."""
    settings = settings.model_copy(update={"max_running_sequences": 1, "max_waiting_requests": 0})
    engines: list[BatchedEngine] = []

    def setup(engine: BatchedEngine) -> None:
        engine.eos_ids = frozenset()  # the random model must not end the long answer by itself
        forward = engine.lean.forward

        def slow_forward(*args: object) -> torch.Tensor:
            time.sleep(0.005)  # >= 7.5 s for 1500 tokens: the hang-up is always seen before the answer ends
            return forward(*args)  # type: ignore[arg-type]

        engine.lean.forward = slow_forward  # type: ignore[method-assign]
        engines.append(engine)

    chat = {"model": "default", "messages": [{"role": "user", "content": "Talk for a long time."}], "temperature": 0}
    with _live_server(settings, setup) as url:
        [engine] = engines
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            async with http.stream(
                "POST", "/v1/chat/completions", json=chat | {"stream": True, "max_tokens": 1500}
            ) as r:
                assert r.status_code == 200
                lines = r.aiter_lines()
                first = json.loads((await anext(lines))[6:])
                while '"content":""' in (line := await anext(lines)) or not line.startswith("data: {"):
                    pass  # until real text arrives: the sequence holds the only slot now
                assert engine.running == 1 and engine.cache.free_slots == 0
                [sequence] = engine.scheduler.running

                refused = await http.post("/v1/chat/completions", json=chat | {"max_tokens": 4})
                assert refused.status_code == 429
                error = refused.json()["error"]
                assert error["type"] == "rate_limit_error" and error["code"] == "overloaded"
                assert set(error) == {"message", "type", "param", "code"} and error["message"]
            # The stream's connection is closed here, long before 1500 tokens. The chat handler does not close
            # the engine stream itself: it is cancelled when the handler's generator is collected, which a
            # reference cycle can delay until the cyclic GC runs (so collect while waiting).
            await _wait_until(
                lambda: gc.collect() >= 0 and engine.running == 0 and engine.cache.free_slots == 1, timeout=30
            )
            assert engine.cache.tokens_in_use == 0
            assert sequence.cancelled and sequence.generated < 1500

            after = await http.post("/v1/chat/completions", json=chat | {"max_tokens": 4})
            assert after.status_code == 200, after.text

    db = make_sync_engine(settings.database_url)
    with session_scope(db) as session:
        left = session.scalars(select(Completion).where(Completion.id == first["id"])).one()
        assert left.finish_reason == "cancelled"
    db.dispose()
