"""make_llm, thinking and describe_llm_error: ChatDeepSeek over real HTTP to tests/llm_server.py."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
import openai
import pytest
from langchain_deepseek import ChatDeepSeek
from pydantic import SecretStr

from chains.llm import describe_llm_error, is_retryable, make_llm, retry_after, thinking_body, with_thinking
from errors import LLMError, LLMTimeoutError, RagError
from settings import Settings
from tests.llm_server import Behaviour, LLMServer, tokens
from tests.unit.fakes import openai_http

BASE_URL = "http://deepseek.invalid/v1"
REPLY = "Milvus keeps segments in object storage [1]."
REASONING = "Passage 1 says so."


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **{"DEEPSEEK_BASE_URL": BASE_URL, **values})


def served_llm(server: LLMServer, **values: Any) -> Any:
    llm = make_llm(
        Settings(
            _env_file=None,
            **{"DEEPSEEK_BASE_URL": server.url, "DEEPSEEK_API_KEY": server.api_key, **values},
        )
    )
    assert llm is not None
    return llm


@pytest.mark.parametrize("key", [None, ""])
def test_no_key_means_no_llm(key: str | None) -> None:
    assert make_llm(settings(DEEPSEEK_API_KEY=key)) is None


def test_with_a_key_it_is_chat_deepseek_on_the_configured_endpoint() -> None:
    llm = make_llm(settings(DEEPSEEK_API_KEY="sk-test", DEEPSEEK_MODEL="deepseek-v4-pro", DEEPSEEK_TIMEOUT=7))
    assert llm is not None
    model = llm.default  # type: ignore[attr-defined]
    assert isinstance(model, ChatDeepSeek)
    assert model.model_name == "deepseek-v4-pro"
    assert model.api_base == BASE_URL
    assert isinstance(model.api_key, SecretStr) and model.api_key.get_secret_value() == "sk-test"
    timeout = model.request_timeout
    assert isinstance(timeout, httpx.Timeout) and timeout.read == 7 and timeout.connect == 7
    assert model.max_retries == 0  # retries happen in the answer stream, before the first token
    assert model.temperature == 0.0


def test_thinking_body_switches_deepseek_thinking() -> None:
    assert thinking_body(True) == {"thinking": {"type": "enabled"}}
    assert thinking_body(False) == {"thinking": {"type": "disabled"}}


def test_only_listed_models_can_be_chosen_per_request() -> None:
    llm = make_llm(settings(DEEPSEEK_API_KEY="sk-test", DEEPSEEK_MODELS="deepseek-v4-pro,other-model"))
    assert llm is not None
    spec = {s.id: s for s in llm.config_specs}
    assert set(spec) == {"model", "temperature"}
    assert spec["model"].default == "deepseek-v4-flash"
    assert set(spec["model"].annotation.__members__.values()) == {  # type: ignore[union-attr]
        "deepseek-v4-flash",
        "deepseek-v4-pro",
        "other-model",
    }
    # In process an unknown id fails before any request; over HTTP, LangServe answers 422.
    with pytest.raises(KeyError):
        llm.with_config(configurable={"model": "gpt-4"}).invoke("hello")


# Requests, over HTTP


async def test_request_carries_model_key_and_thinking_disabled(llm_server: LLMServer) -> None:
    reply = await served_llm(llm_server).ainvoke("hello")

    assert reply.content == llm_server.behaviour.reply
    (request,) = llm_server.requests
    assert request["path"] == "/v1/chat/completions"
    assert httpx.Headers(request["headers"])["authorization"] == f"Bearer {llm_server.api_key}"
    body = request["body"]
    assert body["model"] == "deepseek-v4-flash"
    assert body["thinking"] == {"type": "disabled"}  # V4 would think unless told not to
    assert body["temperature"] == 0.0
    assert body["messages"][-1] == {"role": "user", "content": "hello"}
    assert not {"extra_body", "extra_headers", "extra_query", "timeout"} & set(body)


async def test_per_request_model_temperature_and_thinking_reach_the_request(llm_server: LLMServer) -> None:
    llm_server.behaviour = Behaviour(reply=REPLY, reasoning=REASONING)
    llm = served_llm(llm_server)

    await llm.with_config(configurable={"model": "deepseek-v4-pro", "temperature": 0.7}).ainvoke("hello")
    await with_thinking(llm, True).ainvoke("hello")
    await with_thinking(llm, False).ainvoke("hello")
    await llm.ainvoke("hello")  # the model as built: the copies above changed nothing

    configured, thinking, not_thinking, plain = (r["body"] for r in llm_server.requests)
    assert (configured["model"], configured["temperature"], configured["thinking"]) == (
        "deepseek-v4-pro",
        0.7,
        {"type": "disabled"},
    )
    assert (thinking["model"], thinking["thinking"]) == ("deepseek-v4-flash", {"type": "enabled"})
    assert not_thinking["thinking"] == {"type": "disabled"}
    assert (plain["model"], plain["temperature"], plain["thinking"]) == (
        "deepseek-v4-flash",
        0.0,
        {"type": "disabled"},
    )


async def test_streams_keep_usage_with_deepseek_cache_counts(llm_server: LLMServer) -> None:
    llm_server.behaviour = Behaviour(reply=REPLY)
    chunks = [c async for c in served_llm(llm_server).astream("hello")]

    assert "".join(str(c.content) for c in chunks) == REPLY
    body = llm_server.requests[0]["body"]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
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


async def test_thinking_streams_reasoning_apart_from_the_answer(llm_server: LLMServer) -> None:
    llm_server.behaviour = Behaviour(reply=REPLY, reasoning=REASONING)
    llm = served_llm(llm_server)

    chunks = [c async for c in with_thinking(llm, True).astream("hello")]
    plain = [c async for c in llm.astream("hello")]

    reasoning = "".join(c.additional_kwargs.get("reasoning_content", "") for c in chunks)
    assert reasoning == REASONING
    assert "".join(str(c.content) for c in chunks) == REPLY  # never mixed into the answer
    first_answer = next(i for i, c in enumerate(chunks) if c.content)
    assert all(not c.additional_kwargs.get("reasoning_content") for c in chunks[first_answer:])
    assert not any(c.additional_kwargs.get("reasoning_content") for c in plain)


@pytest.mark.parametrize("thinking", [False, True])
async def test_non_streamed_answers_keep_usage_and_reasoning(llm_server: LLMServer, thinking: bool) -> None:
    llm_server.behaviour = Behaviour(reply=REPLY, reasoning=REASONING)
    llm = with_thinking(served_llm(llm_server), thinking)

    replies = [await llm.ainvoke("hello", stream=False), llm.invoke("hello", stream=False)]

    assert [r["body"]["stream"] for r in llm_server.requests] == [False, False]
    for reply in replies:
        assert reply.content == REPLY
        assert reply.usage_metadata["input_tokens"] == 100
        assert reply.usage_metadata["output_tokens"] == 10
        assert reply.usage_metadata["input_token_details"] == {"cache_read": 64}
        assert reply.additional_kwargs.get("reasoning_content") == (REASONING if thinking else None)


async def test_tokens_arrive_as_they_are_sent(llm_server: LLMServer) -> None:
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


async def test_closing_a_stream_mid_answer_closes_the_upstream_request(llm_server: LLMServer) -> None:
    llm_server.behaviour = Behaviour(reply=REPLY, stall_after=1)  # one token, then silence
    stream = served_llm(llm_server).astream("hello")
    async with asyncio.timeout(10):
        async for chunk in stream:
            if chunk.content:
                break
    await stream.aclose()
    assert await asyncio.to_thread(llm_server.disconnected.wait, 10)


def test_one_model_answers_on_two_event_loops(llm_server: LLMServer) -> None:
    # The server answers on its loop, synchronous callers on a background one (chains/rag.py):
    # each loop gets connections of its own (PerLoopTransport).
    llm = served_llm(llm_server)
    background = asyncio.new_event_loop()
    thread = threading.Thread(target=background.run_forever, daemon=True)
    thread.start()

    async def answer() -> str:
        return "".join([str(c.content) async for c in llm.astream("hello")])

    try:
        answers = [
            asyncio.run(answer()),
            asyncio.run_coroutine_threadsafe(answer(), background).result(30),
            asyncio.run_coroutine_threadsafe(answer(), background).result(30),
        ]
    finally:
        background.call_soon_threadsafe(background.stop)
        thread.join(10)
        background.close()
    assert answers == [llm_server.behaviour.reply] * 3


# Errors keep the openai SDK's types, and read well in ours


@pytest.mark.parametrize("status", [500, 503])
async def test_server_errors_keep_their_openai_types(llm_server: LLMServer, status: int) -> None:
    llm_server.behaviour = Behaviour(fail_times=1, fail_status=status)
    with pytest.raises(openai.InternalServerError) as caught:
        [c async for c in served_llm(llm_server).astream("hello")]
    assert caught.value.status_code == status
    assert is_retryable(caught.value)
    error = describe_llm_error(caught.value, llm_server.url)
    assert isinstance(error, LLMError) and f"DeepSeek answered {status}" in str(error)
    assert f"injected {status}" in str(error) and llm_server.url in str(error)


async def test_rate_limits_keep_retry_after(llm_server: LLMServer) -> None:
    llm_server.behaviour = Behaviour(fail_times=2, fail_status=429, retry_after=2.5)
    llm = served_llm(llm_server)
    with pytest.raises(openai.RateLimitError) as caught:
        [c async for c in llm.astream("hello")]
    assert caught.value.status_code == 429 and is_retryable(caught.value)
    assert retry_after(caught.value) == 2.5
    with pytest.raises(openai.RateLimitError) as sync_caught:
        llm.invoke("hello")
    assert retry_after(sync_caught.value) == 2.5
    assert "429" in str(describe_llm_error(caught.value))


async def test_authentication_errors_keep_their_type(llm_server: LLMServer) -> None:
    llm = make_llm(Settings(_env_file=None, DEEPSEEK_BASE_URL=llm_server.url, DEEPSEEK_API_KEY="wrong"))
    with pytest.raises(openai.AuthenticationError) as caught:
        [c async for c in llm.astream("hello")]  # type: ignore[union-attr]
    assert not is_retryable(caught.value)
    assert "DEEPSEEK_API_KEY" in str(describe_llm_error(caught.value))


async def test_dropped_connections_are_connection_errors(llm_server: LLMServer) -> None:
    llm_server.behaviour = Behaviour(fail_times=1, fail_mode="disconnect")
    with pytest.raises(openai.APIConnectionError) as caught:
        [c async for c in served_llm(llm_server).astream("hello")]
    assert is_retryable(caught.value)


async def test_a_connection_dropped_mid_answer_is_a_connection_error(llm_server: LLMServer) -> None:
    llm_server.behaviour = Behaviour(reply=REPLY, drop_after=2)
    received: list[str] = []
    with pytest.raises(openai.APIConnectionError) as caught:
        async for chunk in served_llm(llm_server).astream("hello"):
            received.append(str(chunk.content))
    assert "".join(received) == "".join(tokens(REPLY)[:2])
    assert is_retryable(caught.value)


async def test_stalled_streams_time_out(llm_server: LLMServer) -> None:
    llm_server.behaviour = Behaviour(stall_after=1)
    with pytest.raises(openai.APITimeoutError) as caught:
        [c async for c in served_llm(llm_server, DEEPSEEK_TIMEOUT=0.3).astream("hello")]
    assert isinstance(describe_llm_error(caught.value), LLMTimeoutError)


async def test_an_error_event_mid_stream_raises_with_its_message(llm_server: LLMServer) -> None:
    llm_server.behaviour = Behaviour(reply=REPLY, error_after=2)
    received: list[str] = []
    with pytest.raises(openai.APIError, match="injected stream error") as caught:
        async for chunk in served_llm(llm_server).astream("hello"):
            received.append(str(chunk.content))
    assert "".join(received) == "".join(tokens(REPLY)[:2])
    error = describe_llm_error(caught.value, llm_server.url)
    assert isinstance(error, LLMError) and "injected stream error" in str(error)


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
    assert isinstance(error, LLMTimeoutError)
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


def test_retry_after_needs_a_number() -> None:
    def limited(value: str) -> openai.RateLimitError:
        response = openai_http.Response(429, request=_request(), headers={"retry-after": value}, json={})
        return openai.RateLimitError("slow down", response=response, body=None)

    assert retry_after(limited("3")) == 3.0
    assert retry_after(limited("soon")) is None
    assert retry_after(ValueError("not an HTTP error")) is None


def test_other_exceptions_are_not_llm_errors() -> None:
    assert describe_llm_error(ValueError("unrelated"), BASE_URL) is None
    assert describe_llm_error(KeyError("answer"), BASE_URL) is None
    assert not is_retryable(ValueError("unrelated"))


def test_llm_error_status_code() -> None:
    assert LLMError("x").status_code == 502
