"""Token ids in, text out, one token at a time, correct for multi-byte characters and stop strings.

Decoding token by token breaks characters whose UTF-8 bytes span tokens (they show as U+FFFD
until the last byte arrives), and tokenizers that merge spaces change earlier text when a new
token arrives. So, like TGI and vLLM, we decode a small window and emit only the stable suffix.
Stop strings may straddle tokens: text that could still become a stop string is held back.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._text = ""  # everything decoded so far
        self._emitted = 0  # how much of _text the caller has received
        self.stopped = False

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.token_ids[start:end], skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Feed one token; return the text that is now safe to send (maybe empty)."""
        if self.stopped:
            return ""
        self.token_ids.append(token_id)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            self._text += new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)
        return self._release()

    def flush(self) -> str:
        """At the end: whatever was held back (an unfinished stop-string prefix is just text)."""
        if self.stopped:
            return ""
        tail = self._decode(self._prefix_offset)
        held = self._decode(self._prefix_offset, self._read_offset)
        if len(tail) > len(held):
            self._text += tail[len(held) :].rstrip(REPLACEMENT_CHAR)
        out = self._text[self._emitted :]
        self._emitted = len(self._text)
        return out

    def _release(self) -> str:
        for stop in self.stop:
            # A stop string can only start in the not-yet-emitted part or straddle its start.
            search_from = max(0, self._emitted - len(stop) + 1)
            at = self._text.find(stop, search_from)
            if at != -1:
                self.stopped = True
                out = self._text[self._emitted : at]
                self._text = self._text[:at]
                self._emitted = len(self._text)
                return out
        hold = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(self._text) - self._emitted), 0, -1):
                if self._text.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        release_to = len(self._text) - hold
        out = self._text[self._emitted : release_to]
        self._emitted = release_to
        return out

    @property
    def text(self) -> str:
        return self._text
