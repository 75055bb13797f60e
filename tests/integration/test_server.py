"""The LangServe app through ASGI, through a real uvicorn, and through RemoteRunnable."""

from __future__ import annotations

import gc
import html
import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from langserve import RemoteRunnable
from pydantic import SecretStr

from chains.llm import make_llm
from pages import KEY_COOKIE
from server import create_app
from settings import Settings
from tests.integration.conftest import QUESTION, SECTION, asgi_client, faq_service, serve_in_thread, with_llm
from tests.llm_server import LLMServer

pytestmark = pytest.mark.integration

FORM = {"content-type": "application/x-www-form-urlencoded"}


async def test_invoke_answers_with_sources(faq_db: Settings, embeddings: Any, llm_server: LLMServer) -> None:
    async with asgi_client(with_llm(faq_db, llm_server), embeddings) as client:
        response = await client.post("/rag/invoke", json={"input": {"question": QUESTION}})
    assert response.status_code == 200, response.text
    output = response.json()["output"]
    assert output["answer"] == llm_server.behaviour.reply
    assert SECTION in output["sources"][0]["headers"]
    assert set(output["sources"][0]) == {"n", "source", "headers", "page", "last_page", "text", "score"}


async def test_stream_sends_sources_then_tokens(
    faq_db: Settings, embeddings: Any, llm_server: LLMServer
) -> None:
    async with asgi_client(with_llm(faq_db, llm_server), embeddings) as client:
        response = await client.post("/rag/stream", json={"input": {"question": QUESTION}})
    assert response.status_code == 200
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
    data = [e for e in events if isinstance(e, dict) and ("answer" in e or "sources" in e)]
    assert "sources" in data[0]
    assert "".join(e.get("answer", "") for e in data) == llm_server.behaviour.reply
    assert sum(1 for e in data if e.get("answer")) > 3


@pytest.mark.parametrize(
    "payload",
    [
        {"input": {}},
        {"input": {"question": ""}},
        {"input": {"question": 42}},
        {"input": {"question": "x" * 5000}},
    ],
)
async def test_invalid_input_is_422_with_a_reason(faq_db: Settings, embeddings: Any, payload: dict) -> None:
    async with asgi_client(faq_db, embeddings, llm=None) as client:
        response = await client.post("/rag/invoke", json=payload)
    assert response.status_code == 422
    assert response.json()["detail"]


async def test_health_and_retriever(faq_db: Settings, embeddings: Any) -> None:
    async with asgi_client(faq_db, embeddings, llm=None) as client:
        health = (await client.get("/health")).json()
        details = (await client.get("/health/details")).json()
        retrieved = await client.post("/retriever/invoke", json={"input": QUESTION})
        frozen_while_serving = gc.get_freeze_count()
    # The start-up heap is kept out of the collector's scans while serving, and only then.
    assert frozen_while_serving > 10_000 and gc.get_freeze_count() == 0
    assert health["status"] == "ok" and health["milvus"] and health["collection"] and health["chunks"] > 60
    # Without API keys, /health says all that /health/details says.
    assert health == details and health["milvus_uri"] == faq_db.milvus_uri
    assert SECTION in retrieved.json()["output"][0]["metadata"]["headers"]


async def test_without_a_key_the_answer_shows_the_passages(faq_db: Settings, embeddings: Any) -> None:
    async with asgi_client(faq_db, embeddings, llm=None) as client:
        output = (await client.post("/rag/invoke", json={"input": {"question": QUESTION}})).json()["output"]
        chat = (await client.post("/chat/invoke", json={"input": {"question": QUESTION}})).json()["output"]
    assert "DEEPSEEK_API_KEY" in output["answer"]
    assert "[1] Milvus deals with two types of data, inserted data and metadata." in output["answer"]
    assert SECTION in output["sources"][0]["headers"]
    # The chat answer: the passages, then the list of sources, once.
    assert chat.startswith(output["answer"]) and chat.count(SECTION) == 1


async def test_upstream_errors_become_json(faq_db: Settings, embeddings: Any, llm_server: LLMServer) -> None:
    llm_server.behaviour.fail_times = 1
    llm_server.behaviour.fail_status = 503
    async with asgi_client(with_llm(faq_db, llm_server), embeddings) as client:
        response = await client.post("/rag/invoke", json={"input": {"question": QUESTION}})
    assert response.status_code == 502
    assert "503" in response.json()["detail"]


async def test_health_is_503_when_milvus_is_unreachable(make_settings: Any, embeddings: Any) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = make_settings(MILVUS_URI=f"http://127.0.0.1:{port}")
    service = faq_service(settings, embeddings, llm=None)
    app = create_app(service=service)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as client,
    ):
        health = await client.get("/health")
        answer = await client.post("/rag/invoke", json={"input": {"question": QUESTION}})
        first_page = await client.get("/")
    assert health.status_code == 503 and health.json()["status"] == "down"
    assert "Milvus" in health.json()["error"]
    assert answer.status_code == 503 and "Milvus" in answer.json()["detail"]
    # The first page still opens, and says why there is nothing to show.
    assert first_page.status_code == 200 and 'role="alert"' in first_page.text
    assert html.escape(health.json()["error"]) in first_page.text


async def test_first_page_says_what_to_run_when_nothing_is_ingested(
    make_settings: Any, embeddings: Any
) -> None:
    async with asgi_client(make_settings(), embeddings, llm=None) as client:
        first_page = await client.get("/")
    assert first_page.status_code == 200
    assert "Nothing is ingested yet" in first_page.text and "rag ingest" in first_page.text
    assert 'id="chunk-count">0<' in first_page.text


@pytest.fixture
def live_server(faq_db: Settings, embeddings: Any, llm_server: LLMServer) -> Iterator[str]:
    settings = with_llm(faq_db, llm_server)
    app = create_app(service=faq_service(settings, embeddings, llm=make_llm(settings)))
    with serve_in_thread(app) as url:
        yield url


def test_remote_runnable_over_real_uvicorn(live_server: str, llm_server: LLMServer) -> None:
    chain: RemoteRunnable = RemoteRunnable(f"{live_server}/rag/")
    result = chain.invoke({"question": QUESTION})
    assert result["answer"] == llm_server.behaviour.reply
    assert SECTION in result["sources"][0]["headers"]
    chunks = list(chain.stream({"question": QUESTION}))
    assert "".join(c.get("answer", "") for c in chunks) == llm_server.behaviour.reply
    assert any("sources" in c for c in chunks)
    retriever: RemoteRunnable = RemoteRunnable(f"{live_server}/retriever/")
    docs = retriever.invoke(QUESTION)  # type: ignore[arg-type]
    assert SECTION in docs[0].metadata["headers"]
    assert httpx.get(f"{live_server}/health").json()["status"] == "ok"


async def test_per_request_settings_filter_and_size_the_retrieval(faq_db: Settings, embeddings: Any) -> None:
    config = {"configurable": {"k": 2, "source": "troubleshooting.md", "search": "dense"}}
    async with asgi_client(faq_db, embeddings, llm=None) as client:
        rag = await client.post("/rag/invoke", json={"input": {"question": QUESTION}, "config": config})
        docs = await client.post("/retriever/invoke", json={"input": "etcd pod pending", "config": config})
        too_many = await client.post(
            "/rag/invoke", json={"input": {"question": QUESTION}, "config": {"configurable": {"k": 500}}}
        )
    sources = rag.json()["output"]["sources"]
    assert [s["source"] for s in sources] == ["troubleshooting.md"] * 2
    assert {d["metadata"]["source"] for d in docs.json()["output"]} == {"troubleshooting.md"}
    assert too_many.status_code == 422 and "k must be between" in too_many.json()["detail"]


async def test_api_keys_guard_every_route_but_health_and_the_sign_in(
    faq_db: Settings, embeddings: Any
) -> None:
    settings = faq_db.model_copy(update={"api_keys": SecretStr("k1, k2")})
    service = faq_service(settings, embeddings, llm=None)
    app = create_app(service=service)
    body = {"input": {"question": QUESTION}}
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        missing = await client.post("/rag/invoke", json=body)
        wrong = await client.post("/rag/invoke", json=body, headers={"Authorization": "Bearer nope"})
        playground = await client.get("/rag/playground/")
        in_a_browser = await client.get("/rag/playground/", headers={"Accept": "text/html,*/*"})
        health = await client.get("/health")
        details = await client.get("/health/details")
        first_page = await client.get("/")
        right = await client.post("/rag/invoke", json=body, headers={"Authorization": "Bearer k2"})
        details_with_key = await client.get("/health/details", headers={"Authorization": "Bearer k1"})
        # A browser signs in on the first page; the cookie then opens the other routes.
        refused = await client.post("/login", content="key=nope", headers=FORM)
        signed_in = await client.post("/login", content="key=k2", headers=FORM)
        with_cookie = await client.post("/rag/invoke", json=body)
        page_with_cookie = await client.get("/")
        client.cookies.set(KEY_COOKIE, "forged")
        forged = await client.post("/rag/invoke", json=body)
    assert missing.status_code == wrong.status_code == playground.status_code == details.status_code == 401
    assert "API key" in missing.json()["detail"] and missing.headers["www-authenticate"] == "Bearer"
    assert in_a_browser.status_code == 303 and in_a_browser.headers["location"] == "/"
    # Open to anyone, /health says whether the service is up, and nothing else.
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert details_with_key.json()["milvus_uri"] == settings.milvus_uri
    assert first_page.status_code == 200 and 'name="key"' in first_page.text
    assert settings.collection not in first_page.text and settings.milvus_uri not in first_page.text
    assert right.status_code == 200 and SECTION in right.json()["output"]["sources"][0]["headers"]
    assert refused.status_code == 303 and refused.headers["location"] == "/?failed=1"
    assert KEY_COOKIE not in refused.headers.get("set-cookie", "")
    assert signed_in.status_code == 303 and "httponly" in signed_in.headers["set-cookie"].lower()
    assert with_cookie.status_code == 200
    assert settings.collection in page_with_cookie.text and 'name="key"' not in page_with_cookie.text
    assert forged.status_code == 401
