"""chains/tools.py: search_docs and ask_docs as an agent calls them (tool calls), over the
service in process and over a live uvicorn through RemoteRunnable; their errors come back as
error results with the reason."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from langchain_core.documents import Document
from langchain_core.messages import ToolMessage
from langchain_core.tools import BaseTool
from pydantic import SecretStr

from chains.llm import make_llm
from chains.tools import remote_tools
from server import create_app
from settings import Settings
from tests.integration.conftest import QUESTION, SECTION, faq_service, serve_in_thread, with_llm
from tests.llm_server import LLMServer
from workers import free_port

pytestmark = pytest.mark.integration

KEY = "agent-key"


def call(tool: BaseTool, **args: Any) -> ToolMessage:
    """The tool run as an agent runs it: a tool call in, a ToolMessage out."""
    message = tool.invoke({"type": "tool_call", "id": "call_1", "name": tool.name, "args": args})
    assert isinstance(message, ToolMessage)
    return message


def deepseek_down(settings: Settings) -> Settings:
    """Settings whose DeepSeek is down: nothing listens at the base URL."""
    return settings.model_copy(
        update={
            "deepseek_api_key": SecretStr("sk-test"),
            "deepseek_base_url": f"http://127.0.0.1:{free_port()}/v1",
            "deepseek_max_retries": 0,
        }
    )


@pytest.fixture
def local_tools(faq_db: Settings, embeddings: Any, llm_server: LLMServer) -> Iterator[list[BaseTool]]:
    settings = with_llm(faq_db, llm_server)
    service = faq_service(settings, embeddings, make_llm(settings))
    yield service.tools()
    service.close()


@pytest.fixture
def server_url(faq_db: Settings, embeddings: Any, llm_server: LLMServer) -> Iterator[str]:
    """A live uvicorn over the FAQ that asks for an API key."""
    settings = with_llm(faq_db, llm_server).model_copy(update={"api_keys": SecretStr(KEY)})
    with serve_in_thread(create_app(service=faq_service(settings, embeddings, make_llm(settings)))) as url:
        yield url


def check_search(message: ToolMessage) -> None:
    assert message.status == "success", message.content
    documents = message.artifact
    assert all(isinstance(d, Document) for d in documents) and len(documents) == 2
    assert {d.metadata["source"] for d in documents} == {"product_faq.md"}
    assert SECTION in documents[0].metadata["headers"]
    assert str(message.content).startswith(
        f'<passage n="1" source="product_faq.md" section="Product FAQ &gt; {SECTION}">'
    )
    assert documents[1].page_content in str(message.content)


def check_answer(message: ToolMessage, llm_server: LLMServer) -> None:
    assert message.status == "success", message.content
    reply = llm_server.behaviour.reply
    assert str(message.content).startswith(
        f"{reply}\n\nSources:\n[1] product_faq.md — Product FAQ > {SECTION}"
    )
    assert message.artifact["answer"] == reply and SECTION in message.artifact["sources"][0]["headers"]


def test_in_process_search_and_answer(local_tools: list[BaseTool], llm_server: LLMServer) -> None:
    search, ask = local_tools
    check_search(call(search, query=QUESTION, k=2, source="product_*"))
    check_answer(call(ask, question=QUESTION), llm_server)


async def test_in_process_tools_run_async_too(local_tools: list[BaseTool], llm_server: LLMServer) -> None:
    search, ask = local_tools
    searched = await search.ainvoke(
        {
            "type": "tool_call",
            "id": "1",
            "name": "search_docs",
            "args": {"query": QUESTION, "k": 2, "source": "product_*"},
        }
    )
    check_search(searched)
    check_answer(
        await ask.ainvoke(
            {"type": "tool_call", "id": "2", "name": "ask_docs", "args": {"question": QUESTION}}
        ),
        llm_server,
    )


def test_remote_search_and_answer(server_url: str, llm_server: LLMServer) -> None:
    search, ask = remote_tools(server_url, KEY)
    check_search(call(search, query=QUESTION, k=2, source="product_*"))
    check_answer(call(ask, question=QUESTION), llm_server)


def test_the_model_sees_the_arguments_described(server_url: str) -> None:
    search, ask = remote_tools(server_url, KEY)
    schema = search.tool_call_schema.model_json_schema()  # type: ignore[union-attr]
    assert set(schema["properties"]) == {"query", "k", "source", "filter"} and schema["required"] == ["query"]
    assert all(field["description"] for field in schema["properties"].values())
    assert ask.tool_call_schema.model_json_schema()["required"] == ["question"]  # type: ignore[union-attr]
    assert "cites" in ask.description and "passages" in search.description


BAD_CALLS = [
    ("search_docs", {"query": QUESTION, "k": 99}, "k must be between 1 and 20, got 99"),
    (
        "search_docs",
        {"query": QUESTION, "filter": "chunk_index >>> 1"},
        "invalid filter '(chunk_index >>> 1)'",
    ),
    ("ask_docs", {"question": "  "}, "the question is empty"),
]


@pytest.mark.parametrize(("name", "args", "reason"), BAD_CALLS, ids=["k", "filter", "question"])
def test_bad_calls_in_process_are_error_results(
    local_tools: list[BaseTool], name: str, args: dict[str, Any], reason: str
) -> None:
    tool = {t.name: t for t in local_tools}[name]
    message = call(tool, **args)
    assert message.status == "error" and reason in str(message.content)


@pytest.mark.parametrize(("name", "args", "reason"), BAD_CALLS, ids=["k", "filter", "question"])
def test_bad_calls_remote_are_error_results(
    server_url: str, name: str, args: dict[str, Any], reason: str
) -> None:
    tool = {t.name: t for t in remote_tools(server_url, KEY)}[name]
    message = call(tool, **args)
    assert message.status == "error" and reason in str(message.content)
    if name == "search_docs":
        assert str(message.content).startswith(f"the RAG server at {server_url} answered 422: ")


def test_a_refused_key_or_an_unreachable_server_is_an_error_result(server_url: str) -> None:
    for key in ("wrong-key", None):
        search, ask = remote_tools(server_url, key)
        for message in (call(search, query=QUESTION), call(ask, question=QUESTION)):
            assert message.status == "error"
            assert str(message.content).startswith(
                f"the RAG server at {server_url} refused the API key (401): "
                "missing or invalid API key: send Authorization: Bearer <key>"
            )
    nowhere = f"http://127.0.0.1:{free_port()}"
    message = call(remote_tools(nowhere, KEY)[0], query=QUESTION)
    assert message.status == "error" and str(message.content).startswith(
        f"cannot reach the RAG server at {nowhere}"
    )


def test_deepseek_down_is_an_error_result_that_says_so(faq_db: Settings, embeddings: Any) -> None:
    settings = deepseek_down(faq_db)
    service = faq_service(settings, embeddings, make_llm(settings))
    try:
        in_process = call(service.tools()[1], question=QUESTION)
        with serve_in_thread(create_app(service=service)) as url:
            remote = call(remote_tools(url)[1], question=QUESTION)
    finally:
        service.close()
    reason = str(in_process.content)  # e.g. "cannot reach DeepSeek at http://...: check ..."
    assert in_process.status == "error" and "DeepSeek" in reason and settings.deepseek_base_url in reason
    assert (
        remote.status == "error"
        and remote.content == f"the RAG server at {url} answered 502: {in_process.content}"
    )
