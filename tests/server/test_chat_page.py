"""The web chat page at / in a real headless browser (Debian's chromium driven by Playwright):
it loads, a message streams a reply with its tok/s and cached tokens, stop ends a long reply,
the conversation survives a reload (local storage), and it works against a server started
with --api-key. A screenshot is written to artifacts/chat-page.png."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import start_server, stop_server

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    handle = start_server(tmp_path_factory.mktemp("page"), "--api-key", "page-secret")
    yield handle
    stop_server(handle)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_chat_page_streams_stops_and_keeps_conversations(keyed_server):
    sync_api = pytest.importorskip("playwright.sync_api")
    url = keyed_server.url
    assert httpx.get(f"{url}/").status_code == 200  # the page itself needs no key
    assert httpx.get(f"{url}/v1/models").status_code == 401  # the API does
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector("#preset option[value='code']", state="attached")
        # without the key the server refuses, and the page says so
        page.fill("#input", "Hello")
        page.click("#send")
        page.wait_for_function("document.getElementById('error').textContent.length > 0")
        assert "API key" in page.text_content("#error")
        page.fill("#api-key", "page-secret")
        page.dispatch_event("#api-key", "change")
        page.fill("#max_tokens", "24")
        page.fill("#temperature", "0")
        page.fill("#input", "What is the capital of France?")
        page.press("#input", "Enter")
        page.wait_for_function(
            "document.querySelectorAll('.msg.assistant .stats').length >= 1 && "
            "[...document.querySelectorAll('.msg.assistant .stats')].pop().textContent.includes('tok/s')"
        )
        reply = page.locator(".msg.assistant .content").last.text_content()
        stats = page.locator(".msg.assistant .stats").last.text_content()
        assert reply.strip() and "cached" in stats
        # a long reply, stopped early
        page.fill("#max_tokens", "2000")
        page.fill("#input", "Write a very long story about a dragon.")
        page.press("#input", "Enter")
        page.wait_for_function(
            "[...document.querySelectorAll('.msg.assistant .content')].pop().textContent.length > 20"
        )
        page.click("#stop")
        page.wait_for_function(
            "[...document.querySelectorAll('.msg.assistant .stats')].pop().textContent.includes('stopped')"
        )
        assert page.is_enabled("#send")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "chat-page.png"), full_page=True)
        # the conversation is kept in the browser
        page.reload()
        page.wait_for_selector(".msg.user")
        assert page.locator(".msg.user").count() == 3
        assert page.locator(".msg.assistant").count() == 2  # the refused request left no reply
        assert "Hello" in page.text_content("#conversations")  # titled by its first message
        assert "France" in page.text_content("#messages")
        browser.close()
    assert (ARTIFACTS / "chat-page.png").stat().st_size > 1000
