"""The response pre-cache: identical deterministic requests answered without generating again.

Off by default (`LORALOOP_RESPONSE_CACHE_ENTRIES`). It sits in front of the engine, where a request
names the exact adapter *version* it runs on (`default@3`, never the alias `default`), so after a
hot-swap the alias resolves to another version and can never be answered from the previous
version's entries. Each load of a version also gets a fresh generation number in the key, so even a
version unloaded and loaded again with other weights could not reuse old answers.

Only deterministic requests are cached: greedy (temperature 0) or sampled with a fixed seed; keys
cover the prompt tokens and every sampling parameter that changes the output. Only finished answers
("stop" or "length") are stored. A hit is streamed back like a generation, so the chat service
records it as a completion of its own (feedback works on it) and counts hits and misses.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass, replace

from serving.adapters.store import LoRAWeights
from serving.engine.types import Engine, FinishReason, GenerationChunk, GenerationRequest, close_stream


@dataclass(frozen=True)
class CachedAnswer:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    token_ids: tuple[int, ...]


class ResponseCache:
    """A bounded LRU of finished answers."""

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("a response cache needs room for at least one entry")
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, CachedAnswer] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> CachedAnswer | None:
        answer = self._entries.get(key)
        if answer is not None:
            self._entries.move_to_end(key)
        return answer

    def put(self, key: Hashable, answer: CachedAnswer) -> None:
        self._entries[key] = answer
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


class CachingEngine:
    """An `Engine` that answers repeated deterministic requests from a `ResponseCache`."""

    def __init__(self, engine: Engine, cache: ResponseCache) -> None:
        self.engine = engine
        self.cache = cache
        self._load_generation: dict[str, int] = {}
        self._generations = itertools.count(1)

    def key(self, request: GenerationRequest) -> Hashable | None:
        """None for requests whose answer may differ each time."""
        s = request.sampling
        if s.greedy:
            sampling: tuple[object, ...] = ("greedy", s.max_tokens, s.stop)  # seed and top_p change nothing
        elif s.seed is not None:
            sampling = ("seeded", s.max_tokens, s.stop, s.temperature, s.top_p, s.seed)
        else:
            return None
        version = request.adapter_key
        generation = 0 if version is None else self._load_generation.get(version)
        if generation is None:
            return None  # not loaded: the engine will refuse it anyway
        return (version, generation, tuple(request.prompt_token_ids), sampling)

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        key = self.key(request)
        if key is None:
            return self.engine.generate(request)
        answer = self.cache.get(key)
        if answer is not None:
            return _replay(answer)
        return self._remember(key, self.engine.generate(request))  # the engine queues it now

    async def _remember(self, key: Hashable, source: AsyncIterator[GenerationChunk]) -> AsyncIterator[GenerationChunk]:
        texts: list[str] = []
        token_ids: list[int] = []
        try:
            async for chunk in source:
                texts.append(chunk.text)
                token_ids += chunk.token_ids
                if chunk.finish_reason in ("stop", "length"):
                    self.cache.put(
                        key,
                        CachedAnswer(
                            "".join(texts),
                            chunk.finish_reason,
                            chunk.prompt_tokens,
                            chunk.completion_tokens,
                            tuple(token_ids),
                        ),
                    )
                    chunk = replace(chunk, cache="miss")
                yield chunk
        finally:
            await close_stream(source)  # a client that left cancels the generation

    # -- the rest of the Engine interface, passed through ----------------------------------------
    async def load_adapter(self, key: str, weights: LoRAWeights) -> None:
        await self.engine.load_adapter(key, weights)
        self._load_generation[key] = next(self._generations)

    async def unload_adapter(self, key: str) -> None:
        self._load_generation.pop(key, None)
        await self.engine.unload_adapter(key)

    @property
    def loaded_adapters(self) -> frozenset[str]:
        return self.engine.loaded_adapters

    @property
    def max_loaded_adapters(self) -> int:
        return self.engine.max_loaded_adapters

    @property
    def waiting(self) -> int:
        return self.engine.waiting

    @property
    def running(self) -> int:
        return self.engine.running

    async def start(self) -> None:
        await self.engine.start()

    async def stop(self) -> None:
        await self.engine.stop()


async def _replay(answer: CachedAnswer) -> AsyncIterator[GenerationChunk]:
    yield GenerationChunk(
        text=answer.text,
        finish_reason=answer.finish_reason,
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=answer.completion_tokens,
        token_ids=list(answer.token_ids),
        cache="hit",
    )
