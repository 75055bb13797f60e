"""/v1/chat/completions and /v1/models on the real service (FAQ store, embedding model, the
test LLM server as DeepSeek), called with the real openai client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any, cast

import httpx
import openai
import pytest
from fastapi import FastAPI
from pydantic import SecretStr

from chains.llm import make_llm
from server import create_app
from settings import Settings
from tests.integration.conftest import QUESTION, SECTION, faq_service, serve_in_thread, with_llm
from tests.llm_server import LLMServer

pytestmark = pytest.mark.integration

CHAT_PATH = "/v1/chat/completions"


def build_app(settings: Settings, embeddings: Any, llm: Any = "auto") -> FastAPI:
    """server.create_app over the FAQ store (it mounts the OpenAI routes)."""
    service = faq_service(settings, embeddings, llm=make_llm(settings) if llm == "auto" else llm)
    return create_app(service=service)


@asynccontextmanager
async def openai_client(app: FastAPI, api_key: str = "unused") -> AsyncIterator[openai.AsyncOpenAI]:
    async with app.router.lifespan_context(app):
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
        # cast: openai 3 is typed for httpx2 clients and takes httpx ones as well.
        async with openai.AsyncOpenAI(
            base_url="http://test/v1", api_key=api_key, http_client=cast(Any, http)
        ) as client:
            yield client


def sources_of(response: Any) -> list[dict[str, Any]]:
    assert response.model_extra is not None
    return cast(list[dict[str, Any]], response.model_extra["sources"])


async def test_plain_answer_comes_from_the_llm_with_faq_sources(
    faq_db: Settings, embeddings: Any, llm_server: LLMServer
) -> None:
    settings = with_llm(faq_db, llm_server)
    async with openai_client(build_app(settings, embeddings)) as client:
        completion = await client.chat.completions.create(
            model=settings.deepseek_model,
            messages=[
                {"role": "system", "content": "Talk like a pirate."},
                {"role": "user", "content": QUESTION},
            ],
        )
    assert completion.choices[0].message.content == llm_server.behaviour.reply
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.model_dump(exclude_none=True) == llm_server.behaviour.usage
    sources = sources_of(completion)
    assert sources[0]["source"].endswith("product_faq.md") and SECTION in sources[0]["headers"]
    assert [s["n"] for s in sources] == list(range(1, len(sources) + 1))
    # The service's prompt went to the LLM, not the client's system message.
    sent = json.dumps(llm_server.requests[-1]["body"]["messages"])
    assert "pirate" not in sent and QUESTION in sent


async def test_streamed_answer_and_usage(faq_db: Settings, embeddings: Any, llm_server: LLMServer) -> None:
    llm_server.behaviour.token_delay = 0.02  # paced as DeepSeek streams (a burst arrives joined)
    settings = with_llm(faq_db, llm_server)
    async with openai_client(build_app(settings, embeddings)) as client:
        stream = await client.chat.completions.create(
            model=settings.deepseek_model,
            messages=[{"role": "user", "content": QUESTION}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert SECTION in sources_of(chunks[0])[0]["headers"]
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(content) == llm_server.behaviour.reply and len(content) > 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump(exclude_none=True) == llm_server.behaviour.usage


async def test_thinking_streams_reasoning_apart_from_the_answer(
    faq_db: Settings, embeddings: Any, llm_server: LLMServer
) -> None:
    settings = with_llm(faq_db, llm_server)
    llm_server.behaviour.reasoning = "The first passage names object storage."
    async with openai_client(build_app(settings, embeddings)) as client:
        stream = await client.chat.completions.create(
            model=settings.deepseek_model,
            messages=[{"role": "user", "content": QUESTION}],
            stream=True,
            extra_body={"thinking": True},
        )
        deltas = [chunk.choices[0].delta async for chunk in stream if chunk.choices]
        plain = await client.chat.completions.create(
            model=settings.deepseek_model, messages=[{"role": "user", "content": QUESTION}]
        )
    reasoning = "".join((d.model_extra or {}).get("reasoning_content", "") for d in deltas)
    assert reasoning == llm_server.behaviour.reasoning
    assert "".join(d.content or "" for d in deltas) == llm_server.behaviour.reply
    # Thinking was asked for the streamed request only.
    assert llm_server.requests[0]["body"]["thinking"] == {"type": "enabled"}
    assert llm_server.requests[-1]["body"]["thinking"] == {"type": "disabled"}
    assert plain.choices[0].message.content == llm_server.behaviour.reply
    assert "reasoning_content" not in (plain.choices[0].message.model_extra or {})


async def test_retrieval_fields_filter_and_size_the_sources(faq_db: Settings, embeddings: Any) -> None:
    async with openai_client(build_app(faq_db, embeddings, llm=None)) as client:
        completion = await client.chat.completions.create(
            model=faq_db.deepseek_model,
            messages=[{"role": "user", "content": QUESTION}],
            extra_body={"k": 2, "search": "dense", "source": "troubleshooting.md"},
        )
    assert [s["source"] for s in sources_of(completion)] == ["troubleshooting.md"] * 2
    # Without DEEPSEEK_API_KEY the answer says so and lists the passages.
    assert "DEEPSEEK_API_KEY" in (completion.choices[0].message.content or "")


async def test_a_k_above_the_limit_is_a_422_the_client_raises(faq_db: Settings, embeddings: Any) -> None:
    async with openai_client(build_app(faq_db, embeddings, llm=None)) as client:
        for stream in (False, True):
            with pytest.raises(openai.UnprocessableEntityError, match="k must be between"):
                await client.chat.completions.create(
                    model=faq_db.deepseek_model,
                    messages=[{"role": "user", "content": QUESTION}],
                    stream=stream,
                    extra_body={"k": 500},
                )


async def test_models_and_unknown_model(faq_db: Settings, embeddings: Any) -> None:
    async with openai_client(build_app(faq_db, embeddings, llm=None)) as client:
        models = [m.id async for m in client.models.list()]
        with pytest.raises(openai.NotFoundError) as raised:
            await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": QUESTION}]
            )
    assert models == faq_db.model_list
    assert raised.value.code == "model_not_found"


async def test_llm_failures_reach_the_openai_client(
    faq_db: Settings, embeddings: Any, llm_server: LLMServer
) -> None:
    settings = with_llm(faq_db, llm_server)
    llm_server.behaviour.fail_times = 100
    llm_server.behaviour.fail_status = 503
    async with openai_client(build_app(settings, embeddings)) as client:
        with pytest.raises(openai.APIStatusError) as plain:
            await client.chat.completions.create(
                model=settings.deepseek_model, messages=[{"role": "user", "content": QUESTION}]
            )
        stream = await client.chat.completions.create(
            model=settings.deepseek_model, messages=[{"role": "user", "content": QUESTION}], stream=True
        )
        with pytest.raises(openai.APIError, match="503"):
            async for _ in stream:
                pass
    assert plain.value.status_code == 502 and "503" in plain.value.message


async def test_api_keys_guard_the_openai_routes(faq_db: Settings, embeddings: Any) -> None:
    settings = faq_db.model_copy(update={"api_keys": SecretStr("k1")})
    app = build_app(settings, embeddings, llm=None)
    async with openai_client(app, api_key="wrong") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
    async with openai_client(app, api_key="k1") as client:
        completion = await client.chat.completions.create(
            model=settings.deepseek_model, messages=[{"role": "user", "content": QUESTION}]
        )
    assert SECTION in sources_of(completion)[0]["headers"]


@pytest.fixture
def live_server(faq_db: Settings, embeddings: Any, llm_server: LLMServer) -> Iterator[str]:
    """A real uvicorn on a free port: ASGITransport buffers whole responses, so only a real
    server shows a client leaving mid-stream."""
    with serve_in_thread(build_app(with_llm(faq_db, llm_server), embeddings)) as url:
        yield url


async def test_a_client_leaving_mid_stream_cancels_the_llm_request(
    live_server: str, faq_db: Settings, llm_server: LLMServer
) -> None:
    llm_server.behaviour.stall_after = 2  # two tokens, then the upstream holds the stream open
    body = {
        "model": faq_db.deepseek_model,
        "messages": [{"role": "user", "content": QUESTION}],
        "stream": True,
    }
    async with (
        httpx.AsyncClient(base_url=live_server, timeout=30) as client,
        client.stream("POST", CHAT_PATH, json=body) as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if '"content":"Milvus' in line.replace(" ", ""):
                break  # leave after the first answer token
    # The upstream request is closed although the LLM server never finished its answer.
    assert await asyncio.to_thread(llm_server.disconnected.wait, 15)
