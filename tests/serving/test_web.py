"""The chat page at ``/`` in a real browser: Debian's Chromium, headless, driven by Playwright
against the live server (the embedded model streams real answers).

Chromium comes from the system (``make browser``: ``apt-get install chromium``); Playwright's
own browser download is never used."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from conftest import USER_KEY

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (dev extra)")

CHROMIUM = os.environ.get("DOCENT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ANSWER_TIMEOUT_MS = 120_000  # one generation of at most 48 tokens on 2 CPU cores
QUESTION = "How long is an invitation link to join a workspace valid?"
SCREENSHOT_COPY = Path("/tmp/docent-web.png")

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK), reason=f"{CHROMIUM} is missing: run `make browser`"
)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


class Page:
    """A fresh browser context on the live server's page, recording console errors, uncaught
    exceptions and every host the page tried to reach."""

    def __init__(self, browser, url: str, width: int = 1100) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": 900})
        self.page = self.context.new_page()
        self.page.set_default_timeout(15_000)
        self.console_errors: list[str] = []
        self.page_errors: list[str] = []
        self.hosts: set[str] = set()
        self.page.on(
            "console",
            lambda m: self.console_errors.append(m.text) if m.type == "error" else None,
        )
        self.page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        self.page.on("request", lambda r: self.hosts.add(urlsplit(r.url).netloc or r.url[:5]))
        self.page.goto(url + "/")

    def ask(self, text: str, key: str | None = USER_KEY, mode: str | None = None):
        p = self.page
        if key is not None:
            p.get_by_test_id("api-key").fill(key)
        if mode is not None:
            p.get_by_test_id("mode").select_option(mode)
        before = p.get_by_test_id("answer").count()
        box = p.get_by_test_id("message")
        box.fill(text)
        box.press("Enter")
        answer = p.get_by_test_id("answer").nth(before)
        answer.locator(":scope:not([data-state='streaming'])").wait_for(timeout=ANSWER_TIMEOUT_MS)
        return answer

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def page(browser, live_server):
    pages: list[Page] = []

    def open_page(width: int = 1100) -> Page:
        pages.append(Page(browser, live_server.url, width))
        return pages[-1]

    yield open_page
    for p in pages:
        p.close()


def test_ask_streams_an_answer_with_sources_and_takes_feedback(page, live_server, tmp_path):
    ui = page()
    p = ui.page
    assert p.title() == "Docent"
    p.get_by_test_id("ready").get_by_text("Ready").wait_for()

    answer = ui.ask(QUESTION, mode="ask")
    assert answer.get_attribute("data-state") == "done", answer.inner_text()
    assert int(answer.get_attribute("data-deltas")) >= 1  # the text came as server-sent events
    assert answer.get_attribute("data-answer-id").startswith("ans_")
    assert answer.get_by_test_id("answer-text").inner_text().strip()
    sources = answer.get_by_test_id("source")
    assert sources.count() >= 1
    assert any("getting-started.md" in t for t in sources.all_inner_texts())

    # A retrieved passage opens on click and shows the document's text.
    sources.first.click()
    chunk = answer.get_by_test_id("chunk-view")
    chunk.wait_for()
    assert chunk.get_by_test_id("chunk-text").inner_text().strip()

    # The key was kept for the next visit.
    assert p.evaluate("localStorage.getItem('docent.apiKey')") == USER_KEY

    answer.get_by_test_id("thumbs-up").click()
    status = answer.get_by_test_id("feedback-status")
    status.get_by_text("Thanks").wait_for()
    assert answer.get_by_test_id("thumbs-up").get_attribute("aria-pressed") == "true"

    p.screenshot(path=str(tmp_path / "ask.png"), full_page=True)
    shutil.copyfile(tmp_path / "ask.png", SCREENSHOT_COPY)
    assert not ui.page_errors, ui.page_errors
    assert not ui.console_errors, ui.console_errors
    assert ui.hosts == {urlsplit(live_server.url).netloc}, ui.hosts  # nothing external


def test_support_chat_keeps_one_session_across_turns(page, tmp_path):
    ui = page(width=390)  # a phone's width: the layout must still work
    first = ui.ask("How do I invite a teammate to my workspace?", mode="support")
    assert first.get_attribute("data-state") == "done", first.inner_text()
    session = first.get_attribute("data-session-id")
    assert session
    assert ui.page.get_by_test_id("session-id").inner_text() == session

    second = ui.ask("And how long does that link stay valid?")
    assert second.get_attribute("data-state") == "done", second.inner_text()
    assert second.get_attribute("data-session-id") == session
    assert session in second.get_by_test_id("meta").inner_text()
    assert ui.page.get_by_test_id("turn").count() == 2
    # No horizontal scrolling at a narrow width.
    assert ui.page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    ui.page.screenshot(path=str(tmp_path / "support-chat.png"), full_page=True)

    ui.page.get_by_test_id("new-conversation").click()
    assert ui.page.get_by_test_id("turn").count() == 0
    assert ui.page.get_by_test_id("session-id").get_attribute("data-session-id") == ""
    assert not ui.page_errors, ui.page_errors


def test_wrong_key_shows_the_401_detail(page):
    ui = page()
    answer = ui.ask(QUESTION, key="not-the-right-key", mode="ask")
    assert answer.get_attribute("data-state") == "error"
    assert answer.get_attribute("data-status") == "401"
    error = answer.get_by_test_id("error")
    assert error.is_visible()
    assert "invalid API key" in error.inner_text()
    assert answer.get_by_test_id("feedback").is_hidden()
    assert not ui.page_errors, ui.page_errors


# Rendering, with the server's replies stubbed in the browser: every part of an answer shows,
# and model/document text stays text.
HOSTILE = '<img src=x onerror="window.__pwned=1">'
CHUNK = {
    "chunk_id": "c1",
    "source": "getting-started.md",
    "section": "Inviting your team",
    "page": None,
    "collection": "default",
    "score": 0.5,
    "scores": {"dense": 0.8},
    "text": "Invitation links to a workspace are valid for 72 hours. " + HOSTILE,
}


def sse(*events: tuple[str, dict]) -> str:
    return "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events)


def answer_event(**fields) -> dict:
    body = {
        "id": "ans_test",
        "question": "q",
        "answer": "72 hours. " + HOSTILE,
        "reasoning": "The guide says ##begin_quote##valid for 72 hours##end_quote##.",
        "declined": False,
        "grounded": True,
        "citations": [
            {
                "document": 1,
                "chunk_id": "c1",
                "source": "getting-started.md",
                "section": "Inviting your team",
                "page": None,
                "quote": "valid for 72 hours",
                "score": 0.5,
            }
        ],
        "unsupported_quotes": [],
        "chunks": [CHUNK],
        "model": "/models/smollm2",
        "adapter": None,
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 10, "completion_tokens": 5},
        "timings": {"total_ms": 1200.0},
        "session_id": None,
    }
    return {**body, **fields}


def test_answer_parts_render_as_text(page):
    replies = [
        sse(
            ("retrieval", {"chunks": [CHUNK]}),
            ("delta", {"text": "##begin_"}),  # a quote marker split across deltas
            ("delta", {"text": "quote##valid for 72 hours##end_quote## " + HOSTILE}),
            ("delta", {"text": "\n<ANSWER>: 72 hours."}),
            ("answer", answer_event()),
        ),
        sse(
            ("retrieval", {"chunks": []}),
            ("delta", {"text": "<ANSWER>: I don't know."}),
            ("answer", answer_event(id="ans_2", declined=True, grounded=False, citations=[])),
        ),
        sse(
            ("retrieval", {"chunks": []}),
            ("error", {"detail": "engine fell over", "status": 503}),
        ),
    ]
    feedback: list[dict] = []
    ui = page()
    p = ui.page
    p.route(
        "**/v1/ask",
        lambda route: route.fulfill(
            status=200, content_type="text/event-stream", body=replies.pop(0)
        ),
    )

    def take_feedback(route):
        feedback.append(route.request.post_data_json)
        route.fulfill(status=200, json={"id": 1, "answer_id": "ans_test", "stored": True})

    p.route("**/v1/feedback", take_feedback)

    answer = ui.ask("How long is an invitation valid?", mode="ask")
    assert answer.get_attribute("data-deltas") == "3"
    assert answer.get_by_test_id("answer-text").inner_text() == "72 hours. " + HOSTILE
    assert answer.get_by_test_id("grounded-badge").is_visible()
    reasoning = answer.get_by_test_id("reasoning")
    assert reasoning.get_attribute("open") is None  # collapsed until asked for
    reasoning.locator("summary").click()
    assert reasoning.locator("q").inner_text() == "valid for 72 hours"
    citation = answer.get_by_test_id("citation")
    assert citation.count() == 1
    assert "getting-started.md § Inviting your team" in citation.inner_text()
    citation.get_by_role("button").click()
    assert answer.get_by_test_id("chunk-view").locator("mark").inner_text() == "valid for 72 hours"
    assert HOSTILE in answer.get_by_test_id("chunk-text").inner_text()
    assert "smollm2" in answer.get_by_test_id("meta").inner_text()

    answer.get_by_test_id("thumbs-down").click()
    answer.get_by_test_id("correction").fill("Invitations last 72 hours.")
    answer.get_by_test_id("send-feedback").click()
    answer.get_by_test_id("feedback-status").get_by_text("Thanks").wait_for()
    assert feedback == [
        {"answer_id": "ans_test", "rating": -1, "correction": "Invitations last 72 hours."}
    ]

    declined = ui.ask("What is the meaning of life?")
    assert declined.get_by_test_id("declined-badge").is_visible()
    assert declined.get_by_test_id("citations").locator("li").count() == 0

    failed = ui.ask("And now?")
    assert failed.get_attribute("data-state") == "error"
    assert "engine fell over" in failed.get_by_test_id("error").inner_text()

    assert p.locator("img").count() == 0
    assert p.evaluate("window.__pwned") is None
    assert not ui.page_errors, ui.page_errors
