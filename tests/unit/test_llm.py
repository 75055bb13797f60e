"""make_llm and describe_llm_error, with the OpenAI client on a mock transport."""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import SecretStr

from chains.llm import (
    AsyncRawChatCompletions,
    ConfiguredOnDemand,
    DeepSeekChat,
    RawChatCompletions,
    describe_llm_error,
    is_retryable,
    join_text_deltas,
    make_llm,
    retry_after,
    thinking_body,
)
from errors import LLMError, RagError
from settings import Settings
from tests.llm_server import Behaviour, LLMServer, tokens
from tests.unit.fakes import openai_http

BASE_URL = "http://deepseek.invalid/v1"


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **{"DEEPSEEK_BASE_URL": BASE_URL, **values})


@pytest.mark.parametrize("key", [None, ""])
def test_no_key_means_no_llm(key: str | None) -> None:
    assert make_llm(settings(DEEPSEEK_API_KEY=key)) is None


def test_with_a_key_it_targets_the_configured_endpoint() -> None:
    llm = make_llm(settings(DEEPSEEK_API_KEY="sk-test", DEEPSEEK_MODEL="deepseek-v4-pro", DEEPSEEK_TIMEOUT=7))
    assert llm is not None
    model = llm.default  # type: ignore[attr-defined]
    assert isinstance(model, DeepSeekChat)
    assert model.model_name == "deepseek-v4-pro"
    assert model.api_base == BASE_URL
    assert isinstance(model.api_key, SecretStr)
    assert model.api_key.get_secret_value() == "sk-test"
    timeout = model.request_timeout
    assert isinstance(timeout, httpx.Timeout) and timeout.read == 7 and timeout.connect == 7
    assert model.max_retries == 0  # retries happen in the answer stream, before the first token
    assert model._default_params["extra_body"] == {"thinking": {"type": "disabled"}}
    assert model.temperature == 0.0


def test_repr_and_trace_serialization_name_the_model_but_no_clients_or_key() -> None:
    from langchain_core.load import dumpd

    llm = make_llm(settings(DEEPSEEK_API_KEY="sk-test-secret"))
    model = llm.default  # type: ignore[union-attr]
    text = repr(model)
    assert "deepseek-v4-flash" in text and "thinking=False" in text
    assert "sk-test-secret" not in text and "client" not in text.lower()
    assert dumpd(model)["repr"] == text  # what tracing records, per configured copy


def test_thinking_body_switches_deepseek_thinking() -> None:
    assert thinking_body(True) == {"thinking": {"type": "enabled"}}
    assert thinking_body(False) == {"thinking": {"type": "disabled"}}


def test_only_listed_models_can_be_chosen_per_request() -> None:
    llm = make_llm(settings(DEEPSEEK_API_KEY="sk-test", DEEPSEEK_MODELS="deepseek-v4-pro,other-model"))
    assert llm is not None
    spec = {s.id: s for s in llm.config_specs}
    assert set(spec) == {"model", "temperature", "thinking"}
    assert spec["model"].default == "deepseek-v4-flash"
    assert set(spec["model"].annotation.__members__.values()) == {  # type: ignore[union-attr]
        "deepseek-v4-flash",
        "deepseek-v4-pro",
        "other-model",
    }
    # In process an unknown id fails before any request; over HTTP, LangServe answers 422.
    with pytest.raises(KeyError):
        llm.with_config(configurable={"model": "gpt-4"}).invoke("hello")


def test_a_call_that_changes_no_setting_answers_with_the_model_as_built() -> None:
    llm = make_llm(settings(DEEPSEEK_API_KEY="sk-test", DEEPSEEK_MODELS="deepseek-v4-pro"))
    assert isinstance(llm, ConfiguredOnDemand)
    # LangServe sends every field's default once a request brings any config at all.
    unchanged = {"model": "deepseek-v4-flash", "temperature": 0.0, "thinking": False, "k": 5}
    assert llm._prepare({})[0] is llm.default
    assert llm._prepare({"configurable": unchanged})[0] is llm.default
    warmer = llm._prepare({"configurable": {**unchanged, "temperature": 0.5}})[0]
    assert isinstance(warmer, DeepSeekChat) and warmer is not llm.default
    assert (warmer.model_name, warmer.temperature) == ("deepseek-v4-flash", 0.5)
    pro = llm._prepare({"configurable": {"model": "deepseek-v4-pro"}})[0]
    assert isinstance(pro, DeepSeekChat) and pro.model_name == "deepseek-v4-pro"
    assert isinstance(llm.default, DeepSeekChat) and llm.default.model_name == "deepseek-v4-flash"


def chat_completion(content: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "deepseek-v4-flash",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }


def as_sse(completion: dict[str, Any]) -> bytes:
    """The completion as DeepSeek streams it: one chunk per field, then [DONE]."""
    message = completion["choices"][0]["message"]
    deltas = [{"role": "assistant", "content": ""}]
    if "reasoning_content" in message:
        deltas.append({"reasoning_content": message["reasoning_content"]})
    deltas.append({"content": message["content"]})
    base = {"id": completion["id"], "object": "chat.completion.chunk", "model": completion["model"]}
    events = [{**base, "choices": [{"index": 0, "delta": d}]} for d in deltas]
    events.append({**base, "choices": [], "usage": completion["usage"]})
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


def _mocked(llm: Any, captured: list[Any], reply: dict[str, Any]) -> None:
    def handler(request: Any) -> Any:
        captured.append(request)
        if json.loads(request.content).get("stream"):
            headers = {"content-type": "text/event-stream"}
            return openai_http.Response(200, headers=headers, content=as_sse(reply))
        return openai_http.Response(200, json=reply)

    model = llm.default
    http_client = openai.DefaultHttpxClient(transport=openai_http.MockTransport(handler))
    # Configured copies share these clients with the default model.
    model.root_client = model.root_client.with_options(http_client=http_client, max_retries=0)
    model.client = model.root_client.chat.completions


def test_request_carries_model_key_and_thinking_disabled() -> None:
    captured: list[Any] = []
    llm = make_llm(settings(DEEPSEEK_API_KEY="sk-test"))
    _mocked(llm, captured, chat_completion("fine [1]"))

    reply = llm.invoke("hello")  # type: ignore[union-attr]

    assert reply.content == "fine [1]"
    (request,) = captured
    assert str(request.url) == f"{BASE_URL}/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    body = json.loads(request.content)
    assert body["model"] == "deepseek-v4-flash"
    assert body["thinking"] == {"type": "disabled"}
    assert body["temperature"] == 0.0
    assert body["messages"][-1] == {"role": "user", "content": "hello"}


def test_per_request_model_temperature_and_thinking_reach_the_request() -> None:
    captured: list[Any] = []
    llm = make_llm(settings(DEEPSEEK_API_KEY="sk-test"))
    completion = chat_completion("thought it through [1]")
    completion["choices"][0]["message"]["reasoning_content"] = "Passage 1 says so."
    _mocked(llm, captured, completion)

    configured = llm.with_config(  # type: ignore[union-attr]
        configurable={"model": "deepseek-v4-pro", "temperature": 0.7, "thinking": False}
    )
    configured.invoke("hello")
    thinking = llm.with_config(configurable={"thinking": True})  # type: ignore[union-attr]
    reply = thinking.invoke("hello")

    first, second = (json.loads(r.content) for r in captured)
    assert (first["model"], first["temperature"], first["thinking"]) == (
        "deepseek-v4-pro",
        0.7,
        {"type": "disabled"},
    )
    assert second["model"] == "deepseek-v4-flash"
    assert second["thinking"] == {"type": "enabled"}
    assert "temperature" not in second  # ignored by DeepSeek while thinking
    assert reply.additional_kwargs["reasoning_content"] == "Passage 1 says so."
    assert reply.content == "thought it through [1]"


def _request() -> Any:
    return openai_http.Request("POST", f"{BASE_URL}/chat/completions")


def _response(status: int) -> Any:
    return openai_http.Response(status, request=_request(), json={"error": {"message": "nope"}})


def test_authentication_error_is_explained() -> None:
    exc = openai.AuthenticationError("Incorrect API key", response=_response(401), body=None)
    error = describe_llm_error(exc, BASE_URL)
    assert isinstance(error, LLMError) and isinstance(error, RagError)
    message = str(error)
    assert "401" in message and "DEEPSEEK_API_KEY" in message and BASE_URL in message
    assert "\n" not in message


def test_connection_error_is_explained() -> None:
    error = describe_llm_error(openai.APIConnectionError(request=_request()), BASE_URL)
    assert isinstance(error, LLMError)
    assert "cannot reach" in str(error) and BASE_URL in str(error) and "DEEPSEEK_BASE_URL" in str(error)


def test_timeout_is_not_reported_as_unreachable() -> None:
    error = describe_llm_error(openai.APITimeoutError(request=_request()), BASE_URL)
    assert isinstance(error, LLMError)
    assert "in time" in str(error)


def test_rate_limit_and_other_statuses() -> None:
    limited = describe_llm_error(
        openai.RateLimitError("slow down", response=_response(429), body=None), BASE_URL
    )
    assert limited is not None and "429" in str(limited)
    server = describe_llm_error(
        openai.InternalServerError("upstream exploded", response=_response(500), body=None), BASE_URL
    )
    assert server is not None and "500" in str(server) and "upstream exploded" in str(server)


def test_other_exceptions_are_not_llm_errors() -> None:
    assert describe_llm_error(ValueError("unrelated"), BASE_URL) is None
    assert describe_llm_error(KeyError("answer"), BASE_URL) is None


def test_llm_error_status_code() -> None:
    assert LLMError("x").status_code == 502


# The raw chat completions client (RawChatCompletions), over real HTTP to tests/llm_server.py.

REPLY = "Milvus keeps segments in object storage [1]."


def served(server: LLMServer, **values: Any) -> Settings:
    return Settings(
        _env_file=None,
        **{"DEEPSEEK_BASE_URL": server.url, "DEEPSEEK_API_KEY": server.api_key, **values},
    )


def served_llm(server: LLMServer, **values: Any) -> Any:
    llm = make_llm(served(server, **values))
    assert llm is not None
    return llm


def test_models_and_configured_copies_use_the_raw_client(llm_server: LLMServer) -> None:
    llm = served_llm(llm_server)
    model = llm.default
    assert isinstance(model.async_client, AsyncRawChatCompletions)
    assert isinstance(model.client, RawChatCompletions)
    copy, _ = llm._prepare({"configurable": {"thinking": True}})
    assert copy is not model and copy.thinking
    assert isinstance(copy.async_client, AsyncRawChatCompletions)
    assert copy.root_async_client is model.root_async_client  # one connection pool, still


def _no_typed_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """langchain-openai calls model_dump() on a typed chunk: fail if one ever gets there."""

    def model_dump(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a typed ChatCompletionChunk reached langchain-openai")

    monkeypatch.setattr(ChatCompletionChunk, "model_dump", model_dump)


async def test_streamed_chunks_skip_the_sdk_models(
    llm_server: LLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm_server.behaviour = Behaviour(reply=REPLY)
    _no_typed_chunks(monkeypatch)
    seen: list[type] = []
    convert = DeepSeekChat._convert_chunk_to_generation_chunk

    def spy(self: Any, chunk: Any, *args: Any) -> Any:
        seen.append(type(chunk))
        return convert(self, chunk, *args)

    monkeypatch.setattr(DeepSeekChat, "_convert_chunk_to_generation_chunk", spy)
    chunks = [c async for c in served_llm(llm_server).astream("hello")]

    assert "".join(c.content for c in chunks) == REPLY
    assert seen and set(seen) == {dict}
    usage = [c.usage_metadata for c in chunks if c.usage_metadata]
    assert usage == [
        {
            "input_tokens": 100,
            "output_tokens": 10,
            "total_tokens": 110,
            "input_token_details": {"cache_read": 64},
            "output_token_details": {},
        }
    ]


def test_sync_stream_skips_the_sdk_models(llm_server: LLMServer, monkeypatch: pytest.MonkeyPatch) -> None:
    llm_server.behaviour = Behaviour(reply=REPLY)
    _no_typed_chunks(monkeypatch)
    chunks = list(served_llm(llm_server).stream("hello"))
    assert "".join(str(c.content) for c in chunks) == REPLY


async def test_thinking_reaches_the_body_and_reasoning_streams_apart(
    llm_server: LLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm_server.behaviour = Behaviour(reply=REPLY, reasoning="Passage 1 says so.")
    _no_typed_chunks(monkeypatch)
    llm = served_llm(llm_server)

    chunks = [c async for c in llm.with_config(configurable={"thinking": True}).astream("hello")]
    plain = await llm.ainvoke("hello")

    thinking_body_sent, plain_body = (r["body"] for r in llm_server.requests)
    assert thinking_body_sent["thinking"] == {"type": "enabled"}
    assert "temperature" not in thinking_body_sent
    assert plain_body["thinking"] == {"type": "disabled"} and plain_body["temperature"] == 0.0
    for body in (thinking_body_sent, plain_body):
        assert not {"extra_body", "extra_headers", "extra_query", "timeout"} & set(body)
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    reasoning = "".join(c.additional_kwargs.get("reasoning_content", "") for c in chunks)
    assert reasoning == "Passage 1 says so."
    assert "".join(str(c.content) for c in chunks) == REPLY
    assert plain.content == REPLY and "reasoning_content" not in plain.additional_kwargs


@pytest.mark.parametrize("thinking", [False, True])
async def test_non_streamed_answers_keep_usage_and_reasoning(llm_server: LLMServer, thinking: bool) -> None:
    # stream=False takes langchain-openai's with_raw_response path, which stays on the SDK.
    llm_server.behaviour = Behaviour(reply=REPLY, reasoning="Passage 1 says so.")
    llm = served_llm(llm_server).with_config(configurable={"thinking": thinking})

    replies = [await llm.ainvoke("hello", stream=False), llm.invoke("hello", stream=False)]

    assert [r["body"]["stream"] for r in llm_server.requests] == [False, False]
    reasoning = "Passage 1 says so." if thinking else None
    for reply in replies:
        assert reply.content == REPLY
        assert reply.usage_metadata["input_tokens"] == 100
        assert reply.usage_metadata["output_tokens"] == 10
        assert reply.usage_metadata["input_token_details"] == {"cache_read": 64}
        assert reply.additional_kwargs.get("reasoning_content") == reasoning


PARAMS: dict[str, Any] = {
    "model": "deepseek-v4-flash",
    "messages": [{"role": "user", "content": "hello"}],
    "temperature": 0.3,
    "stop": ["\n\n"],
    "stream_options": {"include_usage": True},
    "seed": None,  # sent as null, as the SDK does
    "top_p": openai.NOT_GIVEN,
    "user": openai.omit,
    "extra_body": {"thinking": {"type": "enabled"}, "temperature": 0.5},
    "extra_headers": {"X-Trace": "abc"},
    "extra_query": {"beta": "1"},
    "timeout": 30.0,
}


@pytest.mark.parametrize("stream", [False, True])
async def test_raw_request_matches_the_sdk_request(llm_server: LLMServer, stream: bool) -> None:
    root = openai.AsyncOpenAI(base_url=llm_server.url, api_key=llm_server.api_key, max_retries=0)
    params = {**PARAMS, "stream": stream}

    typed = await root.chat.completions.create(**params)
    raw = await AsyncRawChatCompletions(root).create(**params)

    if stream:
        assert isinstance(raw, openai.AsyncStream)
        typed_chunks = [c.model_dump(exclude_unset=True) async for c in typed]
        raw_chunks = [c async for c in raw]
        assert all(type(c) is dict for c in raw_chunks)
        assert raw_chunks == typed_chunks
    else:
        assert type(raw) is dict
        assert raw == typed.model_dump(exclude_unset=True)
    sdk_request, raw_request = llm_server.requests
    assert raw_request["path"] == sdk_request["path"] == "/v1/chat/completions?beta=1"
    assert raw_request["body"] == sdk_request["body"]
    assert raw_request["body"]["thinking"] == {"type": "enabled"}
    assert raw_request["body"]["temperature"] == 0.5  # extra_body wins, as in the SDK
    assert raw_request["body"]["seed"] is None and "top_p" not in raw_request["body"]
    assert raw_request["headers"] == sdk_request["headers"]  # auth, extra headers, timeout, ...
    assert raw_request["headers"]["x-trace"] == "abc"
    assert raw_request["headers"]["authorization"] == f"Bearer {llm_server.api_key}"
    assert raw_request["headers"]["x-stainless-read-timeout"] == "30.0"
    await root.close()


async def test_direct_stream_sends_and_reads_what_the_sdk_does(llm_server: LLMServer) -> None:
    root = openai.AsyncOpenAI(base_url=llm_server.url, api_key=llm_server.api_key, max_retries=0)
    http = httpx.AsyncClient(timeout=30)
    params = {**PARAMS, "stream": True}

    typed = await root.chat.completions.create(**params)
    typed_chunks = [c.model_dump(exclude_unset=True) async for c in typed]
    direct = await AsyncRawChatCompletions(root, http).create(**params)
    assert not isinstance(direct, openai.AsyncStream)  # not the SDK's stream
    async with direct:
        chunks = [c async for c in direct]
    again = await AsyncRawChatCompletions(root, http).create(**params)
    again_chunks = [c async for c in again]

    # Pieces of text that arrived together come joined: compare the streams fully joined.
    assert all(type(c) is dict for c in chunks)
    assert join_text_deltas(chunks) == join_text_deltas(again_chunks) == join_text_deltas(typed_chunks)
    sdk_request, direct_request, _ = llm_server.requests
    assert direct_request["path"] == sdk_request["path"] == "/v1/chat/completions?beta=1"
    assert direct_request["body"] == sdk_request["body"]  # extra_body merged the same way
    direct_headers = httpx.Headers(direct_request["headers"])  # (names in any case)
    sdk_headers = httpx.Headers(sdk_request["headers"])
    for header in ("authorization", "x-trace", "user-agent", "content-type"):
        assert direct_headers[header] == sdk_headers[header]
    await root.close()
    await http.aclose()


async def test_direct_stream_parses_sse_as_the_spec_says() -> None:
    chunk = {"id": "c", "object": "chat.completion.chunk", "choices": []}
    body = (
        b": keep-alive\n\n"  # a comment, then an event split over two data lines
        + b'data: {"id": "c", "object": "chat.completion.chunk",\ndata:"choices": []}\n\n'
        + b"event: ignored\nid: 7\n\n"
        + b"data: [DONE]\n\n"
        + b'data: {"after": "done"}\n\n'  # nothing after [DONE] is read as a chunk
    )
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, content=body, headers={"content-type": "text/plain"})

    root = openai.AsyncOpenAI(base_url=BASE_URL, api_key="k", max_retries=0)
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    stream = await AsyncRawChatCompletions(root, http).create(**PARAMS, stream=True)
    assert [c async for c in stream] == [chunk]
    assert stream.response.is_closed
    assert json.loads(requests[0].content)["stream"] is True
    await http.aclose()


def text_chunk(field: str, text: str, index: int = 0) -> dict[str, Any]:
    return {"id": "c", "choices": [{"index": index, "delta": {field: text}, "finish_reason": None}]}


def test_consecutive_pieces_of_one_text_are_joined_and_nothing_else_is() -> None:
    role = {"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    finish = {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    usage = {"id": "c", "choices": [], "usage": {"prompt_tokens": 1}}
    scored = text_chunk("content", "!")
    scored["choices"][0]["logprobs"] = {"content": []}
    chunks = [
        role,
        text_chunk("reasoning_content", "Passage "),
        text_chunk("reasoning_content", "1."),
        text_chunk("content", "Milvus "),
        {"id": "c", "choices": [{"index": 0, "delta": {"content": "keeps ", "reasoning_content": None}}]},
        text_chunk("content", "data", index=1),  # another choice: not the same text
        scored,
        text_chunk("content", "."),
        finish,
        usage,
    ]
    assert join_text_deltas(chunks) == [
        role,
        text_chunk("reasoning_content", "Passage 1."),
        text_chunk("content", "Milvus keeps "),
        text_chunk("content", "data", index=1),
        scored,
        text_chunk("content", "."),
        finish,
        usage,
    ]
    assert join_text_deltas([]) == []


def model_streaming(events: list[Any], done: bool = False) -> DeepSeekChat:
    """A streaming model whose every request gets `events` as one SSE body (then [DONE])."""
    sse = b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + (
        b"data: [DONE]\n\n" if done else b""
    )

    def handler(request: Any) -> Any:
        return openai_http.Response(200, headers={"content-type": "text/event-stream"}, content=sse)

    return DeepSeekChat(
        model_name="deepseek-v4-flash",
        api_key=SecretStr("sk-test"),
        api_base=BASE_URL,
        http_async_client=openai_http.AsyncClient(transport=openai_http.MockTransport(handler)),
        max_retries=0,
        streaming=True,
    )


async def test_a_burst_reaches_the_model_joined() -> None:
    base = {"id": "c", "object": "chat.completion.chunk", "model": "m"}
    pieces = tokens("Milvus keeps segments in object storage [1].")
    events = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        *({**base, "choices": [{"index": 0, "delta": {"content": t}}]} for t in pieces),
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    ]
    model = model_streaming(events, done=True)  # the whole body at once, as a burst arrives
    texts = [str(c.content) async for c in model.astream("hello") if c.content]
    assert texts == ["".join(pieces)] and len(pieces) > 3


async def test_tokens_are_not_held_back_to_be_joined(llm_server: LLMServer) -> None:
    llm_server.behaviour = Behaviour(reply=REPLY, stall_after=3)  # 3 tokens, then silence
    expected = "".join(tokens(REPLY)[:3])
    received = ""
    stream = served_llm(llm_server).astream("hello")
    try:
        async with asyncio.timeout(10):
            async for chunk in stream:
                received += str(chunk.content)
                if received == expected:
                    break  # all three, while the upstream still holds the rest back
        assert not llm_server.release.is_set()
    finally:
        await stream.aclose()
        llm_server.release.set()
    assert received == expected


async def test_closing_a_stream_mid_answer_ends_it_and_the_upstream_request(llm_server: LLMServer) -> None:
    llm_server.behaviour = Behaviour(reply=REPLY, stall_after=1)  # one token, then silence
    root = openai.AsyncOpenAI(base_url=llm_server.url, api_key=llm_server.api_key, max_retries=0)
    http = httpx.AsyncClient(timeout=30)
    stream = await AsyncRawChatCompletions(root, http).create(**PARAMS, stream=True)
    chunks = aiter(stream)
    try:
        async with asyncio.timeout(10):
            text = ""
            while text != tokens(REPLY)[0]:
                chunk = await anext(chunks)
                text += chunk["choices"][0]["delta"].get("content") or ""
            waiting = asyncio.ensure_future(anext(chunks))  # for a token that never comes
            await stream.close()
            with pytest.raises(openai.APIConnectionError):
                await waiting
        assert await asyncio.to_thread(llm_server.disconnected.wait, 10)
    finally:
        llm_server.release.set()
        await root.close()
        await http.aclose()


def test_sync_raw_request_matches_the_sdk_request(llm_server: LLMServer) -> None:
    root = openai.OpenAI(base_url=llm_server.url, api_key=llm_server.api_key, max_retries=0)
    typed = root.chat.completions.create(**PARAMS)
    raw = RawChatCompletions(root).create(**PARAMS)
    assert type(raw) is dict and raw == typed.model_dump(exclude_unset=True)
    stream = RawChatCompletions(root).create(**PARAMS, stream=True)
    assert isinstance(stream, openai.Stream)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in stream if c["choices"]) == (
        Behaviour().reply
    )
    sdk_request, raw_request, _ = llm_server.requests
    keys = ("path", "headers", "body")  # (not `received`, the arrival time)
    assert {k: raw_request[k] for k in keys} == {k: sdk_request[k] for k in keys}
    root.close()


def test_other_completions_methods_stay_on_the_sdk(llm_server: LLMServer) -> None:
    root = openai.OpenAI(base_url=llm_server.url, api_key=llm_server.api_key, max_retries=0)
    raw = RawChatCompletions(root)
    response = raw.with_raw_response.create(**PARAMS)
    assert response.headers["content-type"] == "application/json"
    assert isinstance(response.parse(), ChatCompletion)
    assert copy.copy(raw)._root is root  # no delegation loop before __init__ has run
    root.close()


@pytest.mark.parametrize("status", [500, 503])
async def test_server_errors_keep_their_openai_types(llm_server: LLMServer, status: int) -> None:
    llm_server.behaviour = Behaviour(fail_times=1, fail_status=status)
    with pytest.raises(openai.InternalServerError) as caught:
        [c async for c in served_llm(llm_server).astream("hello")]
    assert caught.value.status_code == status
    assert is_retryable(caught.value)
    assert f"injected {status}" in str(describe_llm_error(caught.value, llm_server.url))


async def test_rate_limits_keep_retry_after(llm_server: LLMServer) -> None:
    llm_server.behaviour = Behaviour(fail_times=2, fail_status=429, retry_after=2.5)
    llm = served_llm(llm_server)
    with pytest.raises(openai.RateLimitError) as caught:
        [c async for c in llm.astream("hello")]
    assert caught.value.status_code == 429
    assert retry_after(caught.value) == 2.5
    with pytest.raises(openai.RateLimitError) as sync_caught:
        llm.invoke("hello")
    assert retry_after(sync_caught.value) == 2.5


async def test_authentication_errors_keep_their_type(llm_server: LLMServer) -> None:
    llm = make_llm(Settings(_env_file=None, DEEPSEEK_BASE_URL=llm_server.url, DEEPSEEK_API_KEY="wrong"))
    with pytest.raises(openai.AuthenticationError):
        [c async for c in llm.astream("hello")]  # type: ignore[union-attr]


async def test_dropped_connections_are_connection_errors(llm_server: LLMServer) -> None:
    llm_server.behaviour = Behaviour(fail_times=1, fail_mode="disconnect")
    with pytest.raises(openai.APIConnectionError) as caught:
        [c async for c in served_llm(llm_server).astream("hello")]
    assert is_retryable(caught.value)


async def test_stalled_streams_time_out(llm_server: LLMServer) -> None:
    llm_server.behaviour = Behaviour(stall_after=1)
    with pytest.raises(openai.APITimeoutError):
        [c async for c in served_llm(llm_server, DEEPSEEK_TIMEOUT=0.3).astream("hello")]


@pytest.mark.parametrize("direct", [False, True])
async def test_per_call_timeout_reaches_the_request(llm_server: LLMServer, direct: bool) -> None:
    llm_server.behaviour = Behaviour(stall_after=0)
    root = openai.AsyncOpenAI(base_url=llm_server.url, api_key=llm_server.api_key, max_retries=0, timeout=60)
    http = httpx.AsyncClient(timeout=60) if direct else None
    stream = await AsyncRawChatCompletions(root, http).create(**{**PARAMS, "timeout": 0.3}, stream=True)
    with pytest.raises(openai.APITimeoutError):
        [c async for c in stream]
    await root.close()


async def test_an_error_event_mid_stream_still_raises() -> None:
    first = {"id": "c", "object": "chat.completion.chunk", "model": "m"}
    events = [
        {**first, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Mil"}}]},
        {"error": {"message": "server overloaded", "type": "server_error"}},
    ]
    model = model_streaming(events)
    assert isinstance(model.async_client, AsyncRawChatCompletions)
    received: list[str] = []
    with pytest.raises(openai.APIError, match="server overloaded"):
        async for chunk in model.astream("hello"):
            received.append(str(chunk.content))
    assert "".join(received) == "Mil"
