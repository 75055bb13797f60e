"""make_llm and describe_llm_error, with the OpenAI client on a mock transport."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from langchain_openai import ChatOpenAI
from pydantic import SecretStr

from chains.llm import describe_llm_error, make_llm, thinking_body
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
    assert isinstance(llm, ChatOpenAI)
    assert llm.model_name == "deepseek-v4-pro"
    assert llm.openai_api_base == BASE_URL
    assert isinstance(llm.openai_api_key, SecretStr)
    assert llm.openai_api_key.get_secret_value() == "sk-test"
    assert llm.request_timeout == 7
    assert llm.extra_body == {"thinking": {"type": "disabled"}}
    assert llm.temperature == 0.0


def test_thinking_can_be_enabled() -> None:
    assert thinking_body(True) == {"thinking": {"type": "enabled"}}
    llm = make_llm(settings(DEEPSEEK_API_KEY="sk-test"), thinking=True)
    assert llm is not None
    assert llm.extra_body == {"thinking": {"type": "enabled"}}


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


def test_request_carries_model_key_and_thinking_disabled() -> None:
    captured: list[Any] = []

    def handler(request: Any) -> Any:
        captured.append(request)
        return openai_http.Response(200, json=chat_completion("fine [1]"))

    llm = make_llm(settings(DEEPSEEK_API_KEY="sk-test"))
    assert llm is not None
    http_client = openai.DefaultHttpxClient(transport=openai_http.MockTransport(handler))
    llm.root_client = llm.root_client.with_options(http_client=http_client, max_retries=0)
    llm.client = llm.root_client.chat.completions

    reply = llm.invoke("hello")

    assert reply.content == "fine [1]"
    (request,) = captured
    assert str(request.url) == f"{BASE_URL}/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    body = json.loads(request.content)
    assert body["model"] == "deepseek-v4-flash"
    assert body["thinking"] == {"type": "disabled"}
    assert body["messages"][-1] == {"role": "user", "content": "hello"}


def _request() -> Any:
    return openai_http.Request("POST", f"{BASE_URL}/chat/completions")


def _response(status: int) -> Any:
    return openai_http.Response(status, request=_request(), json={"error": {"message": "nope"}})


def test_authentication_error_is_explained() -> None:
    exc = openai.AuthenticationError("Incorrect API key", response=_response(401), body=None)
    error = describe_llm_error(exc, settings())
    assert isinstance(error, LLMError) and isinstance(error, RagError)
    message = str(error)
    assert "401" in message and "DEEPSEEK_API_KEY" in message and BASE_URL in message
    assert "\n" not in message


def test_connection_error_is_explained() -> None:
    error = describe_llm_error(openai.APIConnectionError(request=_request()), settings())
    assert isinstance(error, LLMError)
    assert "cannot reach" in str(error) and BASE_URL in str(error) and "DEEPSEEK_BASE_URL" in str(error)


def test_timeout_is_not_reported_as_unreachable() -> None:
    error = describe_llm_error(openai.APITimeoutError(request=_request()), settings())
    assert isinstance(error, LLMError)
    assert "in time" in str(error)


def test_rate_limit_and_other_statuses() -> None:
    limited = describe_llm_error(
        openai.RateLimitError("slow down", response=_response(429), body=None), settings()
    )
    assert limited is not None and "429" in str(limited)
    server = describe_llm_error(
        openai.InternalServerError("upstream exploded", response=_response(500), body=None), settings()
    )
    assert server is not None and "500" in str(server) and "upstream exploded" in str(server)


def test_other_exceptions_are_not_llm_errors() -> None:
    assert describe_llm_error(ValueError("unrelated"), settings()) is None
    assert describe_llm_error(KeyError("answer"), settings()) is None


def test_llm_error_status_code() -> None:
    assert LLMError("x").status_code == 502
