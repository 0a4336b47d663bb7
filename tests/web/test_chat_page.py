"""The chat page in a real browser against a real server: a streamed answer, thumbs with reasons,
retracting, and the side-by-side comparison, each checked where it must land: in the database."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Locator, Page, expect
from sqlalchemy import select

from feedback.db import make_sync_engine, session_scope
from feedback.models import Comparison, Completion, Feedback
from tests.web.server import RunningServer, running_server

PROMPT = "Explain in one sentence why the sky is blue."


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, web_model_dir: Path) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("chat-server"), web_model_dir, max_tokens=48) as running:
        yield running


def open_chat(page: Page, server: RunningServer) -> None:
    page.goto(server.url)
    expect(page.get_by_label("Model")).to_have_value("default")  # the picker is filled from /v1/models


def ask(page: Page, text: str) -> Locator:
    """Types a message, sends it with Enter, and returns the answer once its stream has ended."""
    page.get_by_label("Message").fill(text)
    page.get_by_label("Message").press("Enter")
    answer = page.locator("li.turn").last.get_by_role("article").first
    expect(answer).to_have_attribute("data-state", "done")
    return answer


def stored(server: RunningServer, model: type, **where: object) -> list:
    engine = make_sync_engine(server.database_url)
    try:
        with session_scope(engine) as session:
            rows = session.scalars(select(model).filter_by(**where)).all()
            session.expunge_all()
            return list(rows)
    finally:
        engine.dispose()


def test_streamed_answer_rated_down_with_a_reason(
    page: Page, server: RunningServer, screenshot: Callable[[str], Path]
) -> None:
    open_chat(page, server)
    answer = ask(page, PROMPT)
    completion_id = answer.get_attribute("data-completion-id")
    # The answer arrived piece by piece over SSE, and the page names the version that wrote it.
    assert int(answer.get_attribute("data-chunks") or 0) > 1
    version = answer.locator(".version").inner_text()
    [completion] = stored(server, Completion, id=completion_id)
    assert answer.locator(".answer-text").text_content() == completion.answer
    assert version == completion.served_by

    thumbs_down = answer.get_by_role("button", name="Bad answer")
    thumbs_down.click()
    expect(thumbs_down).to_have_attribute("aria-pressed", "true")
    answer.get_by_role("button", name="Too verbose").click()
    answer.get_by_label("Comment (optional)").fill("One sentence was asked for.")
    answer.get_by_role("button", name="Save feedback").click()
    expect(answer.locator(".feedback-note")).to_have_text("Feedback saved")
    screenshot("chat-rated-exchange")

    [row] = stored(server, Feedback, completion_id=completion_id)
    assert (row.rating, row.reasons, row.comment, row.status) == (
        -1,
        ["too_verbose"],
        "One sentence was asked for.",
        "active",
    )


def test_thumbs_up_by_keyboard_then_retracted(page: Page, server: RunningServer) -> None:
    open_chat(page, server)
    answer = ask(page, "Name a primary colour.")
    completion_id = answer.get_attribute("data-completion-id")
    thumbs_up = answer.get_by_role("button", name="Good answer")

    thumbs_up.focus()
    page.keyboard.press("Enter")
    expect(answer.locator(".feedback-note")).to_have_text("Rating saved")
    [row] = stored(server, Feedback, completion_id=completion_id)
    assert (row.rating, row.status) == (1, "active")

    thumbs_up.press(" ")  # pressing the lit thumb again takes the rating back
    expect(answer.locator(".feedback-note")).to_have_text("Rating retracted")
    expect(thumbs_up).to_have_attribute("aria-pressed", "false")
    [row] = stored(server, Feedback, completion_id=completion_id)
    assert (row.rating, row.status) == (0, "retracted")


def test_regenerate_side_by_side_and_pick_the_better(
    page: Page, server: RunningServer, screenshot: Callable[[str], Path]
) -> None:
    open_chat(page, server)
    first = ask(page, "Suggest a name for a cat.")
    turn = page.locator("li.turn").last
    turn.get_by_role("button", name="Regenerate").click()
    second = turn.get_by_role("article", name="Answer B")
    expect(second).to_have_attribute("data-state", "done")
    expect(turn.get_by_role("article", name="Answer A")).to_be_visible()

    turn.get_by_role("button", name="B is better").click()
    expect(turn).to_have_attribute("data-comparison", "b")
    screenshot("chat-comparison")

    a_id, b_id = first.get_attribute("data-completion-id"), second.get_attribute("data-completion-id")
    [comparison] = stored(server, Comparison, completion_a_id=a_id)
    assert (comparison.completion_b_id, comparison.outcome) == (b_id, "b")
    [a], [b] = stored(server, Completion, id=a_id), stored(server, Completion, id=b_id)
    assert a.prompt_messages == b.prompt_messages == [{"role": "user", "content": "Suggest a name for a cat."}]

    # The conversation goes on from the preferred answer.
    follow_up = ask(page, "Why that one?")
    [next_completion] = stored(server, Completion, id=follow_up.get_attribute("data-completion-id"))
    assert next_completion.prompt_messages[1] == {"role": "assistant", "content": b.answer}


def test_the_api_key_is_kept_and_sent(page: Page, server: RunningServer) -> None:
    open_chat(page, server)
    page.get_by_text("Settings").click()
    page.get_by_label("API key").fill("sk-browser-test")
    page.get_by_role("button", name="Save key").click()
    with page.expect_request("**/v1/models") as request:
        page.reload()
    assert request.value.headers["authorization"] == "Bearer sk-browser-test"


def test_pages_and_scripts_come_from_the_app_alone(server: RunningServer) -> None:
    for path in ("/", "/dashboard", "/static/chat.js", "/static/dashboard.js", "/static/style.css"):
        response = httpx.get(f"{server.url}{path}")
        assert response.status_code == 200, path
        assert "no-cache" in response.headers["cache-control"]  # an upgraded server never runs stale scripts
    assert "javascript" in httpx.get(f"{server.url}/static/api.js").headers["content-type"]  # ES modules need it
    # Nothing is fetched from elsewhere: the machines these run on may have no internet at all.
    web = Path(__file__).resolve().parents[2] / "serving" / "web"
    for file in web.iterdir():
        urls = re.findall(r"https?://[^\s\"'`)]+", file.read_text())
        assert set(urls) <= {"http://www.w3.org/2000/svg"}, (file.name, urls)
