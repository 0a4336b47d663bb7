"""The KV cache: one fixed row of positions per running sequence, allocated once from config.

Layout per layer: `[slots, kv_heads, capacity, head_dim]`, so the decode batch reads a plain strided
view `[:span, :, :length]` of it (no gather, no copy) and a sequence's prefill writes one
contiguous run. A sequence takes the lowest free slot when it starts and gives it back when it ends
or is cancelled; the next sequence simply overwrites it.

Memory: the whole reservation (`reserved_bytes`) is allocated uninitialised, so the operating system
backs only the pages that sequences actually touch. SDPA's decode attention reads every position of
the batch's span up to the longest row (masked), so positions must be finite before they are read;
`ensure_finite` zeroes each slot up to a high-water mark that only grows, in whole chunks. (The CPU
decode attention kernel reads each row's own positions only and needs none of this.)
"""

from __future__ import annotations

import heapq

import torch

_ZERO_CHUNK = 256  # positions zeroed at a time when a slot's readable window grows


class KVCache:
    def __init__(
        self,
        *,
        layers: int,
        kv_heads: int,
        head_dim: int,
        slots: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if slots < 1 or capacity < 1:
            raise ValueError("the KV cache needs at least one slot and one position")
        self.slots = slots
        self.capacity = capacity
        self.kv_heads = kv_heads
        self.dtype = dtype
        shape = (slots, kv_heads, capacity, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.bytes_per_token = 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        self._free = list(range(slots))  # a heap: the lowest free slot first keeps the decode span short
        self._finite_upto = [0] * slots
        self._used: dict[int, int] = {}  # slot -> positions holding this sequence's keys/values

    # -- slots --------------------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def slots_in_use(self) -> frozenset[int]:
        return frozenset(self._used)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV cache slot")  # the scheduler checks free_slots first
        slot = heapq.heappop(self._free)
        self._used[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        if self._used.pop(slot, None) is not None:
            heapq.heappush(self._free, slot)

    def set_length(self, slot: int, length: int) -> None:
        self._used[slot] = length

    # -- accounting -----------------------------------------------------------------------------
    @property
    def reserved_bytes(self) -> int:
        return self.slots * self.capacity * self.bytes_per_token

    @property
    def tokens_in_use(self) -> int:
        return sum(self._used.values())

    # -- reads ----------------------------------------------------------------------------------
    def ensure_finite(self, span: int, length: int) -> None:
        """Make positions [0, length) of slots [0, span) safe to read under a mask."""
        for slot in range(span):
            if self._finite_upto[slot] >= length:
                continue
            start = self._finite_upto[slot]
            end = min(self.capacity, -(-length // _ZERO_CHUNK) * _ZERO_CHUNK)
            for k, v in zip(self.k, self.v, strict=True):
                k[slot, :, start:end].zero_()
                v[slot, :, start:end].zero_()
            self._finite_upto[slot] = end

    def mark_written(self, slot: int, end: int) -> None:
        """Positions below `end` now hold real (finite) keys and values."""
        if end > self._finite_upto[slot]:
            self._finite_upto[slot] = end
