"""The gate's measurements batch rows of different lengths and compute logits only over the answers'
span; each row must get what a forward of that row alone, over every position, gives."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from serving.prompt import render_prompt
from tuning import scoring, trainer
from tuning.gate import Contenders
from tuning.settings import TuningSettings

PROMPTS = [
    [{"role": "user", "content": "Hi."}],
    [{"role": "user", "content": "Tell me, in as much detail as you can manage, how a bicycle gear works."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}],
]
ANSWERS = ["Hello!", "Gears trade force for speed: a small front ring and a big rear cog make climbing easy.", "Air."]


def _policy(tiny_model_dir: Path):
    tuning = TuningSettings()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        base.model.norm.weight.mul_(30)  # sharper than the random model's near-flat logits
    policy = trainer.attach_adapter(base, tuning, None)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return policy, tokenizer


def test_batched_answer_logprobs_equal_one_row_at_a_time(tiny_model_dir: Path) -> None:
    policy, tokenizer = _policy(tiny_model_dir)
    rows = [(p, a, i != 1) for i, (p, a) in enumerate(zip(PROMPTS, ANSWERS, strict=True))]
    batched = scoring.answer_logprobs(policy, tokenizer, rows, batch_size=8)
    alone = scoring.answer_logprobs(policy, tokenizer, rows, batch_size=1)
    assert [s.tokens for s in batched] == [s.tokens for s in alone]
    for b, a in zip(batched, alone, strict=True):
        assert abs(b.logprob - a.logprob) < 1e-3 * max(1.0, abs(a.logprob))
    # and against a plain full forward of each row
    for (prompt, answer, finished), score in zip(rows, alone, strict=True):
        prompt_ids, answer_ids = scoring._answer_ids(tokenizer, prompt, answer, finished)
        ids = torch.tensor([prompt_ids + answer_ids])
        with torch.inference_mode():
            logp = F.log_softmax(policy(input_ids=ids).logits[0].float(), dim=-1)
        expected = sum(float(logp[len(prompt_ids) - 1 + i, t]) for i, t in enumerate(answer_ids))
        assert abs(score.logprob - expected) < 1e-3 * max(1.0, abs(expected))


def test_batched_kl_equals_the_per_row_kl(tiny_model_dir: Path) -> None:
    policy, tokenizer = _policy(tiny_model_dir)
    contenders = Contenders(policy, None)
    answers = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in ANSWERS]
    answers[2] = []  # an empty answer counts for nothing

    def kl(batch_size: int) -> float:
        return scoring.mean_kl(
            policy, tokenizer, PROMPTS, answers, contenders.incumbent, contenders.candidate, batch_size=batch_size
        )

    # the definition, one row at a time over every position
    total, count = 0.0, 0
    for prompt, answer in zip(PROMPTS, answers, strict=True):
        if not answer:
            continue
        ids = torch.tensor([render_prompt(tokenizer, prompt) + answer])
        span = slice(ids.shape[1] - len(answer) - 1, ids.shape[1] - 1)
        with torch.inference_mode():
            with contenders.incumbent() as model:
                ref = F.log_softmax(model(input_ids=ids).logits[0, span].float(), dim=-1)
            with contenders.candidate() as model:
                cand = F.log_softmax(model(input_ids=ids).logits[0, span].float(), dim=-1)
        total += float((ref.exp() * (ref - cand)).sum())
        count += len(answer)
    expected = total / count
    assert expected > 0.01  # the adapter changes the distributions: the comparison means something
    assert abs(kl(16) - expected) < 1e-4 * max(1.0, expected)
    assert abs(kl(1) - expected) < 1e-4 * max(1.0, expected)
