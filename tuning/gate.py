"""Where the gate is: a candidate adapter is promoted only if it wins users' held-out feedback, wins it
per token and not by length alone, and stays close to the incumbent on a fixed probe set.

Winning the rater is easy; winning it while staying a good assistant is the product (a naive round
moved the up-rate 3% → 100% and answered "What's the capital of?" to a factual question). So:

1. preference — on feedback held out of training, the candidate's implicit reward
   Δ = log p_cand(answer) − log p_inc(answer) must rank liked answers above disliked ones
   (Mann-Whitney AUC, one-sided z ≥ `gate_min_z`; pairs: chosen above rejected). The incumbent's own
   Δ is 0 for everything, so AUC 0.5 is "no better than the incumbent".
2. not by length alone — the same ranking with Δ divided by the answer's token count must still be
   better than chance. A model that lowers every token's probability a little "prefers" short
   answers by sums alone; per token it prefers nothing.
3. drift — mean per-token KL(incumbent ‖ candidate) along the incumbent's answers to the probe
   prompts stays under `gate_max_kl`, and factual probes stay answered (≥ `gate_min_factual_accuracy`,
   or at least as many as the incumbent answers).
4. still answering — of its greedy answers to the factual and the everyday probes, at most
   `gate_max_new_non_answers` more than the incumbent's are deflections or in another language
   (`answer_checks`). A 90 % factual floor alone let through a candidate that deflected everyday
   questions and answered in French.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import structlog
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from feedback.models import ComparisonOutcome
from feedback.training_data import ComparedAnswers, RatedAnswer
from serving.prompt import render_prompt
from tuning import scoring
from tuning.answer_checks import is_non_answer
from tuning.probe_answers import GreedyConditions, KnownAnswers
from tuning.probes import FactualProbe, everyday_probes
from tuning.settings import TuningSettings

log = structlog.get_logger(__name__)

INCUMBENT = "incumbent"


@dataclass
class GateReport:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def as_metrics(self) -> dict[str, Any]:
        return {"passed": self.passed, "reasons": self.reasons, **self.figures}


def auc_with_z(positives: list[float], negatives: list[float]) -> tuple[float, float]:
    """P(a positive scores above a negative) and its z against 0.5 (Mann-Whitney, ties count half)."""
    n1, n2 = len(positives), len(negatives)
    wins = sum((p > q) + 0.5 * (p == q) for p in positives for q in negatives)
    auc = wins / (n1 * n2)
    se = math.sqrt((n1 + n2 + 1) / (12 * n1 * n2))
    return auc, (auc - 0.5) / se


def _binomial_z(successes: int, n: int) -> float:
    return (successes / n - 0.5) / math.sqrt(0.25 / n)


def judge_thumbs(
    deltas: list[float], tokens: list[int], labels: list[bool], settings: TuningSettings
) -> tuple[list[str], dict[str, Any]]:
    """Preference and length checks on held-out thumbs. Returns (failure reasons, figures)."""
    liked = [i for i, label in enumerate(labels) if label]
    disliked = [i for i, label in enumerate(labels) if not label]
    figures: dict[str, Any] = {"heldout_liked": len(liked), "heldout_disliked": len(disliked)}
    if len(liked) < 2 or len(disliked) < 2 or len(labels) < settings.gate_min_heldout:
        figures["preference"] = "not measured: too little held-out feedback of each kind"
        return [], figures
    raw_auc, raw_z = auc_with_z([deltas[i] for i in liked], [deltas[i] for i in disliked])
    per_token = [d / max(t, 1) for d, t in zip(deltas, tokens, strict=True)]
    norm_auc, _ = auc_with_z([per_token[i] for i in liked], [per_token[i] for i in disliked])
    figures |= {
        "heldout_auc": round(raw_auc, 4),
        "heldout_auc_z": round(raw_z, 3),
        "heldout_auc_per_token": round(norm_auc, 4),
        "reward_margin": round(
            sum(deltas[i] for i in liked) / len(liked) - sum(deltas[i] for i in disliked) / len(disliked), 4
        ),
    }
    reasons = []
    if raw_z < settings.gate_min_z:
        reasons.append(
            f"does not beat the incumbent on held-out feedback "
            f"(AUC {raw_auc:.3f}, z {raw_z:.2f} < {settings.gate_min_z})"
        )
    if norm_auc <= 0.5:
        reasons.append(f"wins by length alone (per-token AUC {norm_auc:.3f} ≤ 0.5)")
    return reasons, figures


def judge_pairs(
    chosen: list[float],
    rejected: list[float],
    chosen_tokens: list[int],
    rejected_tokens: list[int],
    settings: TuningSettings,
) -> tuple[list[str], dict[str, Any]]:
    n = len(chosen)
    figures: dict[str, Any] = {"heldout_pairs": n}
    if n < max(2, settings.gate_min_heldout // 2):
        return [], figures
    wins = sum(c > r for c, r in zip(chosen, rejected, strict=True))
    per_token_wins = sum(
        c / max(ct, 1) > r / max(rt, 1)
        for c, r, ct, rt in zip(chosen, rejected, chosen_tokens, rejected_tokens, strict=True)
    )
    z = _binomial_z(wins, n)
    figures |= {
        "pair_accuracy": round(wins / n, 4),
        "pair_z": round(z, 3),
        "pair_accuracy_per_token": round(per_token_wins / n, 4),
    }
    reasons = []
    if z < settings.gate_min_z:
        reasons.append(f"does not prefer the chosen answers (accuracy {wins / n:.2f}, z {z:.2f})")
    if per_token_wins * 2 <= n:
        reasons.append(f"prefers chosen answers only by length (per-token accuracy {per_token_wins / n:.2f})")
    return reasons, figures


def judge_drift(
    kl: float, candidate_correct: int, incumbent_correct: int, total: int, changed: int, settings: TuningSettings
) -> tuple[list[str], dict[str, Any]]:
    figures = {
        "probe_kl": round(kl, 4),
        "factual_correct": candidate_correct,
        "factual_incumbent_correct": incumbent_correct,
        "factual_total": total,
        "probe_answers_changed": changed,
    }
    reasons = []
    if kl > settings.gate_max_kl:
        reasons.append(f"drifted from the incumbent: KL {kl:.3f} nats/token > budget {settings.gate_max_kl}")
    if total and candidate_correct < min(incumbent_correct, math.ceil(settings.gate_min_factual_accuracy * total)):
        reasons.append(
            f"breaks factual answers: {candidate_correct}/{total} correct (incumbent {incumbent_correct}/{total})"
        )
    return reasons, figures


def judge_non_answers(
    candidate: int, incumbent: int, total: int, settings: TuningSettings
) -> tuple[list[str], dict[str, Any]]:
    figures: dict[str, Any] = {"non_answers": candidate, "non_answers_incumbent": incumbent, "non_answer_probes": total}
    reasons = []
    if candidate - incumbent > settings.gate_max_new_non_answers:
        reasons.append(
            f"stops answering: {candidate}/{total} probe answers deflect or change language "
            f"(incumbent {incumbent}/{total}, at most {settings.gate_max_new_non_answers} more allowed)"
        )
    return reasons, figures


class Contenders:
    """The trained policy plays both parts: adapter "default" is the candidate; the incumbent is the
    parent adapter loaded beside it, or the base model with adapters disabled."""

    def __init__(self, policy: PeftModel, incumbent_dir: Path | None) -> None:
        self.policy = policy
        self.has_incumbent_adapter = incumbent_dir is not None
        if incumbent_dir is not None:
            policy.load_adapter(incumbent_dir, adapter_name=INCUMBENT, is_trainable=False)
        policy.eval()

    @contextmanager
    def candidate(self) -> Iterator[PeftModel]:
        self.policy.set_adapter("default", inference_mode=True)
        yield self.policy

    @contextmanager
    def incumbent(self) -> Iterator[PeftModel]:
        if self.has_incumbent_adapter:
            self.policy.set_adapter(INCUMBENT, inference_mode=True)
            try:
                yield self.policy
            finally:
                self.policy.set_adapter("default", inference_mode=True)
        else:
            with self.policy.disable_adapter():
                yield self.policy


def run_gate(
    contenders: Contenders,
    tokenizer: PreTrainedTokenizerBase,
    heldout_ratings: list[RatedAnswer],
    heldout_pairs: list[ComparedAnswers],
    probes: list[FactualProbe],
    settings: TuningSettings,
    everyday: list[scoring.Messages] | None = None,
    known: KnownAnswers | None = None,
) -> GateReport:
    """`everyday`: the requests that must go on being answered (default: the shipped everyday probes).
    `known`: where greedy probe answers are kept; the incumbent's are then usually there already."""
    tokenizer.padding_side = "left"
    reasons: list[str] = []
    figures: dict[str, Any] = {}

    rows = [(r.prompt, r.answer, r.finished) for r in heldout_ratings]
    pairs = [p for p in heldout_pairs if p.outcome in (ComparisonOutcome.A, ComparisonOutcome.B)]
    for p in pairs:
        chosen, rejected = (p.a, p.b) if p.outcome == ComparisonOutcome.A else (p.b, p.a)
        rows += [(p.prompt, chosen, True), (p.prompt, rejected, True)]
    if rows:
        with contenders.candidate() as model:
            cand = scoring.answer_logprobs(model, tokenizer, rows)
        with contenders.incumbent() as model:
            inc = scoring.answer_logprobs(model, tokenizer, rows)
        deltas = [c.logprob - i.logprob for c, i in zip(cand, inc, strict=True)]
        tokens = [c.tokens for c in cand]
        n = len(heldout_ratings)
        more, figs = judge_thumbs(deltas[:n], tokens[:n], [r.rating > 0 for r in heldout_ratings], settings)
        reasons += more
        figures |= figs
        more, figs = judge_pairs(deltas[n::2], deltas[n + 1 :: 2], tokens[n::2], tokens[n + 1 :: 2], settings)
        reasons += more
        figures |= figs

    prompts = [probe.messages for probe in probes]
    requests = everyday_probes() if everyday is None else everyday
    parameter = next(contenders.policy.parameters())
    conditions = GreedyConditions(
        [render_prompt(tokenizer, p) for p in prompts + requests],
        settings.gate_probe_tokens,
        scoring.GREEDY_BATCH_SIZE,
        parameter.dtype,
        parameter.device,
    )
    incumbent_all = _greedy(contenders.incumbent, tokenizer, prompts + requests, conditions, known, "incumbent")
    candidate_all = _greedy(contenders.candidate, tokenizer, prompts + requests, conditions, known, "candidate")
    incumbent_answers, candidate_answers = incumbent_all[: len(prompts)], candidate_all[: len(prompts)]
    kl = scoring.mean_kl(
        contenders.policy, tokenizer, prompts, incumbent_answers, contenders.incumbent, contenders.candidate
    )

    def correct(answers: list[list[int]]) -> int:
        return sum(
            probe.is_answered_by(tokenizer.decode(a, skip_special_tokens=True))
            for probe, a in zip(probes, answers, strict=True)
        )

    changed = sum(a != b for a, b in zip(incumbent_answers, candidate_answers, strict=True))
    more, figs = judge_drift(kl, correct(candidate_answers), correct(incumbent_answers), len(probes), changed, settings)
    reasons += more
    figures |= figs

    def non_answers(answers: list[list[int]]) -> int:
        return sum(is_non_answer(tokenizer.decode(a, skip_special_tokens=True)) for a in answers)

    more, figs = judge_non_answers(non_answers(candidate_all), non_answers(incumbent_all), len(candidate_all), settings)
    reasons += more
    figures |= figs
    report = GateReport(passed=not reasons, reasons=reasons, figures=figures)
    log.info(
        "gate", passed=report.passed, reasons=reasons, **{k: v for k, v in figures.items() if not isinstance(v, str)}
    )
    return report


def _greedy(
    role: Callable[[], AbstractContextManager[PeftModel]],
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[scoring.Messages],
    conditions: GreedyConditions,
    known: KnownAnswers | None,
    part: Literal["incumbent", "candidate"],
) -> list[list[int]]:
    """One contender's greedy probe answers: kept ones when its weights were asked before, else generated (and kept)."""
    kept = None if known is None else known.store.load(getattr(known, part), conditions)
    if kept is not None:
        log.info("gate reuses kept probe answers", contender=part)
        return kept
    with role() as model:
        answers = scoring.greedy_answers(
            model, tokenizer, prompts, max_new_tokens=conditions.max_new_tokens, batch_size=conditions.batch_size
        )
    if known is not None:
        known.store.save(getattr(known, part), conditions, answers)
    return answers
