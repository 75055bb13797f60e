"""The MCP server through the SDK's own client: over HTTP at /mcp of a live uvicorn (behind
RAG_API_KEYS, and on `rag serve --workers 2`), and over stdio against a real `rag mcp`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from fastapi import FastAPI
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import SecretStr

from chains.llm import make_llm
from mcp_server import mount_mcp
from server import create_app
from settings import Settings
from tests.integration.conftest import QUESTION, SECTION, faq_service, serve_in_thread, with_llm
from tests.integration.test_workers import (
    RAG,
    STARTUP_TIMEOUT,
    STORE_LINE,
    kill_leftovers,
    serve_two_workers,
)
from tests.llm_server import LLMServer
from workers import free_port

pytestmark = pytest.mark.integration

KEY = "mcp-key"
FAQ_FILES = ["operational_faq.md", "performance_faq.md", "product_faq.md", "troubleshooting.md"]
REPO = Path(__file__).resolve().parents[2]


@asynccontextmanager
async def mcp_client(url: str, key: str | None = KEY, **client: Any) -> AsyncIterator[Client]:
    """The SDK's client on /mcp, sending `key` as a bearer token."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=60, **client) as http,
        Client(streamable_http_client(f"{url}/mcp", http_client=http), mode="legacy") as session,
    ):
        yield session


def with_keys(settings: Settings) -> Settings:
    return settings.model_copy(update={"api_keys": SecretStr(f"other-key,{KEY}")})


@pytest.fixture
def live_url(faq_db: Settings, embeddings: Any, llm_server: LLMServer) -> Iterator[str]:
    """A live uvicorn over the FAQ with RAG_API_KEYS set and DeepSeek at the test server."""
    settings = with_keys(with_llm(faq_db, llm_server))
    with serve_in_thread(create_app(service=faq_service(settings, embeddings, make_llm(settings)))) as url:
        yield url


def text(result: Any) -> str:
    return "\n".join(block.text for block in result.content)


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_the_tools_are_listed_and_called_over_http(
    live_url: str, llm_server: LLMServer, mode: str
) -> None:
    # "legacy": the initialize handshake, as hosts of the 2025 protocol do; "auto": the
    # 2026 protocol (server/discover, no session) when the server offers it.
    headers = {"Authorization": f"Bearer {KEY}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=60) as http,
        Client(streamable_http_client(f"{live_url}/mcp", http_client=http), mode=mode) as client,
    ):
        protocol = client.protocol_version
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        search = await client.call_tool("search_docs", {"query": QUESTION, "k": 2, "source": "product_*"})
        answer = await client.call_tool("ask_docs", {"question": QUESTION})
        listed = await client.call_tool("list_sources", {})

    assert (protocol in MODERN_PROTOCOL_VERSIONS) == (mode == "auto"), protocol
    assert set(tools) == {"search_docs", "ask_docs", "list_sources"}
    schema = tools["search_docs"].input_schema
    assert schema["required"] == ["query"] and set(schema["properties"]) == {"query", "k", "source", "filter"}
    assert all(p.get("description") for p in schema["properties"].values())
    assert tools["ask_docs"].input_schema["required"] == ["question"]
    assert all(len(tool.description or "") > 80 for tool in tools.values())
    assert tools["search_docs"].annotations and tools["search_docs"].annotations.read_only_hint

    assert not search.is_error, text(search)
    passages = search.structured_content["passages"]  # type: ignore[index]
    assert len(passages) == 2 and {p["source"] for p in passages} == {"product_faq.md"}
    assert SECTION in passages[0]["headers"]
    assert f'section="Product FAQ &gt; {SECTION}"' in text(search)

    assert not answer.is_error, text(answer)
    assert answer.structured_content["answer"] == llm_server.behaviour.reply  # type: ignore[index]
    assert text(answer).startswith(llm_server.behaviour.reply)
    assert f"Sources:\n[1] product_faq.md — Product FAQ > {SECTION}" in text(answer)
    assert QUESTION in str(llm_server.requests[-1]["body"]["messages"])

    assert listed.structured_content["sources"] == FAQ_FILES  # type: ignore[index]
    assert listed.structured_content["total_chunks"] >= 60  # type: ignore[index]
    assert text(listed).splitlines()[1:] == [f"- {name}" for name in FAQ_FILES]


DEAD_DEEPSEEK = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there


@pytest.fixture
def deepseek_down_url(faq_db: Settings, embeddings: Any) -> Iterator[str]:
    """A live uvicorn whose DeepSeek is down."""
    settings = with_keys(faq_db).model_copy(
        update={
            "deepseek_api_key": SecretStr("sk-test"),
            "deepseek_base_url": DEAD_DEEPSEEK,
            "deepseek_max_retries": 0,
        }
    )
    with serve_in_thread(create_app(service=faq_service(settings, embeddings, make_llm(settings)))) as url:
        yield url


async def test_bad_calls_are_tool_errors_with_the_reason(deepseek_down_url: str) -> None:
    async with mcp_client(deepseek_down_url) as client:
        too_many = await client.call_tool("search_docs", {"query": QUESTION, "k": 500})
        bad_filter = await client.call_tool("search_docs", {"query": QUESTION, "filter": "chunk_index >>> 1"})
        empty = await client.call_tool("ask_docs", {"question": "   "})
        outage = await client.call_tool("ask_docs", {"question": QUESTION})
        not_text = await client.call_tool("search_docs", {"query": QUESTION, "k": "many"})
        still_fine = await client.call_tool("search_docs", {"query": QUESTION})

    assert too_many.is_error and "k must be between 1 and 20, got 500" in text(too_many)
    assert bad_filter.is_error and "invalid filter" in text(bad_filter)
    assert empty.is_error and "the question is empty" in text(empty)
    assert outage.is_error and "DeepSeek" in text(outage) and DEAD_DEEPSEEK in text(outage)
    assert not_text.is_error and "k" in text(not_text) and "integer" in text(not_text)
    assert not still_fine.is_error and SECTION in text(still_fine)


async def test_a_wrong_or_missing_key_is_refused_before_any_tool_runs(
    live_url: str, llm_server: LLMServer
) -> None:
    for key in ("wrong", None):
        with pytest.raises(BaseExceptionGroup) as refused:
            async with mcp_client(live_url, key=key) as client:
                await client.list_tools()
        assert refused.group_contains(MCPError)
    raw = httpx.post(f"{live_url}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, timeout=30)
    assert raw.status_code == 401 and "API key" in raw.json()["detail"]
    assert llm_server.requests == []


async def test_the_tools_check_the_key_themselves_wherever_they_are_mounted(
    faq_db: Settings, embeddings: Any
) -> None:
    """Without the app's ApiKeyMiddleware in front, `authorize` still refuses a wrong key."""
    settings = with_keys(faq_db)
    service = faq_service(settings, embeddings, llm=None)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with running():
            yield

    app = FastAPI(lifespan=lifespan)
    running = mount_mcp(app, service, settings)
    try:
        with serve_in_thread(app) as url:
            async with mcp_client(url, key="wrong") as client:
                refused = await client.call_tool("list_sources", {})
            async with mcp_client(url) as client:
                allowed = await client.call_tool("list_sources", {})
    finally:
        service.close()
    assert refused.is_error and "invalid API key" in text(refused)
    assert not allowed.is_error and allowed.structured_content["sources"] == FAQ_FILES  # type: ignore[index]


async def test_rag_mcp_serves_the_tools_over_stdio(faq_db: Settings, llm_server: LLMServer) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEEPSEEK_", "MILVUS_", "RAG_"))}
    env |= {
        "MILVUS_URI": faq_db.milvus_uri,
        "RAG_COLLECTION": faq_db.collection,
        "DEEPSEEK_API_KEY": llm_server.api_key,
        "DEEPSEEK_BASE_URL": llm_server.url,
        "HF_HUB_OFFLINE": "1",
    }
    server = StdioServerParameters(command=sys.executable, args=["-m", "cli", "mcp"], env=env, cwd=str(REPO))

    async with Client(server, mode="legacy", read_timeout_seconds=120) as client:
        tools = await client.list_tools()
        search = await client.call_tool("search_docs", {"query": QUESTION})
        answer = await client.call_tool("ask_docs", {"question": QUESTION})
        listed = await client.call_tool("list_sources", {})
        too_many = await client.call_tool("search_docs", {"query": QUESTION, "k": 0})
    assert {tool.name for tool in tools.tools} == {"search_docs", "ask_docs", "list_sources"}
    assert not search.is_error and SECTION in search.structured_content["passages"][0]["headers"]
    assert not answer.is_error and text(answer).startswith(llm_server.behaviour.reply)
    assert listed.structured_content["sources"] == FAQ_FILES
    assert too_many.is_error and "k must be between 1 and 20, got 0" in text(too_many)


TOOLS_LIST = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2025-06-18"}


@pytest.mark.parametrize("keys", [False, True], ids=["no keys", "keys"])
async def test_a_foreign_host_reaches_a_loopback_server_only_with_a_key(
    faq_db: Settings, embeddings: Any, keys: bool
) -> None:
    """DNS rebinding: a web page whose name now points at 127.0.0.1 calls /mcp."""
    settings = with_keys(faq_db) if keys else faq_db
    assert settings.host == "127.0.0.1"
    app = create_app(service=faq_service(settings, embeddings, llm=None))
    headers = {**MCP_HEADERS, "Authorization": f"Bearer {KEY}"} if keys else MCP_HEADERS
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://attacker.example"
        ) as client,
    ):
        foreign = await client.post("/mcp", json=TOOLS_LIST, headers=headers)
        local = await client.post("/mcp", json=TOOLS_LIST, headers={**headers, "Host": "127.0.0.1:8000"})
    assert local.status_code == 200 and len(local.json()["result"]["tools"]) == 3
    if keys:
        assert foreign.status_code == 200 and foreign.json() == local.json()
    else:
        assert foreign.status_code == 421 and "Host" in foreign.text


async def test_mcp_starts_again_with_the_app(faq_db: Settings, embeddings: Any) -> None:
    """An app's lifespan may run twice in one process; the SDK's session manager runs once."""
    app = create_app(service=faq_service(with_keys(faq_db), embeddings, llm=None))
    headers = {**MCP_HEADERS, "Authorization": f"Bearer {KEY}"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as client:
        for _ in range(2):
            async with app.router.lifespan_context(app):
                listed = await client.post("/mcp", json=TOOLS_LIST, headers=headers)
                assert listed.status_code == 200 and len(listed.json()["result"]["tools"]) == 3
        stopped = await client.post("/mcp", json=TOOLS_LIST, headers=headers)
    assert stopped.status_code == 503 and stopped.json() == {"detail": "the MCP server is not running"}


def test_rag_mcp_errors_are_one_line_and_exit_non_zero() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEEPSEEK_", "MILVUS_", "RAG_"))}
    result = subprocess.run(
        [*RAG, "mcp"], cwd=REPO, env={**env, "RAG_TOP_K": "0"}, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().startswith("rag: error: invalid configuration (RAG_TOP_K)"), result.stderr


# The text log line each worker writes once it serves (observability.TEXT_FORMAT).
WORKER_READY = re.compile(r"\[(\d+)\] server \[[^\]]*\] ready$")
MCP_SERVED = re.compile(r"\[(\d+)\] .*\"POST /mcp HTTP/1\.1\" 200")


async def test_one_mcp_client_is_served_by_any_of_several_workers(tmp_path: Path, corpus: Path) -> None:
    """`rag serve --workers 2`: the requests of one client, each on a new connection, land
    on both workers, and every one is answered: no session state has to be shared."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEEPSEEK_", "MILVUS_", "RAG_"))}
    env |= {"MILVUS_URI": str(tmp_path / "store.db"), "RAG_API_KEYS": KEY, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONUNBUFFERED", None)
    ingest = subprocess.run(
        [*RAG, "ingest", str(corpus / "milvus-faq"), "--quiet"],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert ingest.returncode == 0, ingest.stderr
    port = free_port()
    serve, output = serve_two_workers(env, port)
    store_pid = 0
    try:
        store_pid = int(output.wait_for(STORE_LINE)[0][1])
        workers = {int(m[1]) for m in output.wait_for(WORKER_READY, count=2, timeout=STARTUP_TIMEOUT)}
        # No keep-alive: each request opens a connection, which either worker may accept.
        fresh_connections = httpx2.Limits(max_keepalive_connections=0)
        served_by: set[int] = set()
        async with mcp_client(f"http://127.0.0.1:{port}", limits=fresh_connections) as client:
            for calls in range(1, 41):
                result = await client.call_tool("search_docs", {"query": QUESTION, "k": 1})
                assert not result.is_error and SECTION in text(result)
                # 200s: the initialize request, then each call (its notification gets a 202).
                served_by = {int(m[1]) for m in output.wait_for(MCP_SERVED, count=calls + 1)}
                if served_by == workers:
                    break
        assert served_by == workers, "\n".join(output.lines)
    finally:
        kill_leftovers(serve, store_pid)
