"""Headless Chromium (Debian's, which `make test` installs) driven by Playwright, against one
real uvicorn server for the module: the FAQ ingested, DeepSeek played by tests/llm_server.py,
and API keys set, so every page is reached the way a person with a key reaches it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright
from pydantic import SecretStr

from chains.llm import make_llm
from server import create_app
from settings import Settings
from tests.integration.conftest import faq_db, faq_service, serve_in_thread, with_llm  # noqa: F401
from tests.llm_server import LLMServer

REPO = Path(__file__).resolve().parents[2]
# Playwright's own browser download needs the internet; the system's Chromium does not.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-dev-shm-usage",
    # The network is closed: nothing may try to reach Google's services.
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = REPO / "build" / "screenshots"
API_KEY = "browser-test-key"


@pytest.fixture(scope="module")
def server(faq_db: Settings, embeddings: Any, _llm_server: LLMServer) -> Iterator[str]:  # noqa: F811
    """The base URL of the app, served by uvicorn on a free port."""
    settings = with_llm(faq_db, _llm_server).model_copy(update={"api_keys": SecretStr(API_KEY)})
    app = create_app(service=faq_service(settings, embeddings, llm=make_llm(settings)))
    with serve_in_thread(app) as url:
        yield url


# Module scope: Playwright's sync API keeps an event loop running in this thread while it is
# open, and the async tests of the other modules need the thread without one.
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM.is_file(), f"no Chromium at {CHROMIUM}: `make test` installs it (Debian's chromium)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Errors(list[str]):
    """Uncaught exceptions and console errors of a page, in the order they came."""

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.append(f"console error: {message.text} ({message.location.get('url', '')})")

    def on_page_error(self, error: Exception) -> None:
        self.append(f"uncaught exception: {error}")


@pytest.fixture
def page_errors() -> Errors:
    return Errors()


@pytest.fixture
def page(browser: Browser, server: str, page_errors: Errors) -> Iterator[Page]:
    """A fresh browser profile on the server; a failing test leaves a screenshot of it."""
    context = browser.new_context(base_url=server, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    page = context.new_page()
    page.on("console", page_errors.on_console)
    page.on("pageerror", page_errors.on_page_error)
    yield page
    context.close()


def sign_in(page: Page, key: str = API_KEY) -> None:
    """Sign in on the first page, as a person with the key does."""
    page.goto("/")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="What is ingested")).to_be_visible()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failing browser test saves a screenshot of its page; the report says where, and
    lists the page's errors (a form that never appeared is often a script that failed)."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    page = getattr(item, "funcargs", {}).get("page")
    if report.when != "call" or not report.failed or page is None:
        return
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{item.name}.png".replace("/", "_")
    try:
        page.screenshot(path=str(path), full_page=True)
        note = f"screenshot of the page: {path}"
    except Exception as exc:  # the page may be gone; the failure itself still counts
        note = f"no screenshot ({exc})"
    errors = getattr(item, "funcargs", {}).get("page_errors")
    if errors:
        note += "\nerrors on the page:\n" + "\n".join(errors)
    report.sections.append(("browser", note))  # printed under the failure's traceback
