"""Keys and values of earlier prompts, kept so a new prompt that starts the same way skips that part.

Chat prompts share long beginnings: the chat template's system prompt opens every request, and each
turn of a conversation repeats the turns before it. Their keys and values are the same every time, so
recomputing them is wasted prefill (on a 2-core CPU a prompt token costs about what a decode row does).
This is vLLM's automatic prefix caching and SGLang's RadixAttention, for a KV cache that gives each
sequence one contiguous row: a hit copies the stored positions into the new sequence's row and its
prefill starts after them.

Keys and values depend on the adapter as well as on the tokens (LoRA changes every layer's inputs and
k/v projections), so every entry belongs to an *owner*: the adapter slot and which load of that slot
computed it. An owner never matches another's entries, and unloading an adapter drops its entries
(llama.cpp's server keyed its prompt cache by tokens only and answered one adapter's prompt from another
adapter's cache).

Lookup, as vLLM's: the prompt is cut into blocks of `BLOCK` tokens and each block prefix is found by a
chained hash of the owner and the tokens so far; the longest found prefix is then checked token by token
and extended within that entry to the exact common length. Entries are whole prompts (and finished
sequences' prompt + answer), each a copy, evicted least recently used beyond a byte budget.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from serving.engine.kv_cache import KVCache

BLOCK = 16  # tokens per hashed block: shorter shared beginnings are not worth a lookup


@dataclass(eq=False)
class PrefixEntry:
    owner: Hashable
    tokens: list[int]
    kv: torch.Tensor  # [layers, 2 (k, v), kv_heads, len(tokens), head_dim]
    index_keys: list[tuple[Hashable, int]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


def _block_hashes(owner: Hashable, tokens: list[int], blocks: int) -> list[int]:
    hashes, h = [], hash(owner)
    for b in range(blocks):
        h = hash((h, *tokens[b * BLOCK : (b + 1) * BLOCK]))
        hashes.append(h)
    return hashes


class PrefixCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.bytes = 0
        self._entries: OrderedDict[PrefixEntry, None] = OrderedDict()  # least recently used first
        self._index: dict[tuple[Hashable, int], PrefixEntry] = {}  # (owner, block-prefix hash) -> newest entry with it

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, owner: Hashable, tokens: list[int]) -> tuple[PrefixEntry | None, int]:
        """The entry sharing the longest beginning with `tokens`, and that length (at most len - 1)."""
        limit = len(tokens) - 1  # the last prompt token is always computed: its logits give the first answer token
        best, n = None, 0
        for b, h in enumerate(_block_hashes(owner, tokens, limit // BLOCK)):
            entry = self._index.get((owner, h))
            if entry is None:
                break
            best, n = entry, (b + 1) * BLOCK
        if best is None or best.tokens[:n] != tokens[:n]:  # a hash is not proof: the tokens are
            return None, 0
        stop = min(limit, len(best.tokens))
        while n < stop and best.tokens[n] == tokens[n]:
            n += 1
        self._entries.move_to_end(best)
        return best, n

    def copy_into(self, entry: PrefixEntry, length: int, cache: KVCache, slot: int) -> None:
        for layer, (k, v) in enumerate(zip(cache.k, cache.v, strict=True)):
            k[slot, :, :length] = entry.kv[layer, 0, :, :length]
            v[slot, :, :length] = entry.kv[layer, 1, :, :length]

    def store(self, owner: Hashable, tokens: list[int], cache: KVCache, slot: int) -> PrefixEntry | None:
        """Keep a copy of `slot`'s keys and values for `tokens` (its first len(tokens) positions).

        Nothing is stored when an entry of this owner already covers them, or they are shorter than a block."""
        end = len(tokens)
        hashes = _block_hashes(owner, tokens, end // BLOCK)
        if not hashes or end * cache.bytes_per_token > self.budget_bytes:
            return None
        covering = self._index.get((owner, hashes[-1]))
        if covering is not None and covering.tokens[:end] == tokens:
            return None
        rows = [torch.stack((k[slot, :, :end], v[slot, :, :end])) for k, v in zip(cache.k, cache.v, strict=True)]
        entry = PrefixEntry(owner, list(tokens), torch.stack(rows))
        for h in hashes:
            entry.index_keys.append((owner, h))
            self._index[(owner, h)] = entry
        self._entries[entry] = None
        self.bytes += entry.nbytes
        while self.bytes > self.budget_bytes:
            self.discard(next(iter(self._entries)))
        return entry

    def discard(self, entry: PrefixEntry) -> None:
        if entry not in self._entries:
            return
        del self._entries[entry]
        self.bytes -= entry.nbytes
        for key in entry.index_keys:
            if self._index.get(key) is entry:
                del self._index[key]

    def drop_owner(self, owner: Hashable) -> None:
        """Forget every entry `owner` computed (its adapter was unloaded: the slot will hold other weights)."""
        for entry in [e for e in self._entries if e.owner == owner]:
            self.discard(entry)
