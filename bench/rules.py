"""Simulated users' preferences for `bench/adaptation.py`: callables from (answer, prompt) to liked or not.

Pass any other `package.module:function` with the same signature to `--rule`; the benchmark adds the
label noise itself, so a rule states the preference cleanly.
"""

from __future__ import annotations

import re

_LIST_LINE = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+", re.MULTILINE)


def concise_answers(answer: str, prompt: str) -> bool:
    """Prefers answers under 100 words: the benchmark's default. With answers capped at 128 tokens (and a cut
    answer a thumbs-down), about 19 % of the bundled model's answers at temperature 1.0 are liked."""
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
