"""One request inside the batched engine: its prompt, where it is, what it has produced.

The engine thread owns every field except `cancelled`, which the request's async side sets when the
client goes away (a plain bool: one writer, one reader, checked once per step).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import torch

from serving.engine.detokenizer import IncrementalDetokenizer
from serving.engine.prefix_cache import PrefixEntry
from serving.engine.types import FinishReason, GenerationChunk, GenerationRequest


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    loop: asyncio.AbstractEventLoop
    chunks: asyncio.Queue[Any]  # GenerationChunk or the exception that ended the request
    cancelled: bool = False
    # Set at admission:
    kv_slot: int = -1
    adapter_slot: int = 0
    # Progress: tokens whose keys/values are in the cache, prompt tokens prefilled (or copied from the
    # prefix cache: `reused` of them), tokens sampled.
    cached: int = 0
    prefilled: int = 0
    reused: int = 0
    generated: int = 0
    output_ids: list[int] = field(default_factory=list)  # every sampled token, for the prefix cache at the end
    prefix_entry: PrefixEntry | None = None  # its newest entry in the prefix cache, replaced by a longer one
    next_token: int = -1  # the last sampled token, fed in the next step
    unsent_token_ids: list[int] = field(default_factory=list)
    finish: FinishReason | None = None

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def tokens_in_cache(self) -> list[int]:
        """The tokens whose keys and values the cache holds: the prompt, then the answer but its last token."""
        return self.prompt + self.output_ids[: self.cached - len(self.prompt)]

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt)

    def accept(self, token: int, eos_ids: frozenset[int], capacity: int) -> GenerationChunk | None:
        """Take one sampled token; return the chunk to send (None when there is nothing to say yet)."""
        params = self.request.sampling
        self.generated += 1
        self.next_token = token
        self.output_ids.append(token)
        if token in eos_ids:
            self.finish = "stop"
            return self._final("")
        self.unsent_token_ids.append(token)
        text = self.detokenizer.add(token)
        if self.detokenizer.stopped:
            self.finish = "stop"
        elif self.generated >= params.max_tokens or self.cached >= capacity:
            self.finish = "length"
        if self.finish is not None:
            return self._final(text)
        if not text:
            return None  # held back (a partial character or a possible stop string): send it with the next text
        chunk = GenerationChunk(text=text, token_ids=self.unsent_token_ids)
        self.unsent_token_ids = []
        return chunk

    def _final(self, text: str) -> GenerationChunk:
        tail = self.detokenizer.flush() if self.finish != "cancelled" else ""
        chunk = GenerationChunk(
            text=text + tail,
            finish_reason=self.finish,
            prompt_tokens=len(self.prompt),
            completion_tokens=self.generated,
            cached_tokens=self.reused,
            token_ids=self.unsent_token_ids,
        )
        self.unsent_token_ids = []
        return chunk
