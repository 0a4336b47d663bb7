"""The gate refuses candidates that are worse, that drifted, that win by length alone, or that stop answering."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from feedback.training_data import RatedAnswer
from serving.prompt import render_prompt
from tuning import trainer
from tuning.datasets import kto_dataset
from tuning.gate import Contenders, judge_drift, judge_non_answers, judge_pairs, judge_thumbs, run_gate
from tuning.probes import FactualProbe, everyday_probes, factual_probes
from tuning.settings import TuningSettings

SETTINGS = TuningSettings(gate_min_heldout=8)


# -- the judgements, on constructed numbers --------------------------------------------------------
def test_thumbs_better_passes_and_worse_fails() -> None:
    labels = [True] * 10 + [False] * 10
    tokens = [20] * 20
    better = [2.0 + i * 0.1 for i in range(10)] + [-2.0 - i * 0.1 for i in range(10)]
    reasons, figures = judge_thumbs(better, tokens, labels, SETTINGS)
    assert reasons == [] and figures["heldout_auc"] == 1.0
    worse = [-d for d in better]
    reasons, figures = judge_thumbs(worse, tokens, labels, SETTINGS)
    assert figures["heldout_auc"] == 0.0
    assert any("does not beat the incumbent" in r for r in reasons)


def test_winning_by_length_alone_is_refused() -> None:
    # Liked answers are short, disliked long; the candidate just lowers every token by the same amount,
    # so by sums the short (liked) answers lose less and "win"; per token nothing changed.
    labels = [True] * 12 + [False] * 12
    tokens = [5 + i % 3 for i in range(12)] + [40 + i % 5 for i in range(12)]
    deltas = [-0.3 * t for t in tokens]
    reasons, figures = judge_thumbs(deltas, tokens, labels, SETTINGS)
    assert figures["heldout_auc"] == 1.0  # would pass on sums
    assert figures["heldout_auc_per_token"] == 0.5
    assert reasons == ["wins by length alone (per-token AUC 0.500 ≤ 0.5)"]


def test_too_little_heldout_is_not_measured() -> None:
    reasons, figures = judge_thumbs([1.0, -1.0, 0.5], [3, 3, 3], [True, False, True], SETTINGS)
    assert reasons == [] and figures["preference"].startswith("not measured")


def test_pairs_and_drift_judgements() -> None:
    reasons, figures = judge_pairs([1.0] * 8, [0.0] * 8, [10] * 8, [10] * 8, SETTINGS)
    assert reasons == [] and figures["pair_accuracy"] == 1.0
    reasons, _ = judge_pairs([0.0] * 8, [1.0] * 8, [10] * 8, [10] * 8, SETTINGS)
    assert reasons and "does not prefer" in reasons[0]
    assert judge_drift(0.1, 40, 40, 40, 3, SETTINGS)[0] == []
    assert "drifted" in judge_drift(5.0, 40, 40, 40, 30, SETTINGS)[0][0]
    assert "breaks factual" in judge_drift(0.1, 30, 40, 40, 10, SETTINGS)[0][0]
    assert judge_drift(0.1, 0, 0, 40, 0, SETTINGS)[0] == []  # no worse than an incumbent that knows nothing
    assert judge_non_answers(5, 2, 86, SETTINGS)[0] == []  # three more non-answers: within the allowance
    assert "stops answering" in judge_non_answers(6, 2, 86, SETTINGS)[0][0]


# -- real candidates on the tiny model ------------------------------------------------------------
PROMPT = [{"role": "user", "content": "Answer me."}]
SHORT, LONG = "Yes.", "Well, let me think about that for a long while before I answer you properly."


def _ratings(n: int, like_short: bool, offset: int = 0) -> list[RatedAnswer]:
    rows = []
    for i in range(n):
        short = i % 2 == 0
        rows.append(
            RatedAnswer(
                f"r{offset + i}",
                1,
                [{"role": "user", "content": f"Answer me {offset + i}."}],
                SHORT if short else LONG,
                1 if short == like_short else -1,
                None,
                "x",
            )
        )
    return rows


def _trained(tiny_model_dir: Path, like_short: bool, tmp_path: Path):
    tuning = TuningSettings(max_steps=12, batch_size=4, learning_rate=5e-3, precision="fp32", max_length=64)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = trainer.attach_adapter(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), tuning, None
    )
    trainer.train_kto(
        policy, tokenizer, kto_dataset(_ratings(16, like_short)), tuning, torch.device("cpu"), tmp_path, lambda *a: None
    )
    return policy, tokenizer


@pytest.fixture(scope="module")
def probes() -> list[FactualProbe]:
    return factual_probes()[:6]


def test_a_candidate_that_learned_the_preference_passes_and_the_opposite_fails(
    tiny_model_dir: Path, tmp_path: Path, probes: list[FactualProbe]
) -> None:
    heldout = _ratings(16, like_short=True, offset=100)
    lenient = TuningSettings(gate_min_heldout=8, gate_max_kl=100.0, gate_probe_tokens=4)
    good, tokenizer = _trained(tiny_model_dir, like_short=True, tmp_path=tmp_path / "good")
    report = run_gate(Contenders(good, None), tokenizer, heldout, [], probes, lenient)
    assert report.passed, report.reasons
    assert report.figures["heldout_auc"] > 0.9

    worse, tokenizer = _trained(tiny_model_dir, like_short=False, tmp_path=tmp_path / "worse")
    report = run_gate(Contenders(worse, None), tokenizer, heldout, [], probes, lenient)
    assert not report.passed
    assert any("does not beat the incumbent" in r for r in report.reasons)


def test_a_drifted_candidate_fails_the_kl_budget(tiny_model_dir: Path, tmp_path: Path, probes) -> None:
    # The tiny random model's logits are nearly flat (small embeddings), so KLs are small: a small budget.
    tuning = TuningSettings(gate_probe_tokens=4, gate_max_kl=0.01)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = trainer.attach_adapter(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), tuning, None
    )
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_" in name:
                param.normal_(0, 3.0)  # a wild adapter: very different next-token distributions
    report = run_gate(Contenders(policy, None), tokenizer, [], [], probes, tuning)
    assert not report.passed
    assert report.figures["probe_kl"] > 0.01 and "drifted" in report.reasons[0]

    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.zero_()  # the same adapter with no effect: no drift at all
    report = run_gate(Contenders(policy, None), tokenizer, [], [], probes, tuning)
    assert report.passed and report.figures["probe_kl"] < 1e-6


def test_a_candidate_that_learned_to_deflect_is_refused(tiny_model_dir: Path, probes) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tuning = TuningSettings(gate_probe_tokens=6, gate_max_kl=100.0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():  # the random model's logits are nearly flat; sharpen them so a LoRA can steer the text
        base.model.norm.weight.mul_(30)
    policy = trainer.attach_adapter(base, tuning, None)
    # Teach the LoRA to open every answer with an apology (plain next-token loss on the probe prompts).
    everyday = everyday_probes()[:6]
    apology = tokenizer("I'm sorry, I can't help with that.", add_special_tokens=False)["input_ids"]
    rows = [render_prompt(tokenizer, messages) for messages in [p.messages for p in probes] + everyday]
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    policy.train()
    for _ in range(20):
        for prompt in rows:
            ids = torch.tensor([prompt + apology])
            labels = ids.clone()
            labels[0, : len(prompt)] = -100
            policy(input_ids=ids, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    report = run_gate(Contenders(policy, None), tokenizer, [], [], probes, tuning, everyday=everyday)
    assert report.figures["non_answers"] == 12 and report.figures["non_answers_incumbent"] == 0
    assert any("stops answering" in r for r in report.reasons)
    allowing = TuningSettings(gate_probe_tokens=6, gate_max_kl=100.0, gate_max_new_non_answers=12)
    report = run_gate(Contenders(policy, None), tokenizer, [], [], probes, allowing, everyday=everyday)
    assert not any("stops answering" in r for r in report.reasons)
