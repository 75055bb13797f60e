"""Request limits on every route, tried as an abusive client would, over real HTTP: bodies over
RAG_MAX_BODY_MB, 422s that would echo the input, batches over RAG_MAX_BATCH, a rate per key,
and OpenAI fields that would change the answer."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest
from langserve import RemoteRunnable
from pydantic import SecretStr

from chains.llm import make_llm
from server import create_app
from settings import Settings
from tests.integration.conftest import QUESTION, faq_service, serve_in_thread, with_llm
from tests.integration.test_documents_api import raw_post
from tests.llm_server import LLMServer

pytestmark = pytest.mark.integration


@contextmanager
def served(settings: Settings, embeddings: Any, **limits: Any) -> Iterator[str]:
    """The app over the FAQ store with these settings changed, under a real uvicorn."""
    settings = settings.model_copy(update=limits)
    llm = make_llm(settings) if settings.llm_configured else None
    with serve_in_thread(create_app(service=faq_service(settings, embeddings, llm))) as url:
        yield url


def test_a_body_over_the_limit_is_refused_before_it_is_read(faq_db: Settings, embeddings: Any) -> None:
    with served(faq_db, embeddings, max_body_mb=0.05) as url:
        json_body = {"Content-Type": "application/json"}
        # 120 MB announced, 64 kB sent: the answer comes without the rest.
        status, body = raw_post(
            url, "/rag/invoke", {**json_body, "Content-Length": str(120 * 2**20)}, b" " * 65536, False
        )
        assert status == 413 and b"RAG_MAX_BODY_MB" in body
        status, body = raw_post(
            url, "/chat/batch", {**json_body, "Transfer-Encoding": "chunked"}, b" " * 200_000, True
        )
        assert status == 413 and b"larger than 52428 bytes" in body
        # OpenAI clients get the reason in OpenAI's error shape.
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(
                model="deepseek-v4-flash", messages=[{"role": "user", "content": "x" * 60_000}]
            )
        assert caught.value.status_code == 413 and "RAG_MAX_BODY_MB" in caught.value.message
        # Below the limit nothing changes.
        answer = httpx.post(f"{url}/retriever/invoke", json={"input": QUESTION})
        assert answer.status_code == 200


def test_validation_errors_do_not_echo_the_request(faq_db: Settings, embeddings: Any) -> None:
    secret = "SECRET-TOKEN-0123456789"
    with served(faq_db, embeddings) as url:
        for path, body in [
            ("/rag/invoke", {"input": {"question": [secret] * 100}}),
            (
                "/chat/invoke",
                {"input": {"question": secret, "chat_history": [{"role": "system", "content": secret}]}},
            ),
            ("/retriever/batch", {"inputs": [{"query": secret}]}),
        ]:
            response = httpx.post(f"{url}{path}", json=body)
            assert response.status_code == 422, (path, response.text)
            assert secret not in response.text
            assert all("input" not in error for error in response.json()["detail"] if isinstance(error, dict))
        jobs = httpx.get(f"{url}/jobs", params={"limit": secret})
        assert jobs.status_code == 422 and secret not in jobs.text
        assert jobs.json()["detail"][0]["loc"] == ["query", "limit"] and jobs.json()["detail"][0]["msg"]


def test_batches_are_capped_and_every_input_counts_against_the_rate(
    faq_db: Settings, embeddings: Any
) -> None:
    with served(faq_db, embeddings, max_batch=3, rate_limit=6.0, rate_burst=4) as url:
        retriever: RemoteRunnable = RemoteRunnable(f"{url}/retriever/")
        with pytest.raises(httpx.HTTPStatusError) as caught:
            retriever.batch([QUESTION] * 4)
        assert caught.value.response.status_code == 422
        assert "at most 3 inputs (RAG_MAX_BATCH); this one has 4" in caught.value.response.text

        assert len(retriever.batch([QUESTION] * 3)) == 3  # 3 of the 4 requests of the burst
        assert httpx.post(f"{url}/retriever/invoke", json={"input": QUESTION}).status_code == 200
        refused = httpx.post(f"{url}/retriever/invoke", json={"input": QUESTION})
        # 6 a minute: the next request is 10 s away at most.
        assert refused.status_code == 429 and 1 <= int(refused.headers["Retry-After"]) <= 10
        assert "RAG_RATE_LIMIT" in refused.json()["detail"]
        assert httpx.get(f"{url}/health").status_code == 200  # never limited


def test_the_rate_is_per_key(faq_db: Settings, embeddings: Any, llm_server: LLMServer) -> None:
    settings = with_llm(faq_db, llm_server)
    keys = SecretStr("key-a,key-b")
    with served(settings, embeddings, api_keys=keys, rate_limit=6.0, rate_burst=2, max_batch=2) as url:
        first = openai.OpenAI(base_url=f"{url}/v1", api_key="key-a", max_retries=0)
        for _ in range(2):
            first.chat.completions.create(
                model="deepseek-v4-flash", messages=[{"role": "user", "content": QUESTION}]
            )
        with pytest.raises(openai.RateLimitError) as caught:
            first.models.list()
        assert "too many requests" in caught.value.message
        assert caught.value.response.headers["Retry-After"]
        # Another key has its own bucket; a wrong key is refused before counting.
        other = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer key-b"})
        assert other.status_code == 200
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401


REFUSED_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"n": 3}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
        "response_format",
    ),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logprobs": True}, "logprobs"),
    ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ({"modalities": ["text", "audio"]}, "modalities"),
]


def test_openai_fields_that_would_change_the_answer_are_refused(
    faq_db: Settings, embeddings: Any, llm_server: LLMServer
) -> None:
    with served(with_llm(faq_db, llm_server), embeddings) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        messages: Any = [{"role": "user", "content": QUESTION}]
        for fields, param in REFUSED_FIELDS:
            with pytest.raises(openai.BadRequestError) as caught:
                client.chat.completions.create(model="deepseek-v4-flash", messages=messages, **fields)
            assert caught.value.param == param and caught.value.code == "unsupported_parameter", fields
            message = caught.value.message
            assert re.search(rf"\b{param}\b.* (is|are) not supported", message), message
        assert llm_server.requests == []  # refused before any LLM call
        # What doesn't change the answer is accepted: n=1, text format, sampling hints.
        answer = client.chat.completions.create(
            model="deepseek-v4-flash",
            messages=messages,
            n=1,
            response_format={"type": "text"},
            max_tokens=50,
            top_p=0.9,
            tool_choice="none",
        )
        assert answer.choices[0].message.content == llm_server.behaviour.reply
