"""make_llm and describe_llm_error, with the OpenAI client on a mock transport."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from pydantic import SecretStr

from chains.llm import DeepSeekChat, describe_llm_error, make_llm, thinking_body
from errors import LLMError, RagError
from settings import Settings
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
