"""From a chat request to an answer: render the prompt, pick the adapter, generate, record.

Every completion is committed to the database before its response completes (for a stream,
before the final chunk), because its id is what feedback refers to.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from transformers import GenerationConfig, PreTrainedTokenizerBase

from feedback.callers import Caller
from feedback.completions import CompletionRecord, record_completion
from serving.adapters.manager import AdapterManager, ServingTarget
from serving.api.errors import APIError
from serving.api.schemas import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    PromptTokensDetails,
    Usage,
    sampling_dict,
)
from serving.engine.types import Engine, GenerationChunk, GenerationRequest, SamplingParams, close_stream
from serving.metrics import Metrics, version_labels
from serving.prompt import render_prompt

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class PreparedChat:
    completion_id: str
    messages: list[dict[str, str]]
    prompt_token_ids: list[int]
    sampling: SamplingParams
    recorded_sampling: dict[str, Any]


@dataclass
class _Outcome:
    text: str = ""
    finish_reason: str = "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float = 0.0

    def usage(self) -> Usage:
        total = self.prompt_tokens + self.completion_tokens
        return Usage(self.prompt_tokens, self.completion_tokens, total, PromptTokensDetails(self.cached_tokens))


class ChatService:
    def __init__(
        self,
        engine: Engine,
        adapters: AdapterManager,
        tokenizer: PreTrainedTokenizerBase,
        generation_config: GenerationConfig,
        sessions: async_sessionmaker[AsyncSession],
        *,
        default_max_tokens: int,
        max_context_tokens: int,
        metrics: Metrics | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.adapters = adapters
        self.tokenizer = tokenizer
        self.sessions = sessions
        self.default_max_tokens = default_max_tokens
        self.max_context_tokens = max_context_tokens
        # Like vLLM, unspecified sampling follows the model's own generation config (greedy for SmolLM2).
        self.default_temperature = float(generation_config.temperature or 1.0) if generation_config.do_sample else 0.0
        self.default_top_p = float(generation_config.top_p or 1.0) if generation_config.do_sample else 1.0

    def prepare(self, request: ChatCompletionRequest) -> PreparedChat:
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in request.messages
        ]
        prompt = render_prompt(self.tokenizer, messages)
        budget = self.max_context_tokens - len(prompt)
        if budget < 1:
            raise APIError(
                400,
                f"the prompt has {len(prompt)} tokens; this server's context is {self.max_context_tokens}",
                code="context_length_exceeded",
                param="messages",
            )
        requested = request.max_completion_tokens or request.max_tokens
        param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        if requested is not None and requested > budget:
            raise APIError(
                400,
                f"{param}={requested} plus the {len(prompt)}-token prompt exceeds the "
                f"{self.max_context_tokens}-token context",
                code="context_length_exceeded",
                param=param,
            )
        max_tokens = requested or min(self.default_max_tokens, budget)
        temperature = self.default_temperature if request.temperature is None else request.temperature
        top_p = self.default_top_p if request.top_p is None else request.top_p
        sampling = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=request.seed,
            stop=request.stop_sequences(),
        )
        return PreparedChat(
            completion_id=f"chatcmpl-{uuid.uuid4().hex}",
            messages=messages,
            prompt_token_ids=prompt,
            sampling=sampling,
            recorded_sampling=sampling_dict(request, max_tokens) | {"temperature": temperature, "top_p": top_p},
        )

    def _start(self, prepared: PreparedChat, target: ServingTarget) -> AsyncIterator[GenerationChunk]:
        """Hand the request to the engine now, so a full queue is refused (429) before any response starts."""
        engine_request = GenerationRequest(
            request_id=prepared.completion_id,
            prompt_token_ids=prepared.prompt_token_ids,
            sampling=prepared.sampling,
            adapter_key=target.key,
        )
        return self.engine.generate(engine_request)

    async def _generate(
        self,
        prepared: PreparedChat,
        target: ServingTarget,
        outcome: _Outcome,
        chunks: AsyncIterator[GenerationChunk],
    ) -> AsyncIterator[GenerationChunk]:
        labels = version_labels(target.label, target.alias)
        async for chunk in chunks:
            if chunk.text:
                now = time.perf_counter()
                if outcome.first_token_at is None:
                    outcome.first_token_at = now
                elif self.metrics is not None:
                    self.metrics.itl.labels(*labels).observe(now - outcome.last_token_at)
                outcome.last_token_at = now
            outcome.text += chunk.text
            if chunk.finish_reason is not None:
                outcome.finish_reason = chunk.finish_reason
                outcome.prompt_tokens = chunk.prompt_tokens
                outcome.completion_tokens = chunk.completion_tokens
                outcome.cached_tokens = chunk.cached_tokens
                if chunk.cache is not None and self.metrics is not None:  # the response pre-cache answered or missed
                    self.metrics.response_cache.labels(chunk.cache).inc()
            yield chunk

    async def _record(
        self,
        prepared: PreparedChat,
        request: ChatCompletionRequest,
        caller: Caller,
        target: ServingTarget,
        outcome: _Outcome,
        started: float,
    ) -> None:
        now = time.perf_counter()
        record = CompletionRecord(
            id=prepared.completion_id,
            caller=caller.id,
            tenant=caller.tenant,
            end_user=request.user,
            model_requested=request.model,
            adapter_alias=target.alias,
            adapter_version_id=target.version_id,
            served_by=target.label,
            prompt_messages=prepared.messages,
            answer=outcome.text,
            finish_reason=outcome.finish_reason,
            prompt_tokens=outcome.prompt_tokens or len(prepared.prompt_token_ids),
            completion_tokens=outcome.completion_tokens,
            sampling=prepared.recorded_sampling,
            latency_ms=(now - started) * 1000,
            time_to_first_token_ms=(outcome.first_token_at - started) * 1000 if outcome.first_token_at else None,
        )
        async with self.sessions() as session, session.begin():
            await session.run_sync(record_completion, record)
        if self.metrics is not None:
            labels = version_labels(target.label, target.alias)
            self.metrics.requests.labels(*labels, outcome.finish_reason).inc()
            self.metrics.latency.labels(*labels).observe(now - started)
            if outcome.first_token_at is not None:
                self.metrics.ttft.labels(*labels).observe(outcome.first_token_at - started)
            self.metrics.prompt_tokens.labels(*labels).inc(record.prompt_tokens)
            self.metrics.completion_tokens.labels(*labels).inc(record.completion_tokens)
            self.metrics.cached_prompt_tokens.labels(*labels).inc(outcome.cached_tokens)

    async def complete(self, request: ChatCompletionRequest, caller: Caller) -> tuple[ChatCompletion, ServingTarget]:
        prepared = self.prepare(request)
        started = time.perf_counter()
        outcome = _Outcome()
        async with self.adapters.lease(request.model, request.user) as target:
            chunks = self._start(prepared, target)
            try:
                async for _ in self._generate(prepared, target, outcome, chunks):
                    pass
            finally:  # a cancelled handler (server shutdown) stops its sequence now
                await close_stream(chunks)
        await self._record(prepared, request, caller, target, outcome, started)
        usage = outcome.usage()
        completion = ChatCompletion(
            id=prepared.completion_id,
            created=int(time.time()),
            model=request.model,
            system_fingerprint=target.label,
            choices=[Choice(0, AssistantMessage("assistant", outcome.text), outcome.finish_reason)],
            usage=usage,
        )
        return completion, target

    async def stream(self, request: ChatCompletionRequest, caller: Caller) -> tuple[AsyncIterator[str], ServingTarget]:
        """Resolve and prepare eagerly (so errors are plain HTTP errors), then stream SSE data lines."""
        prepared = self.prepare(request)
        lease = self.adapters.lease(request.model, request.user)
        target = await lease.__aenter__()
        try:
            chunks = self._start(prepared, target)
        except BaseException:
            await lease.__aexit__(None, None, None)
            raise
        return self._stream_events(prepared, request, caller, target, lease, chunks), target

    async def _stream_events(
        self,
        prepared: PreparedChat,
        request: ChatCompletionRequest,
        caller: Caller,
        target: ServingTarget,
        lease: Any,
        chunks: AsyncIterator[GenerationChunk],
    ) -> AsyncIterator[str]:
        started = time.perf_counter()
        created = int(time.time())
        outcome = _Outcome()
        include_usage = bool(request.stream_options and request.stream_options.include_usage)

        def event(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
            chunk = ChatCompletionChunk(prepared.completion_id, created, request.model, target.label, choices, usage)
            return msgspec.json.encode(chunk).decode()

        recorded = False
        try:
            yield event([ChunkChoice(0, Delta(role="assistant", content=""))])
            async for chunk in self._generate(prepared, target, outcome, chunks):
                if chunk.text:
                    yield event([ChunkChoice(0, Delta(content=chunk.text))])
            await self._record(prepared, request, caller, target, outcome, started)
            recorded = True
            yield event([ChunkChoice(0, Delta(), outcome.finish_reason)])
            if include_usage:
                yield event([], outcome.usage())
            yield "[DONE]"
        finally:
            with anyio.CancelScope(shield=True):
                # Close the engine's stream now, not whenever it is garbage-collected: a client that hung up must
                # stop its sequence and free its slot and KV memory at once. (A cancelled task's traceback keeps
                # the stream alive until the cyclic GC runs: the sequences of 32 clients that left kept
                # generating to the end of their answers and held the slots the next requests needed.)
                await close_stream(chunks)
                await lease.__aexit__(None, None, None)
                if not recorded:  # the client left mid-stream: keep what it was shown
                    outcome.finish_reason = "cancelled"
                    try:
                        await self._record(prepared, request, caller, target, outcome, started)
                    except Exception:
                        log.exception("could not record a cancelled completion", id=prepared.completion_id)
