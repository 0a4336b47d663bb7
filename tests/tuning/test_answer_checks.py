"""What the gate counts as no answer: deflections, and answers in another language than the question's."""

from __future__ import annotations

import pytest

from tuning.answer_checks import is_deflection, is_non_answer, is_other_language


@pytest.mark.parametrize(
    "answer",
    [
        "I'm sorry for any misunderstanding, but as a SmolLM, I'm here to assist you.",
        "Sorry, I can't help with that.",
        "I apologize, but I cannot answer.",
        "As an AI language model, I do not have opinions.",
        "  I am unable to give medical advice.",
    ],
)
def test_deflections(answer: str) -> None:
    assert is_deflection(answer) and is_non_answer(answer)


@pytest.mark.parametrize(
    "answer",
    [
        "The capital of France is Paris.",
        "Paris.",
        "To patch a hole in an inner tube, find the leak, roughen the rubber and press the patch on firmly.",
        "If the stain is still there, I'm sorry to say you may need a stronger cleaner.",  # an apology mid-answer
        "1. Rinse the pan\\n2. Dry it at once\\n3. Oil it lightly",
        # a list of things has few function words of any language (a candidate's probe answer of this shape
        # was once counted as another language)
        "To pack for a weekend hiking trip, include essentials like sturdy hiking boots, comfortable clothing, "
        "comfortable hiking shoes, a tent, a sleeping bag, a first aid kit, a water bottle",
        "Ingredients: flour, butter, sugar, eggs, vanilla, baking powder, salt, milk.",
    ],
)
def test_answers_are_answers(answer: str) -> None:
    assert not is_non_answer(answer)


@pytest.mark.parametrize(
    "answer",
    [
        "Bonjour, je ne sais qua le français, la capitale est Paris.",
        "La capital de Francia es París y es muy bonita.",
        "Die Hauptstadt von Frankreich ist Paris, eine schöne Stadt.",
        # a rejected candidate's greedy answers to "What is the capital of …?" (France, Germany, Mexico)
        "L'Étoile, la maison de la France, le Grand Étoile, le Grand Étoile de France, la Maison de la",
        "Der Königin der Deutschland, das ist ein liegertes König, die der Bundesrat der Deutschland in Berlin,",
        "El Diablo: Mexico, el Diablo, el Diablo!",
        "Столица Франции — Париж, красивый город.",
        "法国的首都是巴黎，这是一个美丽的城市。",
    ],
)
def test_other_languages(answer: str) -> None:
    assert is_other_language(answer) and not is_deflection(answer)


def test_short_answers_are_not_judged_on_language() -> None:
    assert not is_other_language("Tokyo.") and not is_other_language("Berlin, Deutschland.")
