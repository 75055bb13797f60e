"""The test server's tool calls (OpenAI's protocol), through the real `openai` client and
ChatDeepSeek, streamed and not: a call while tools are offered, the answer once a tool replied."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_deepseek import ChatDeepSeek

from tests.llm_server import LLMServer

TOOLS: Any = [
    {
        "type": "function",
        "function": {
            "name": "search_docs",
            "description": "Search the documentation.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}},
                "required": ["query"],
            },
        },
    }
]
CALL = {"name": "search_docs", "arguments": {"query": "where is data stored", "k": 2}}
QUESTION: Any = [{"role": "user", "content": "Where does Milvus store data?"}]


@pytest.fixture
def server() -> Iterator[LLMServer]:
    llm_server = LLMServer()
    llm_server.behaviour.tool_call = CALL
    yield llm_server
    llm_server.close()


@pytest.fixture
def client(server: LLMServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url, api_key=server.api_key, max_retries=0, timeout=10) as c:
        yield c


def test_a_request_with_tools_gets_the_tool_call(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="m", messages=QUESTION, tools=TOOLS)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id
    assert call.function.name == "search_docs" and json.loads(call.function.arguments) == CALL["arguments"]


def test_a_streamed_tool_call_comes_in_pieces_that_add_up(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="m", messages=QUESTION, tools=TOOLS, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [call for d in deltas for call in d.tool_calls or []]
    functions = [call.function for call in calls if call.function]
    assert calls[0].id and functions[0].name == "search_docs"
    assert len(functions) > 2, "the arguments should arrive in several pieces"
    arguments = "".join(function.arguments or "" for function in functions)
    assert json.loads(arguments) == CALL["arguments"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 110


def test_after_a_tool_result_comes_the_answer(client: openai.OpenAI, server: LLMServer) -> None:
    first = client.chat.completions.create(model="m", messages=QUESTION, tools=TOOLS)
    call = (first.choices[0].message.tool_calls or [])[0]
    conversation: Any = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "Milvus keeps data in MinIO or S3."},
    ]
    answer = client.chat.completions.create(model="m", messages=conversation, tools=TOOLS)
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.content == server.behaviour.reply
    # A new question starts over: it gets a tool call again.
    again = client.chat.completions.create(
        model="m", messages=[*conversation, {"role": "user", "content": "And metadata?"}], tools=TOOLS
    )
    assert again.choices[0].finish_reason == "tool_calls"


def test_requests_without_tools_are_answered_as_before(client: openai.OpenAI, server: LLMServer) -> None:
    completion = client.chat.completions.create(model="m", messages=QUESTION)
    assert completion.choices[0].message.content == server.behaviour.reply
    assert not completion.choices[0].message.tool_calls


@pytest.mark.parametrize("streaming", [False, True])
def test_chat_deepseek_reads_the_tool_call_and_sends_the_result_back(
    server: LLMServer, streaming: bool
) -> None:
    model = ChatDeepSeek(
        model_name="deepseek-v4-flash", api_key=server.api_key_secret(), api_base=server.url, max_retries=0
    ).bind_tools(TOOLS)
    question = [HumanMessage("Where does Milvus store data?")]
    if streaming:
        chunks = list(model.stream(question))
        message: AIMessage = chunks[0]
        for chunk in chunks[1:]:
            message = message + chunk  # type: ignore[assignment]
        assert isinstance(message, AIMessageChunk)
    else:
        message = model.invoke(question)  # type: ignore[assignment]
    (call,) = message.tool_calls
    assert call["name"] == "search_docs" and call["args"] == CALL["arguments"]
    result = ToolMessage("Milvus keeps data in MinIO or S3.", tool_call_id=call["id"] or "")
    answer = model.invoke([*question, message, result])
    assert answer.text == server.behaviour.reply
    sent = server.requests[-1]["body"]["messages"]
    assert sent[-1] == {
        "role": "tool",
        "tool_call_id": call["id"],
        "content": "Milvus keeps data in MinIO or S3.",
    }
