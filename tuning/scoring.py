"""What the gate measures with a model: answer log-probabilities, greedy answers, and next-token KL.

Prompts are rendered with the serving chat template (`serving.prompt.render_prompt`), so the
numbers describe exactly what users are served.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from serving.prompt import render_prompt

Messages = list[dict[str, Any]]

# Greedy probes a batch: the gate's 86 probes took 32 s against 44 s in batches of 16 (fp32, 2-core CPU).
GREEDY_BATCH_SIZE = 32


@dataclass(frozen=True)
class AnswerScore:
    logprob: float  # sum over the answer's tokens
    tokens: int


def without_turn_end(answer_ids: list[int], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """An answer's tokens without what the chat template adds after its text (`<|im_end|>` and the newline
    after it here): from its last special token on. For answers cut at max_tokens, where the model never
    ended its turn: scoring or training the end-of-turn there would teach "stop after long text"."""
    special = set(tokenizer.all_special_ids)
    for i in range(len(answer_ids) - 1, -1, -1):
        if answer_ids[i] in special:
            return answer_ids[:i]
    return answer_ids


def _answer_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: Messages, answer: str, finished: bool = True
) -> tuple[list[int], list[int]]:
    prompt_ids = render_prompt(tokenizer, prompt)
    full = tokenizer.apply_chat_template(
        [*prompt, {"role": "assistant", "content": answer}], tokenize=True, return_dict=True
    )["input_ids"]
    # The answer starts where prompt and full conversation stop agreeing (as TRL does).
    common = 0
    for a, b in zip(prompt_ids, full, strict=False):
        if a != b:
            break
        common += 1
    answer_ids = list(full[common:])
    return list(full[:common]), answer_ids if finished else without_turn_end(answer_ids, tokenizer)


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _answer_log_softmax(
    model: torch.nn.Module, batch: list[tuple[list[int], list[int]]], pad_token_id: int
) -> list[torch.Tensor]:
    """For each (prompt ids, answer ids): the model's next-token log-probabilities [len(answer), vocab] at
    the answer's positions, teacher-forced, in one right-padded forward (padding after a row cannot change
    it under the causal mask). Logits are computed only over the batch's answer span: the LM head is most
    of a forward's work here (49k rows), and the prompts' positions are not needed."""
    device = next(model.parameters()).device
    length = max(len(p) + len(a) for p, a in batch)
    ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for i, (p, a) in enumerate(batch):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        mask[i, : len(p) + len(a)] = 1
    first = min(len(p) for p, _ in batch) - 1  # logits at t predict token t + 1
    keep = torch.arange(first, length - 1, device=device)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=keep).logits
    logp = F.log_softmax(logits.float(), dim=-1)  # [B, length - 1 - first, V]
    return [logp[i, len(p) - 1 - first : len(p) + len(a) - 1 - first] for i, (p, a) in enumerate(batch)]


@torch.inference_mode()
def answer_logprobs(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[tuple[Messages, str, bool]],
    *,
    batch_size: int = 8,
) -> list[AnswerScore]:
    """log p(answer | prompt) under `model`, summed over the answer tokens, for each (prompt, answer, finished)."""
    encoded = [_answer_ids(tokenizer, prompt, answer, finished) for prompt, answer, finished in rows]
    scores: list[AnswerScore] = []
    for batch in _batches(encoded, batch_size):
        for (_, answer), logp in zip(batch, _answer_log_softmax(model, batch, tokenizer.pad_token_id), strict=True):
            taken = logp.gather(-1, torch.tensor(answer, device=logp.device).unsqueeze(-1))
            scores.append(AnswerScore(float(taken.sum()), len(answer)))
    return scores


@torch.inference_mode()
def greedy_answers(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Messages],
    *,
    max_new_tokens: int = 32,
    batch_size: int = GREEDY_BATCH_SIZE,
) -> list[list[int]]:
    """Greedy answer token ids (EOS excluded) for each prompt, batched with left padding."""
    device = next(model.parameters()).device
    answers: list[list[int]] = []
    eos = tokenizer.eos_token_id
    for batch in _batches([render_prompt(tokenizer, p) for p in prompts], batch_size):
        length = max(len(p) for p in batch)
        ids = torch.full((len(batch), length), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for i, p in enumerate(batch):
            ids[i, length - len(p) :] = torch.tensor(p)
            mask[i, length - len(p) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row in out[:, length:].tolist():
            answers.append(row[: row.index(eos)] if eos in row else row)
    return answers


@torch.inference_mode()
def mean_kl(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Messages],
    answers: list[list[int]],
    as_reference: Callable[[], AbstractContextManager[Any]],
    as_candidate: Callable[[], AbstractContextManager[Any]],
    *,
    batch_size: int = 16,
) -> float:
    """Mean per-token KL(reference ‖ candidate) along the reference's own answers (teacher-forced).

    One model plays both parts: `as_reference()` / `as_candidate()` switch its adapter.
    """
    rows = [(render_prompt(tokenizer, p), a) for p, a in zip(prompts, answers, strict=True) if a]
    total, count = 0.0, 0
    for batch in _batches(rows, batch_size):
        with as_reference():
            refs = _answer_log_softmax(model, batch, tokenizer.pad_token_id)
        with as_candidate():
            cands = _answer_log_softmax(model, batch, tokenizer.pad_token_id)
        for ref, cand in zip(refs, cands, strict=True):
            total += float((ref.exp() * (ref - cand)).sum())
            count += ref.shape[0]
    return total / count if count else 0.0
