"""Browser fixtures: Debian's Chromium driven headless by Playwright (never a downloaded browser).

Two environment variables serve `bench/screenshots.py`:
- LORALOOP_TEST_SCREENSHOTS_DIR: the showcase screenshots are also copied there;
- LORALOOP_TEST_WEB_MODEL=bundled: the server runs the real SmolLM2 instead of the tiny random model,
  so the pictures show real answers.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]
VIEWPORT = {"width": 1280, "height": 900}


@pytest.fixture(scope="session")
def web_model_dir(request: pytest.FixtureRequest) -> Path:
    """The base model the browser tests' server runs: the tiny random Llama unless the bundled one is asked for."""
    name = "bundled_model_dir" if os.environ.get("LORALOOP_TEST_WEB_MODEL") == "bundled" else "tiny_model_dir"
    return request.getfixturevalue(name)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # Module scope, not session: Playwright's sync API runs its own event loop, which must be gone before
    # the next module's asyncio tests start theirs.
    if not CHROMIUM.exists():
        pytest.fail("the browser tests need Debian's Chromium at /usr/bin/chromium: apt-get install -y chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser profile (empty localStorage) per test; a JavaScript error anywhere fails the test."""
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(60_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))

    def on_console(message: ConsoleMessage) -> None:
        # Failed fetches are the page's business (it shows them); script errors are ours.
        if message.type == "error" and "Failed to load resource" not in message.text:
            errors.append(message.text)

    page.on("console", on_console)
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"JavaScript errors in the page: {errors}"


@pytest.fixture
def screenshot(page: Page, tmp_path: Path) -> Callable[[str], Path]:
    """Saves a full-page screenshot under the test's tmp dir (and in LORALOOP_TEST_SCREENSHOTS_DIR when set)."""

    def take(name: str) -> Path:
        path = tmp_path / f"{name}.png"
        # The chat page scrolls its conversation inside the window: grow the window so all of it is in the picture.
        hidden = page.evaluate(
            "() => { const list = document.querySelector('.messages');"
            " return list ? list.scrollHeight - list.clientHeight : 0; }"
        )
        size = page.viewport_size or VIEWPORT
        if hidden > 0:
            page.set_viewport_size({"width": size["width"], "height": size["height"] + hidden})
        page.screenshot(path=path, full_page=True)
        page.set_viewport_size(size)
        if target := os.environ.get("LORALOOP_TEST_SCREENSHOTS_DIR"):
            Path(target).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(target) / path.name)
        return path

    return take
