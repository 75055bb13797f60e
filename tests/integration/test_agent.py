"""examples/agent.py end to end: a LangChain agent whose model (DeepSeek's protocol) is the
test LLM server and whose tools are a live uvicorn of ours, reached with RemoteRunnable."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from langchain_core.messages import AIMessage, ToolMessage
from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from chains.llm import make_llm
from server import create_app
from settings import Settings
from tests.integration.conftest import QUESTION, SECTION, faq_service, serve_in_thread, with_llm
from tests.llm_server import LLMServer
from workers import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "agent.py"
KEY = "agent-key"
FINAL = "Milvus keeps inserted data in object storage such as MinIO or S3 (product_faq.md)."


def example() -> ModuleType:
    """examples/agent.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("agent_example", EXAMPLE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Recorded:
    """The app, noting every HTTP request that reaches it ("POST /retriever/invoke")."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.requests: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.requests.append(f"{scope['method']} {scope['path']}")
        await self.app(scope, receive, send)


def live(settings: Settings, embeddings: Any) -> tuple[Recorded, Any]:
    recorded = Recorded(create_app(service=faq_service(settings, embeddings, make_llm(settings))))
    return recorded, serve_in_thread(recorded)


@pytest.fixture
def rag_server(faq_db: Settings, embeddings: Any, llm_server: LLMServer) -> Iterator[tuple[str, Recorded]]:
    """Our server, with an API key, whose own DeepSeek is the test server too."""
    settings = with_llm(faq_db, llm_server).model_copy(update={"api_keys": SecretStr(KEY)})
    recorded, serving = live(settings, embeddings)
    with serving as url:
        yield url, recorded


def agent_requests(llm_server: LLMServer) -> list[dict[str, Any]]:
    """The bodies of the agent's model requests (those that offer tools; the RAG chain's don't)."""
    return [r["body"] for r in llm_server.requests if r["body"].get("tools")]


def test_the_example_agent_searches_our_server_and_answers(
    rag_server: tuple[str, Recorded], llm_server: LLMServer
) -> None:
    url, recorded = rag_server
    llm_server.behaviour.tool_call = {"name": "search_docs", "arguments": {"query": QUESTION, "k": 2}}
    llm_server.behaviour.reply = FINAL
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEEPSEEK_", "MILVUS_", "RAG_"))}
    env |= {
        "RAG_URL": url,
        "RAG_API_KEY": KEY,
        "DEEPSEEK_API_KEY": llm_server.api_key,
        "DEEPSEEK_BASE_URL": llm_server.url,
    }
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), QUESTION],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == FINAL + "\n"  # the final answer, as it was streamed
    assert f'[search_docs {{"query": "{QUESTION}", "k": 2}}]' in result.stderr
    assert "[search_docs: ok]" in result.stderr

    # The tool call reached our server...
    assert recorded.requests.count("POST /retriever/invoke") == 1
    first, second = agent_requests(llm_server)
    assert first["stream"] is True and first["model"] == "deepseek-v4-flash"
    assert {t["function"]["name"] for t in first["tools"]} == {"search_docs", "ask_docs"}
    # ...and the passages it found came back in the agent's next request to the model.
    assistant, tool = second["messages"][-2:]
    assert assistant["tool_calls"][0]["function"]["name"] == "search_docs"
    assert tool["role"] == "tool" and tool["tool_call_id"] == assistant["tool_calls"][0]["id"]
    assert f'<passage n="1" source="product_faq.md" section="Product FAQ &gt; {SECTION}">' in tool["content"]
    assert '<passage n="2"' in tool["content"] and '<passage n="3"' not in tool["content"]


def run_agent(url: str, key: str, llm_server: LLMServer, tool_call: dict[str, Any]) -> list[Any]:
    """The example's agent in this process (not streamed: `invoke`), for one question."""
    llm_server.behaviour.tool_call = tool_call
    llm_server.behaviour.reply = FINAL
    agent_example = example()
    model = agent_example.ChatDeepSeek(
        model_name="deepseek-v4-flash",
        api_key=llm_server.api_key_secret(),
        api_base=llm_server.url,
        max_retries=0,
    )
    agent = agent_example.build_agent(model, url, key)
    return list(agent.invoke({"messages": [{"role": "user", "content": QUESTION}]})["messages"])


def tool_result(messages: list[Any]) -> ToolMessage:
    (result,) = [m for m in messages if isinstance(m, ToolMessage)]
    return result


@pytest.mark.parametrize(
    ("key", "tool_call", "reason"),
    [
        (
            KEY,
            {"name": "search_docs", "arguments": {"query": QUESTION, "k": 99}},
            "k must be between 1 and 20, got 99",
        ),
        (
            KEY,
            {"name": "search_docs", "arguments": {"query": QUESTION, "filter": "source ="}},
            "invalid filter",
        ),
        (KEY, {"name": "ask_docs", "arguments": {"question": ""}}, "the question is empty"),
        (
            "stolen-key",
            {"name": "search_docs", "arguments": {"query": QUESTION}},
            "refused the API key (401)",
        ),
    ],
    ids=["k", "filter", "question", "key"],
)
def test_a_failed_tool_call_goes_back_to_the_model_and_the_run_goes_on(
    rag_server: tuple[str, Recorded], llm_server: LLMServer, key: str, tool_call: dict[str, Any], reason: str
) -> None:
    url, _ = rag_server
    messages = run_agent(url, key, llm_server, tool_call)
    result = tool_result(messages)
    assert result.status == "error" and reason in str(result.content)
    assert isinstance(messages[-1], AIMessage) and messages[-1].text == FINAL
    first, second = agent_requests(llm_server)
    assert not first.get("stream") and second["messages"][-1] == {
        "role": "tool",
        "tool_call_id": result.tool_call_id,
        "content": result.content,
    }


def test_ask_docs_in_the_agent_answers_with_sources(
    rag_server: tuple[str, Recorded], llm_server: LLMServer
) -> None:
    url, recorded = rag_server
    messages = run_agent(url, KEY, llm_server, {"name": "ask_docs", "arguments": {"question": QUESTION}})
    result = tool_result(messages)
    assert result.status == "success"
    assert f"Sources:\n[1] product_faq.md — Product FAQ > {SECTION}" in str(result.content)
    assert recorded.requests.count("POST /rag/invoke") == 1
    assert messages[-1].text == FINAL
    assert json.dumps(result.content)[1:-1] in json.dumps(agent_requests(llm_server)[-1]["messages"][-1])


def test_deepseek_down_behind_ask_docs_is_a_tool_error_that_says_so(
    faq_db: Settings, embeddings: Any, llm_server: LLMServer
) -> None:
    # Our server's DeepSeek is down; the agent's own model (the test server) is up.
    dead = f"http://127.0.0.1:{free_port()}/v1"
    settings = faq_db.model_copy(
        update={
            "deepseek_api_key": SecretStr("sk-test"),
            "deepseek_base_url": dead,
            "deepseek_max_retries": 0,
        }
    )
    _, serving = live(settings, embeddings)
    with serving as url:
        messages = run_agent(url, "", llm_server, {"name": "ask_docs", "arguments": {"question": QUESTION}})
    result = tool_result(messages)
    assert result.status == "error"
    content = str(result.content)  # e.g. "...answered 502: cannot reach DeepSeek at http://..."
    assert content.startswith(f"the RAG server at {url} answered 502: ") and "DeepSeek" in content
    assert dead in content
    assert messages[-1].text == FINAL


async def test_the_in_process_tools_serve_an_async_agent(
    faq_db: Settings, embeddings: Any, llm_server: LLMServer
) -> None:
    """docs/agents.md's in-process agent: `service.tools()`, run with `ainvoke`."""
    from langchain.agents import create_agent
    from langchain_deepseek import ChatDeepSeek

    settings = with_llm(faq_db, llm_server)
    service = faq_service(settings, embeddings, make_llm(settings))
    llm_server.behaviour.tool_call = {
        "name": "search_docs",
        "arguments": {"query": QUESTION, "source": "product_*"},
    }
    llm_server.behaviour.reply = FINAL
    model = ChatDeepSeek(
        model_name="deepseek-v4-flash",
        api_key=llm_server.api_key_secret(),
        api_base=llm_server.url,
        max_retries=0,
    )
    try:
        agent = create_agent(model, tools=service.tools())
        result = await agent.ainvoke({"messages": [{"role": "user", "content": QUESTION}]})
    finally:
        service.close()
    found = tool_result(result["messages"])
    assert found.status == "success" and {d.metadata["source"] for d in found.artifact} == {"product_faq.md"}
    assert result["messages"][-1].text == FINAL
    assert agent_requests(llm_server)[-1]["messages"][-1]["content"] == found.content
