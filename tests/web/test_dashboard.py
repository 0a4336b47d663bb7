"""The dashboard in a real browser after two real tuning rounds: versions table, lineage, up-rate
chart, runs; promote and roll back through the page; and what it says without an admin key."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, Route, expect

from feedback.db import make_sync_engine, session_scope
from feedback.models import Adapter, AdapterVersion
from tests.web.server import RunningServer, running_server
from tuning.round import run_round
from tuning.settings import TuningSettings

# canary_share=0: a version that passes the gate is promoted at once, so the second round trains on the first.
# A gentle learning rate: with the bundled model (bench/screenshots.py) a harsher one fails the gate's factual probes.
FAST = TuningSettings(
    max_steps=2, batch_size=4, learning_rate=1e-4, precision="fp32", max_length=128, canary_share=0, gate_probe_tokens=8
)
QUESTIONS = [
    "What is the capital of France?",
    "Give me a tip for sleeping better.",
    "How do I boil an egg?",
    "Why is the sky blue?",
    "What do bees make?",
    "Name a primary colour.",
]


def chat_and_rate(server: RunningServer, *, up: int, down: int) -> str:
    """Asks `default` up + down questions and rates the answers; returns the version that answered."""
    served = ""
    with httpx.Client(base_url=server.url, timeout=120) as client:
        for i in range(up + down):
            question = QUESTIONS[i % len(QUESTIONS)]
            reply = client.post(
                "/v1/chat/completions",
                json={"model": "default", "messages": [{"role": "user", "content": question}], "max_tokens": 16},
            )
            reply.raise_for_status()
            served = reply.json()["system_fingerprint"]
            rating = 1 if i < up else -1
            client.post("/v1/feedback", json={"completion_id": reply.json()["id"], "rating": rating}).raise_for_status()
    return served


def tune_and_wait(server: RunningServer, expected: str) -> None:
    """One real tuning round on the server's database; then waits until the server answers with its version."""
    outcome = run_round(server.settings(), FAST, alias="default", trigger="manual")
    assert outcome.status in ("promoted", "succeeded") and outcome.version == expected, outcome.summary()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        models = httpx.get(f"{server.url}/v1/models").json()["data"]
        if any(m["id"] == "default" and m["root"] == expected for m in models):
            return
        time.sleep(0.3)
    pytest.fail(f"the server did not swap to {expected}")


@pytest.fixture(scope="module")
def looped_server(tmp_path_factory: pytest.TempPathFactory, web_model_dir: Path) -> Iterator[RunningServer]:
    """A server whose `default` went through two rounds: base → default@1 → default@2, rated on each."""
    with running_server(tmp_path_factory.mktemp("dashboard-server"), web_model_dir) as server:
        assert chat_and_rate(server, up=3, down=5) == server.base_label()
        tune_and_wait(server, "default@1")
        assert chat_and_rate(server, up=5, down=3) == "default@1"
        tune_and_wait(server, "default@2")
        assert chat_and_rate(server, up=3, down=1) == "default@2"
        yield server


def active_version(server: RunningServer) -> str | None:
    engine = make_sync_engine(server.database_url)
    try:
        with session_scope(engine) as session:
            active_id = session.get(Adapter, "default").active_version_id
            return session.get(AdapterVersion, active_id).label if active_id else None
    finally:
        engine.dispose()


def test_dashboard_after_two_rounds(
    page: Page, looped_server: RunningServer, screenshot: Callable[[str], Path]
) -> None:
    page.goto(f"{looped_server.url}/dashboard")
    section = page.locator("section.alias[data-alias='default']")
    versions = section.get_by_role("table", name="Versions of default")
    expect(versions.locator("tbody tr")).to_have_count(3)  # default@2, default@1 and the base model
    expect(versions.locator("tr[data-label='default@2'] .status-cell .badge")).to_have_text("active")
    expect(versions.locator("tr[data-label='default@1'] .status-cell .badge")).to_have_text("retired")
    expect(versions.locator("tr[data-label='default@2']")).to_contain_text("default@1")  # its parent
    expect(versions.locator("tr[data-label='default@2']")).to_contain_text("3 up · 1 down")
    expect(versions.locator("tr[data-label='default@1']")).to_contain_text("5 up · 3 down")
    expect(versions.locator("tr[data-label='default@2']")).to_contain_text("kto.steps")  # training figures
    expect(section.locator(".lineage .badge")).to_have_text([looped_server.base_label(), "default@1", "default@2"])

    chart = section.locator("figure.chart svg")
    expect(chart).to_be_visible()
    for label in (looped_server.base_label(), "default@1", "default@2"):
        expect(chart.locator(f"g.series[data-label='{label}'] circle").first).to_be_visible()
    expect(section.locator(".legend li[data-label='default@1']")).to_contain_text("5 up · 3 down")

    runs = page.get_by_role("table", name="Tuning runs")
    expect(runs.locator("tbody tr")).to_have_count(2)
    expect(runs.locator("tbody tr .badge")).to_have_text(["succeeded", "succeeded"])
    expect(runs.locator("tbody tr").first).to_contain_text("default@2")
    screenshot("dashboard-after-two-rounds")


def test_rollback_and_promote_from_the_page(page: Page, looped_server: RunningServer) -> None:
    page.goto(f"{looped_server.url}/dashboard")
    section = page.locator("section.alias[data-alias='default']")
    section.get_by_role("button", name="Roll back default").click()
    page.get_by_role("dialog").get_by_role("button", name="Roll back").click()
    expect(page.get_by_role("status").filter(has_text="rolled back")).to_contain_text("default@1")
    assert active_version(looped_server) == "default@1"
    expect(section.locator("tr[data-label='default@1'] .status-cell .badge")).to_have_text("active")

    section.get_by_role("button", name="Promote default@2").click()
    page.get_by_role("dialog").get_by_role("button", name="Cancel").click()
    assert active_version(looped_server) == "default@1"  # cancelled: nothing changed

    section.get_by_role("button", name="Promote default@2").click()
    page.get_by_role("dialog").get_by_role("button", name="Promote default@2").click()
    expect(page.get_by_role("status").filter(has_text="is now the active")).to_contain_text("default@2")
    assert active_version(looped_server) == "default@2"


@pytest.mark.parametrize(
    ("status", "says"), [(401, "needs an admin API key"), (403, "not an admin key")], ids=["no-key", "user-key"]
)
def test_without_an_admin_key_the_page_says_so(
    page: Page, looped_server: RunningServer, status: int, says: str
) -> None:
    # Stands in for a server with API keys: the admin API refuses, as it will for a missing or a user key.
    def refuse(route: Route) -> None:
        error = {"message": "this route needs an admin key", "type": "invalid_request_error", "param": None}
        route.fulfill(
            status=status, content_type="application/json", body=json.dumps({"error": error | {"code": None}})
        )

    page.route("**/v1/admin/**", refuse)
    page.goto(f"{looped_server.url}/dashboard")
    expect(page.get_by_role("alert")).to_contain_text(says)
    expect(page.locator("#content")).to_be_hidden()
