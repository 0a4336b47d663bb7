"""Signs that an answer is no answer at all: a deflection, or a language other than the question's.

Both are ways a candidate can win a rater and still be a worse assistant: a round that learned "short"
from users answered everyday questions with "I'm sorry for any misunderstanding, but as a SmolLM, I'm
here to assist you…" and "What is the capital of France?" with "Bonjour, je ne sais qua le français…".
The gate counts these on its probe answers and refuses a candidate that produces clearly more of them
than the incumbent. They are deliberately crude (a regular expression, a list of English function
words): they only have to tell a changed habit from the incumbent's, on the same prompts.
"""

from __future__ import annotations

import re

# An answer that opens by apologising or talking about the assistant instead of answering.
_DEFLECTION = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry\b|i apologi[sz]e|i (can ?not|can'?t|am unable to|'m unable to|'m not able to)"
    r"|as an? (helpful )?(ai|assistant|chatbot|language model)\b|i'?m (just )?an? (ai|assistant|language model)\b)",
    re.IGNORECASE,
)
# Words that English prose cannot do without; text with almost none of them is not English.
_FUNCTION_WORDS = """
the is are was were be been of and to in on at for with from by that this it its you your they their
can will would should not no or but if as an have has do does there here which what how when
"""
_ENGLISH_FUNCTION_WORDS = frozenset(_FUNCTION_WORDS.split())
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")
_MIN_WORDS = 6  # shorter answers ("Paris.", "Tokyo is.") say too little to judge their language


def is_deflection(answer: str) -> bool:
    return _DEFLECTION.search(answer) is not None


def is_other_language(answer: str) -> bool:
    """True when an answer to an English question is not in English (judged on its words, not its script)."""
    words = [w.lower() for w in _WORD.findall(answer)]
    if len(words) < _MIN_WORDS:
        return False
    english = sum(w in _ENGLISH_FUNCTION_WORDS for w in words)
    return english / len(words) < 0.08


def is_non_answer(answer: str) -> bool:
    return is_deflection(answer) or is_other_language(answer)
