"""Continuous batching: who waits, who runs, and what the next forward pass contains.

Requests wait in FIFO order and are admitted at a step boundary when a KV slot is free. Every step
holds one token of each decoding sequence plus prompt chunks of newly admitted ones, up to
`max_batched_tokens`, so a long prompt is prefilled over several steps while the running streams
keep producing a token per step (chunked prefill). A sequence leaves the batch the step it finishes
or is cancelled, and its slot is reused by the next admission.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from serving.engine.kv_cache import KVCache
from serving.engine.sequence import Sequence

MIN_PREFILL_TOKENS = 16  # prefill always progresses, even when the decode rows fill the token budget


@dataclass(frozen=True)
class SchedulerLimits:
    max_running: int  # sequences generating at once (KV slots)
    max_batched_tokens: int  # tokens per forward pass, decode rows and prompt chunks together
    max_waiting: int  # queued requests beyond which new ones are refused (HTTP 429)


@dataclass
class StepPlan:
    decode: list[Sequence]  # ascending KV slot
    prefill: list[tuple[Sequence, int, int]]  # (sequence, first prompt position, tokens)

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill)


class Scheduler:
    def __init__(self, limits: SchedulerLimits, cache: KVCache) -> None:
        self.limits = limits
        self.cache = cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def drop_cancelled(self) -> None:
        """Forget sequences whose clients left; their slots and KV rows are free for the next admission."""
        if any(s.cancelled for s in self.waiting):
            self.waiting = deque(s for s in self.waiting if not s.cancelled)
        for seq in [s for s in self.running if s.cancelled]:
            self.release(seq)

    def release(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.cache.release(seq.kv_slot)
        seq.kv_slot = -1

    def admit(self, adapter_slot: Callable[[str | None], int]) -> list[tuple[Sequence, BaseException]]:
        """Move waiting sequences into free slots; returns those that cannot run, with the reason."""
        refused: list[tuple[Sequence, BaseException]] = []
        while self.waiting and self.cache.free_slots and len(self.running) < self.limits.max_running:
            seq = self.waiting.popleft()
            if len(seq.prompt) >= self.cache.capacity:
                refused.append((seq, ValueError(f"the prompt has {len(seq.prompt)} tokens; the limit is less")))
                continue
            try:
                seq.adapter_slot = adapter_slot(seq.request.adapter_key)
            except KeyError as exc:
                refused.append((seq, exc))
                continue
            seq.kv_slot = self.cache.allocate()
            self.running.append(seq)
        return refused

    def plan(self) -> StepPlan:
        decode = sorted((s for s in self.running if not s.prefilling), key=lambda s: s.kv_slot)
        budget = max(self.limits.max_batched_tokens - len(decode), MIN_PREFILL_TOKENS)
        prefill: list[tuple[Sequence, int, int]] = []
        for seq in self.running:  # admission order: the oldest prompt finishes first
            if budget <= 0:
                break
            if seq.prefilling:
                take = min(len(seq.prompt) - seq.prefilled, budget)
                prefill.append((seq, seq.prefilled, take))
                budget -= take
        return StepPlan(decode, prefill)
