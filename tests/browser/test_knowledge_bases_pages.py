"""The first page and a playground with knowledge bases, in headless Chromium: a person with a
key limited to one knowledge base signs in, sees that one only, and asks it a question."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Page, expect
from pydantic import SecretStr

from chains.llm import make_llm
from server import create_app
from service import open_service
from settings import Settings
from store.indexing import ingest
from tests.browser.conftest import API_KEY, Errors, sign_in
from tests.browser.test_pages import BOX_VALUES, REPLY
from tests.integration.conftest import faq_db, serve_in_thread, with_llm  # noqa: F401
from tests.llm_server import LLMServer

HR_KEY = "hr-reader-key"
QUESTION = "How many days of paid leave does an employee get?"


@pytest.fixture(scope="module")
def server(
    faq_db: Settings,  # noqa: F811
    embeddings: Any,
    _llm_server: LLMServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """The FAQ in the default knowledge base, a leave policy in hr, eng empty; the key of
    RAG_API_KEYS sees all three, HR_KEY reads hr only."""
    folder = tmp_path_factory.mktemp("kb-pages")
    keys = folder / "keys.toml"
    digest = hashlib.sha256(HR_KEY.encode()).hexdigest()
    keys.write_text(f'[[keys]]\nname = "hr-reader"\nsha256 = "{digest}"\nkbs = ["hr"]\nrole = "read"\n')
    settings = with_llm(faq_db, _llm_server).model_copy(
        update={"api_keys": SecretStr(API_KEY), "knowledge_bases": "hr,eng", "keys_file": str(keys)}
    )
    (folder / "docs").mkdir()
    (folder / "docs" / "leave.md").write_text(
        "# Leave\n\n## Paid leave\n\nEach employee gets 30 days of paid leave a year.\n"
    )
    hr = open_service(settings.for_knowledge_base("hr"), llm=None, embeddings=embeddings)
    ingest([str(folder / "docs")], hr.get_store(), hr.chunker(), progress=False)
    hr.close()
    app = create_app(service=open_service(settings, llm=make_llm(settings), embeddings=embeddings))
    with serve_in_thread(app) as url:
        yield url


def test_a_scoped_key_sees_its_knowledge_base_and_asks_it_in_the_chat_playground(
    page: Page, page_errors: Errors, llm_server: LLMServer
) -> None:
    llm_server.behaviour.reply = REPLY
    sign_in(page, HR_KEY)
    expect(page.get_by_role("heading", name="What is ingested hr")).to_be_visible()
    expect(page.get_by_role("listitem").filter(has_text="leave.md")).to_be_visible()
    expect(page.locator("li[data-kb]")).to_have_count(1)
    expect(page.locator("li[data-kb='hr']")).to_contain_text("_hr, 1 chunks")  # its collection
    expect(page.get_by_text("operational_faq.md")).to_have_count(0)  # the default knowledge base's
    expect(page.get_by_role("link", name="Health")).to_have_count(0)  # the operator's
    expect(page.get_by_role("link", name="OpenAI-compatible API")).to_have_attribute(
        "href", "/kb/hr/v1/models"
    )

    page.get_by_role("link", name="Chat playground").click()
    expect(page).to_have_url(re.compile(r"/kb/hr/chat/playground/$"))
    page.get_by_placeholder("Send a message...").fill(QUESTION)
    page.keyboard.press("Enter")
    page.wait_for_function(f"() => {BOX_VALUES}.some(text => text.includes('Sources:'))")
    (answer,) = [m for m in page.evaluate(f"() => {BOX_VALUES}") if m.startswith(REPLY)]
    assert answer == f"{REPLY}\n\nSources:\n[1] leave.md — Leave > Paid leave"
    assert "30 days of paid leave" in str(llm_server.requests[-1]["body"]["messages"])
    assert page_errors == []

    # Another knowledge base's playground, typed in the address bar: not found.
    response = page.goto("/kb/eng/chat/playground/")
    assert response is not None and response.status == 404
    assert page.locator("body").inner_text().strip() == '{"detail":"no knowledge base \'eng\'"}'


def test_the_operators_key_sees_every_knowledge_base(page: Page, page_errors: Errors) -> None:
    sign_in(page)
    expect(page.get_by_role("heading", name="What is ingested default")).to_be_visible()
    expect(page.locator("li[data-kb]")).to_have_count(3)
    expect(page.locator("li[data-kb='eng']")).to_contain_text("empty")
    expect(page.locator("li[data-kb='hr'] a", has_text="chat")).to_have_attribute(
        "href", "/kb/hr/chat/playground/"
    )
    expect(page.get_by_role("link", name="Chat playground")).to_have_attribute("href", "/chat/playground/")
    assert page_errors == []
