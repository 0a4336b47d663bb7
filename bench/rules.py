"""Simulated users' preferences for `bench/adaptation.py`: callables from (answer, prompt) to liked or not.

Pass any other `package.module:function` with the same signature to `--rule`; the benchmark adds the
label noise itself, so a rule states the preference cleanly.
"""

from __future__ import annotations

import re

_LIST_LINE = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+", re.MULTILINE)


# Words too common to show that an answer is about the question.
_COMMON_WORDS = """
about after also because been before best both could does doing down each from good have help here
into just keep know like make more most much need only other over same should some such tell than
that their them then there these they this those through time under very want were what when where
which while will with without would your
"""
_COMMON = frozenset(_COMMON_WORDS.split())
_WORD = re.compile(r"[a-z]{4,}")
# What a user asking a question does not count as an answer: the assistant talking about itself instead.
_DEFLECTION = re.compile(
    r"\b(smollm|hugging face|as an? (ai|chatbot|language model)|i'?m an ai|i am an ai|i'?m sorry|i am sorry"
    r"|i apologi[sz]e|i'?m (here|designed) to|i am (here|designed) to)\b",
    re.IGNORECASE,
)


def _on_topic(answer: str, prompt: str) -> bool:
    """The answer names something the question asked about (words compared on their first five letters)."""
    asked = {w[:5] for w in _WORD.findall(prompt.lower()) if w not in _COMMON}
    return not asked or bool(asked & {w[:5] for w in _WORD.findall(answer.lower())})


def concise_answers(answer: str, prompt: str) -> bool:
    """Prefers short answers that still answer: under 100 words, naming something the question asked
    about, and not a deflection ("I'm sorry…", "as an AI…"). The benchmark's default. With answers capped
    at 128 tokens (and a cut answer a thumbs-down), about 16 % of the bundled model's answers at
    temperature 1.0 are liked. (Under 100 words alone, a round learned deflections: "I'm sorry for any
    misunderstanding, but as a SmolLM, I'm here to assist you…".)"""
    return len(answer.split()) < 100 and _DEFLECTION.search(answer) is None and _on_topic(answer, prompt)


def under_100_words(answer: str, prompt: str) -> bool:
    """Prefers answers under 100 words, and nothing else: the rule a round won by deflecting ("I'm sorry for
    any misunderstanding, but as a SmolLM, I'm here to assist you…"), kept to show that the gate's
    non-answer check refuses such a candidate."""
    return len(answer.split()) < 100


def short_answers(answer: str, prompt: str) -> bool:
    """Prefers answers under 40 words (the bundled model's median is about 100): the hard case, about 3 % of
    its answers are liked, so most thumbs-up under 10 % noise are flips."""
    return len(answer.split()) < 40


def no_lists(answer: str, prompt: str) -> bool:
    """Prefers flowing prose: no bulleted or numbered list lines."""
    return _LIST_LINE.search(answer) is None


def no_markdown_bold(answer: str, prompt: str) -> bool:
    """Prefers plain text without **bold** markup."""
    return "**" not in answer
