"""The engine's small interface: submit a request, stream its chunks, load and unload adapters.

The API talks only to `Engine`; the implementation behind it can batch however it likes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from serving.adapters.store import LoRAWeights

FinishReason = Literal["stop", "length", "cancelled"]
CacheOutcome = Literal["hit", "miss"]


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; the API answers 429."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    adapter_key: str | None = None  # a loaded adapter's key; None = the base model


@dataclass
class GenerationChunk:
    """New text since the previous chunk; the last chunk carries finish_reason and the token counts."""

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    token_ids: list[int] = field(default_factory=list)
    cache: CacheOutcome | None = None  # on the last chunk of a cacheable request, when a response cache is on


async def close_stream(chunks: AsyncIterator[GenerationChunk]) -> None:
    """Close what `Engine.generate` returned, which cancels its sequence now rather than at garbage collection.

    Engines return async generators or their own iterators (the batched engine's `_Stream`); both have
    `aclose`, but only the first is an `AsyncGenerator`, so check for the method, not the type."""
    close = getattr(chunks, "aclose", None)
    if close is not None:
        await close()


class Engine(Protocol):
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream the answer; closing the iterator early cancels the sequence and frees its memory.

        An engine may queue the request at the call itself (and raise `EngineOverloaded` there), so
        callers should call it before they start answering.
        """
        ...

    async def load_adapter(self, key: str, weights: LoRAWeights) -> None:
        """Make an adapter available under `key` without stopping running sequences."""
        ...

    async def unload_adapter(self, key: str) -> None:
        """Free an adapter's slot; sequences still using it finish first."""
        ...

    @property
    def loaded_adapters(self) -> frozenset[str]: ...

    @property
    def max_loaded_adapters(self) -> int: ...

    @property
    def waiting(self) -> int:
        """Requests queued, not yet generating."""
        ...

    @property
    def running(self) -> int:
        """Sequences generating now."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...
