"""The first page and the three LangServe playgrounds, in headless Chromium, as a person uses
them: sign in with the key, type a question, read the answer and its sources."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
from playwright.sync_api import Locator, Page, expect

from tests.browser.conftest import API_KEY, Errors, sign_in
from tests.integration.conftest import QUESTION, SECTION
from tests.llm_server import LLMServer, thinking_enabled

REPLY = "Milvus keeps inserted data in object storage [1]."
# A playground takes new settings (a moment after the last change) by loading its input form
# for them; a question sent before then would go with the settings before the change.
SETTINGS_APPLIED = re.compile(r"/c/[^/]+/input_schema$")
# The text of every text box on the page.
BOX_VALUES = "[...document.querySelectorAll('textarea')].map(box => box.value)"


def streamed_chunks(output: Locator) -> list[Any]:
    """The chunks the RAG playground printed, one JSON object after another."""
    text, chunks, decoder = output.inner_text().strip(), [], json.JSONDecoder()
    while text:
        chunk, end = decoder.raw_decode(text)
        chunks.append(chunk)
        text = text[end:].lstrip()
    return chunks


def test_first_page_asks_for_the_key_then_shows_what_is_ingested(
    page: Page, page_errors: Errors, server: str
) -> None:
    page.goto("/rag/playground/")  # a playground without the key leads to the first page
    expect(page).to_have_url(f"{server}/")
    page.get_by_label("API key").fill("not-the-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("That key is not valid.")
    expect(page.get_by_text("What is ingested")).to_have_count(0)

    sign_in(page)
    details = httpx.get(f"{server}/health/details", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    expect(page.locator("#chunk-count")).to_have_text(str(details["chunks"]))
    expect(page.get_by_text(details["collection_name"], exact=True)).to_be_visible()
    for source in ("operational_faq.md", "performance_faq.md", "product_faq.md", "troubleshooting.md"):
        expect(page.get_by_role("listitem").filter(has_text=source)).to_be_visible()
    links = {
        "Chat playground": "/chat/playground/",
        "RAG playground": "/rag/playground/",
        "Retriever playground": "/retriever/playground/",
        "HTTP API docs": "/docs",
        "OpenAI-compatible API": "/v1/models",
    }
    for name, href in links.items():
        expect(page.get_by_role("link", name=name)).to_have_attribute("href", href)
    assert page_errors == []

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("API key")).to_be_visible()


def test_rag_playground_answers_with_sources_and_applies_its_settings(
    page: Page, page_errors: Errors, llm_server: LLMServer
) -> None:
    llm_server.behaviour.reply = REPLY
    llm_server.behaviour.reasoning = "Passage 1 says where."
    sign_in(page)
    page.get_by_role("link", name="RAG playground").click()
    for setting in ("k", "search", "source", "filter", "Model", "Temperature", "Thinking"):
        expect(page.get_by_label(setting, exact=True)).to_be_visible()

    with page.expect_response(SETTINGS_APPLIED):
        page.get_by_label("k", exact=True).fill("1")
        page.get_by_label("Model", exact=True).select_option("deepseek-v4-pro")
        page.get_by_label("Thinking", exact=True).check()
    page.get_by_label("Question").fill(QUESTION)
    page.get_by_role("button", name="Start").click()
    output = page.locator("h2:text-is('Output') + div")
    expect(output).to_contain_text('"usage"')  # the last chunk
    chunks = streamed_chunks(output)
    (sources,) = [c["sources"] for c in chunks if "sources" in c]
    assert len(sources) == 1 and SECTION in sources[0]["headers"]
    assert "".join(c.get("answer", "") for c in chunks) == REPLY
    assert "".join(c.get("reasoning", "") for c in chunks) == "Passage 1 says where."
    body = llm_server.requests[-1]["body"]
    assert body["model"] == "deepseek-v4-pro" and thinking_enabled(body)

    # One wait per change: a wait around all four could end at the first change's schema
    # and start the run before the source filter applied (seen once in a full run).
    for change in (
        lambda: page.get_by_label("k", exact=True).fill("2"),
        lambda: page.get_by_label("source", exact=True).fill("troubleshooting.md"),
        lambda: page.get_by_label("Thinking", exact=True).uncheck(),
        lambda: page.get_by_label("Temperature", exact=True).fill("0.7"),
    ):
        with page.expect_response(SETTINGS_APPLIED):
            change()
    page.get_by_role("button", name="Start").click()
    expect(output).not_to_contain_text('"reasoning"')
    expect(output).to_contain_text('"usage"')
    sources = [c["sources"] for c in streamed_chunks(output) if "sources" in c][0]
    assert [s["source"] for s in sources] == ["troubleshooting.md"] * 2
    body = llm_server.requests[-1]["body"]
    assert body["temperature"] == 0.7 and not thinking_enabled(body)
    assert page_errors == []


def test_chat_playground_answers_with_sources(page: Page, page_errors: Errors, llm_server: LLMServer) -> None:
    llm_server.behaviour.reply = REPLY
    sign_in(page)
    page.get_by_role("link", name="Chat playground").click()
    page.get_by_placeholder("Send a message...").fill(QUESTION)
    page.keyboard.press("Enter")
    # Each message of the conversation is an editable text box; the sources end the answer.
    page.wait_for_function(f"() => {BOX_VALUES}.some(text => text.includes('Sources:'))")
    messages = page.evaluate(f"() => {BOX_VALUES}")
    assert QUESTION in messages
    (answer,) = [m for m in messages if m.startswith(REPLY)]
    assert answer.startswith(f"{REPLY}\n\nSources:\n[1] product_faq.md — Product FAQ > {SECTION}\n")
    assert llm_server.requests[-1]["body"]["messages"][-1]["content"].endswith(QUESTION)
    assert page_errors == []


def test_retriever_playground_finds_the_passages(page: Page, page_errors: Errors) -> None:
    sign_in(page)
    page.get_by_role("link", name="Retriever playground").click()
    with page.expect_response(SETTINGS_APPLIED):
        page.get_by_label("k", exact=True).fill("2")
    page.get_by_label("MilvusRetrieverInput").fill(QUESTION)
    page.get_by_role("button", name="Start").click()
    output = page.locator("h2:text-is('Output') + div")
    expect(output).to_contain_text(SECTION)
    (documents,) = streamed_chunks(output)
    assert len(documents) == 2 and SECTION in documents[0]["metadata"]["headers"]
    assert page_errors == []
