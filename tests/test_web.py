"""The chat page in a real browser: Debian's Chromium driven by Playwright, against the real Serve app."""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import MODEL_ID, REPO_ROOT, TEST_KEY

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic"]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(f"{server}/")
    yield page
    context.close()


def _unfinished(engine_handle) -> int:
    """Playwright's sync API runs an event loop in this thread; Serve's blocking calls must run in another."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: engine_handle.num_unfinished_requests.remote().result()).result()


def _use_key(page, key: str) -> None:
    if not page.locator("#key-box").is_visible():
        page.click("#change-key")
    page.fill("#api-key", key)
    page.click("#save-key")


def _ask(page, text: str) -> None:
    page.fill("#input", text)
    page.click("#send")


def test_page_streams_stops_clears_and_shows_errors(page, server, engine_handle):
    # The server wants a key: the page says so, asks for one, and keeps it in the tab.
    page.wait_for_selector(".message.error")
    assert "401" in page.locator(".message.error").first.inner_text()
    _use_key(page, TEST_KEY)
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    page.click("#clear")
    assert page.locator(".message").count() == 0

    options = page.locator("#model option").all_inner_texts()
    assert any(MODEL_ID in o and "local engine" in o for o in options)
    assert any("remote: fast" in o for o in options) and any("alias of" in o for o in options)
    page.select_option("#model", MODEL_ID)
    assert "local engine" in page.inner_text("#model-info")

    # A streamed answer arrives and finishes with usage, TTFT and speed.
    page.fill("#temperature", "0")
    _ask(page, "What is the capital of France?")
    page.wait_for_function("document.querySelector('.message.assistant .stats')?.textContent.includes('tokens')")
    answer = page.locator(".message.assistant .content").last.inner_text()
    assert "Paris" in answer
    stats = page.locator(".message.assistant .stats").last.inner_text()
    assert "via local" in stats and "TTFT" in stats
    if os.environ.get("TUNESERVE_SCREENSHOT"):
        page.screenshot(path=str(REPO_ROOT / "docs" / "chat.png"))

    # Stop mid-answer: the page marks it stopped and the server aborts the generation.
    page.evaluate("document.getElementById('max-tokens').max = 900; document.getElementById('max-tokens').value = 900")
    _ask(page, "Write a very long story about a dragon who learns to cook.")
    page.wait_for_function("document.querySelectorAll('.message.assistant').length >= 2 && "
                           "[...document.querySelectorAll('.message.assistant .content')].pop().textContent.length > 20")
    page.click("#stop")
    page.wait_for_function("[...document.querySelectorAll('.message.assistant .stats')].pop().textContent.startsWith('stopped')")
    deadline = time.monotonic() + 20
    while _unfinished(engine_handle) > 0:
        assert time.monotonic() < deadline, "the server kept generating after Stop"
        time.sleep(0.25)

    # Clear history, then a wrong key shows a readable error in the chat.
    page.click("#clear")
    assert page.locator(".message").count() == 0
    page.evaluate("sessionStorage.setItem('tuneserve-api-key', 'sk-wrong')")
    _ask(page, "Hello?")
    page.wait_for_selector(".message.error")
    assert "Incorrect API key" in page.locator(".message.error").last.inner_text()


def test_model_output_cannot_inject_html(page):
    """The renderer escapes before it formats: markup in an answer shows as text."""
    html = page.evaluate("renderMarkdown('<img src=x onerror=alert(1)> **bold** `code`\\n```js\\n<b>x</b>\\n```')")
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<strong>bold</strong>" in html and "<code>code</code>" in html
    assert "<pre><code>&lt;b&gt;x&lt;/b&gt;\n</code></pre>" in html
