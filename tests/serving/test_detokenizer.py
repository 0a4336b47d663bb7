"""Incremental detokenisation: multi-byte characters and stop strings that straddle tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from serving.engine.detokenizer import IncrementalDetokenizer

TEXT = "Héllo wörld — 東京 is big 🎉🎉, ok?  Two  spaces.\nNew line"


@pytest.fixture(scope="module")
def tokenizer(bundled_model_dir: Path):
    return AutoTokenizer.from_pretrained(bundled_model_dir)


def test_token_by_token_equals_whole_decode(tokenizer) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in piece for piece in pieces)  # never half a character


@pytest.mark.parametrize("stop", ["東京", "g 🎉", "ok?", "\nNew"])
def test_stop_string_across_tokens_cuts_the_text_before_it(tokenizer, stop: str) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, stop=(stop,))
    out = ""
    for i in ids:
        out += detok.add(i)
        if detok.stopped:
            break
    assert detok.stopped
    assert out == TEXT[: TEXT.index(stop)]


def test_unfinished_stop_prefix_is_released_at_the_end(tokenizer) -> None:
    ids = tokenizer.encode("the end is ne", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, stop=("near",))
    out = "".join(detok.add(i) for i in ids) + detok.flush()
    assert out == "the end is ne"
    assert not detok.stopped
