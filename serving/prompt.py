"""Rendering chat messages into the token ids the model sees.

Tuning renders training prompts with the same template and the same generation prompt (TRL's
conversational format applies `add_generation_prompt=True` to the prompt), so the model is
trained on exactly what it is served.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])
