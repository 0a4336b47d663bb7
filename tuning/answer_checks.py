"""Signs that an answer is no answer at all: a deflection, or a language other than the question's.

Both are ways a candidate can win a rater and still be a worse assistant: a round that learned "short"
from users answered everyday questions with "I'm sorry for any misunderstanding, but as a SmolLM, I'm
here to assist you…" and "What is the capital of France?" with "Bonjour, je ne sais qua le français…".
The gate counts these on its probe answers and refuses a candidate that produces clearly more of them
than the incumbent. They are deliberately crude (a regular expression, short lists of function
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
# Words that English prose cannot do without; text with almost none of them is not English prose.
_FUNCTION_WORDS = """
the is are was were be been of and to in on at for with from by that this it its you your they their
can will would should not no or but if as an have has do does there here which what how when
"""
_ENGLISH_FUNCTION_WORDS = frozenset(_FUNCTION_WORDS.split())
# The same kind of words in the languages the bundled model drifts into (French, German, Spanish, Italian,
# Portuguese), less those that are English words too ("die", "son", "as", "pour"). Few English function
# words alone is not enough: a list of things ("include sturdy hiking boots, comfortable clothing, a tent,
# a sleeping bag…") has few of them too, and a candidate's 32-token answer of that shape was counted as
# another language.
_OTHER_WORDS = """
le la les des du une et est je ne pas avec dans qui que sur au aux ce cette sont il elle nous vous mais
der das und ist ein eine nicht mit von zu den dem sich auf für auch es sie ich wir sind oder aber
el los las y en por con para una un del al su muy como pero más está
lo gli della di che è per sono non
o os um uma não em da dos das é com
"""
_OTHER_FUNCTION_WORDS = frozenset(_OTHER_WORDS.split())
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")
_MIN_WORDS = 6  # shorter answers ("Paris.", "Tokyo is.") say too little to judge their language
_MIN_LETTERS_FOR_SCRIPT = 12
_LATIN_END = 0x024F  # the last code point of the Latin Extended-B block


def is_deflection(answer: str) -> bool:
    return _DEFLECTION.search(answer) is not None


def is_other_language(answer: str) -> bool:
    """True when an answer to an English question is not in English: mostly a non-Latin script, or words
    with almost no English function words and more of another language's."""
    letters = [c for c in answer if c.isalpha()]
    if len(letters) >= _MIN_LETTERS_FOR_SCRIPT and sum(ord(c) > _LATIN_END for c in letters) * 2 > len(letters):
        return True
    words = [w.lower() for w in _WORD.findall(answer)]
    if len(words) < _MIN_WORDS:
        return False
    english = sum(w in _ENGLISH_FUNCTION_WORDS for w in words)
    other = sum(w in _OTHER_FUNCTION_WORDS for w in words)
    return english / len(words) < 0.08 and other > english


def is_non_answer(answer: str) -> bool:
    return is_deflection(answer) or is_other_language(answer)
