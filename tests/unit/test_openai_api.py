"""The OpenAI-compatible routes with a fake RAG chain: raw HTTP and the real openai client."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import httpx
import openai
import pytest
from fastapi import FastAPI
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.runnables import RunnableConfig, RunnableGenerator
from langchain_core.runnables.utils import AddableDict
from starlette.types import Message

from errors import InputError, LLMError, StoreError
from openai_api import make_openai_router

MODELS = ["deepseek-v4-flash", "deepseek-v4-pro"]
DEFAULT_MODEL = "deepseek-v4-flash"
QUESTION = "Where does Milvus store data?"
SOURCES = [
    {
        "n": 1,
        "source": "faq/product_faq.md",
        "headers": ["Product FAQ", "Where does Milvus store data?"],
        "text": "Inserted data are stored in MinIO or S3.",
        "score": 0.83,
    },
    {
        "n": 2,
        "source": "faq/operational_faq.md",
        "headers": ["Operational FAQ", "CPU"],
        "text": "Run lscpu to check SIMD support.",
        "score": 0.41,
    },
]
ANSWER_TOKENS = ["Milvus stores ", "data in ", "MinIO or S3 [1]."]
ANSWER = "".join(ANSWER_TOKENS)
REASONING_TOKENS = ["The passage ", "says MinIO."]
USAGE = {
    "prompt_tokens": 120,
    "completion_tokens": 12,
    "total_tokens": 132,
    "prompt_cache_hit_tokens": 64,
    "prompt_cache_miss_tokens": 56,
}


def error_chunk(error: Exception) -> AddableDict:
    """The chunk the chain sends before it raises an error mid-stream."""
    return AddableDict(error={"status_code": getattr(error, "status_code", 500), "message": str(error)})


@dataclass
class FakeRag:
    """The RAG chain's streaming contract, scripted; records what each call got."""

    reasoning: bool = False
    usage: bool = True
    condensed: str | None = None
    # Raise this after the first answer token, after an error chunk if `error_chunk`.
    fail_midway: Exception | None = None
    error_chunk: bool = True
    # Raise this before yielding anything.
    fail_first: Exception | None = None
    # Raise this after the `question` chunk (and an error chunk), before the sources.
    fail_before_sources: Exception | None = None
    # After the first answer token, wait until cancelled or closed.
    hang: bool = False
    inputs: list[dict[str, Any]] = field(default_factory=list)
    configs: list[RunnableConfig] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    finished: bool = False

    async def transform(
        self, inputs: AsyncIterator[dict[str, Any]], config: RunnableConfig
    ) -> AsyncIterator[AddableDict]:
        # AddableDict: RunnableGenerator.ainvoke adds the chunks up, like the real chain's output.
        async for chunk in inputs:
            self.inputs.append(chunk)
        self.configs.append(config)
        try:
            if self.fail_first is not None:
                raise self.fail_first
            if self.condensed is not None:
                yield AddableDict(question=self.condensed)
            if self.fail_before_sources is not None:
                error = self.fail_before_sources
                yield error_chunk(error)
                raise error
            yield AddableDict(sources=SOURCES)
            if self.reasoning:
                for token in REASONING_TOKENS:
                    yield AddableDict(reasoning=token)
            for i, token in enumerate(ANSWER_TOKENS):
                yield AddableDict(answer=token)
                if i == 0 and self.fail_midway is not None:
                    error = self.fail_midway
                    if self.error_chunk:
                        yield error_chunk(error)
                    raise error
                if i == 0 and self.hang:
                    await asyncio.Event().wait()
            if self.usage:
                yield AddableDict(usage=dict(USAGE))
            self.finished = True
        finally:
            self.closed.set()

    @property
    def configurable(self) -> dict[str, Any]:
        return dict(self.configs[-1].get("configurable") or {})

    def runnable(self) -> RunnableGenerator:
        # cast: RunnableGenerator passes `config` to transforms that take it, its types don't say so.
        return RunnableGenerator(cast(Any, self.transform))


def make_app(fake: FakeRag) -> FastAPI:
    app = FastAPI()
    app.include_router(make_openai_router(fake.runnable(), MODELS, DEFAULT_MODEL))
    return app


def http_client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def openai_client(app: FastAPI) -> openai.AsyncOpenAI:
    # cast: openai 3 is typed for httpx2 clients and takes httpx ones as well.
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=cast(Any, http_client(app)))


def request_body(**extra: Any) -> dict[str, Any]:
    return {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": QUESTION}], **extra}


def sse_data(text: str) -> list[Any]:
    """The `data:` payloads of an event stream, JSON-decoded except `[DONE]`."""
    payloads: list[Any] = []
    for event in text.split("\n\n"):
        for line in event.splitlines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


# Plain completions


async def test_plain_completion_has_openai_shape_sources_and_usage() -> None:
    fake = FakeRag()
    async with http_client(make_app(fake)) as client:
        response = await client.post("/v1/chat/completions", json=request_body())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and body["model"] == DEFAULT_MODEL
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}
    ]
    assert body["usage"] == USAGE
    assert body["sources"] == SOURCES


async def test_plain_completion_through_the_openai_client() -> None:
    fake = FakeRag()
    async with openai_client(make_app(fake)) as client:
        completion = await client.chat.completions.create(
            model="deepseek-v4-pro", messages=[{"role": "user", "content": QUESTION}]
        )
    assert completion.choices[0].message.content == ANSWER
    assert completion.model == "deepseek-v4-pro"
    assert completion.model_extra is not None and completion.model_extra["sources"] == SOURCES
    assert completion.usage is not None and completion.usage.total_tokens == 132
    assert completion.usage.model_extra == {"prompt_cache_hit_tokens": 64, "prompt_cache_miss_tokens": 56}
    assert fake.inputs == [{"question": QUESTION, "chat_history": []}]
    assert fake.configurable == {"model": "deepseek-v4-pro"}


async def test_plain_completion_without_usage_leaves_usage_out() -> None:
    async with http_client(make_app(FakeRag(usage=False))) as client:
        body = (await client.post("/v1/chat/completions", json=request_body())).json()
    assert "usage" not in body and body["choices"][0]["message"]["content"] == ANSWER


async def test_plain_reasoning_is_separate_from_the_answer() -> None:
    fake = FakeRag(reasoning=True)
    async with openai_client(make_app(fake)) as client:
        completion = await client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": QUESTION}],
            extra_body={"thinking": True},
        )
    message = completion.choices[0].message
    assert message.content == ANSWER
    assert message.model_extra == {"reasoning_content": "".join(REASONING_TOKENS)}
    assert fake.configurable["thinking"] is True


# Streamed completions


async def test_stream_sends_role_and_sources_then_tokens_then_stop_and_done() -> None:
    fake = FakeRag(condensed="Where is Milvus data stored?")
    async with http_client(make_app(fake)) as client:
        response = await client.post("/v1/chat/completions", json=request_body(stream=True))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = sse_data(response.text)
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    first, *tokens, last = chunks
    assert first["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    ]
    assert first["sources"] == SOURCES
    assert [c["choices"][0]["delta"] for c in tokens] == [{"content": t} for t in ANSWER_TOKENS]
    assert all("sources" not in c and "usage" not in c for c in tokens)
    assert last["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert "usage" not in last  # not asked for


async def test_stream_with_include_usage_ends_with_a_usage_chunk() -> None:
    async with http_client(make_app(FakeRag())) as client:
        response = await client.post(
            "/v1/chat/completions", json=request_body(stream=True, stream_options={"include_usage": True})
        )
    *chunks, usage_chunk, done = sse_data(response.text)
    assert done == "[DONE]"
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == USAGE
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_stream_through_the_openai_client() -> None:
    fake = FakeRag(reasoning=True)
    async with openai_client(make_app(fake)) as client:
        stream = await client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": QUESTION}],
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"thinking": {"type": "enabled"}},
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[0].model_extra is not None and chunks[0].model_extra["sources"] == SOURCES
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(
        (c.choices[0].delta.model_extra or {}).get("reasoning_content", "") for c in chunks if c.choices
    )
    assert content == ANSWER and reasoning == "".join(REASONING_TOKENS)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 120 and chunks[-1].usage.completion_tokens == 12
    assert fake.configurable == {"model": DEFAULT_MODEL, "thinking": True}


async def test_stream_without_usage_from_the_chain_still_ends_with_a_usage_chunk() -> None:
    async with http_client(make_app(FakeRag(usage=False))) as client:
        response = await client.post(
            "/v1/chat/completions", json=request_body(stream=True, stream_options={"include_usage": True})
        )
    *_, usage_chunk, done = sse_data(response.text)
    assert done == "[DONE]" and usage_chunk["choices"] == [] and "usage" not in usage_chunk


# Messages and per-request fields


async def test_last_user_message_is_the_question_and_earlier_turns_the_history() -> None:
    fake = FakeRag()
    messages = [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "What is Milvus?"},
        {"role": "assistant", "content": "A vector database [1]."},
        {"role": "developer", "content": "Answer briefly."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Where does it"}, {"type": "text", "text": "store data?"}],
        },
    ]
    async with openai_client(make_app(fake)) as client:
        await client.chat.completions.create(model=DEFAULT_MODEL, messages=messages)  # type: ignore[arg-type]
    (chain_input,) = fake.inputs
    assert chain_input["question"] == "Where does it\nstore data?"
    assert chain_input["chat_history"] == [
        HumanMessage(content="What is Milvus?"),
        AIMessage(content="A vector database [1]."),
    ]


async def test_extra_fields_go_to_the_configurable_and_unknown_fields_are_ignored() -> None:
    fake = FakeRag()
    async with openai_client(make_app(fake)) as client:
        await client.chat.completions.create(
            model="deepseek-v4-pro",
            messages=[{"role": "user", "content": QUESTION}],
            temperature=0.3,
            n=1,
            max_tokens=100,
            user="someone",
            extra_body={"k": 5, "search": "dense", "source": "faq/*", "thinking": False, "seed": 7},
        )
    assert fake.configurable == {
        "model": "deepseek-v4-pro",
        "k": 5,
        "search": "dense",
        "source": "faq/*",
        "temperature": 0.3,
        "thinking": False,
    }


async def test_a_request_without_model_uses_the_default() -> None:
    fake = FakeRag()
    async with http_client(make_app(fake)) as client:
        body = (
            await client.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": QUESTION}]}
            )
        ).json()
    assert body["model"] == DEFAULT_MODEL and fake.configurable == {"model": DEFAULT_MODEL}


# Errors


async def test_unknown_model_is_404_model_not_found() -> None:
    fake = FakeRag()
    async with http_client(make_app(fake)) as client:
        response = await client.post("/v1/chat/completions", json=request_body(model="gpt-4o"))
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "model"
    assert error["code"] == "model_not_found" and "gpt-4o" in error["message"]
    assert not fake.inputs  # the chain never ran

    async with openai_client(make_app(fake)) as oai:
        with pytest.raises(openai.NotFoundError) as raised:
            await oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.code == "model_not_found"


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "system", "content": "Be nice."}],
        [{"role": "user", "content": "Earlier"}, {"role": "user", "content": "   "}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
    ],
)
async def test_no_user_question_is_400(messages: list[dict[str, Any]]) -> None:
    fake = FakeRag()
    async with http_client(make_app(fake)) as client:
        response = await client.post(
            "/v1/chat/completions", json={"model": DEFAULT_MODEL, "messages": messages}
        )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages" and error["type"] == "invalid_request_error"
    assert "user message" in error["message"] and not fake.inputs


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (request_body(temperature=5), "temperature"),
        (request_body(search="fuzzy"), "search"),
        (request_body(k=0), "k"),
        ({"model": DEFAULT_MODEL}, "messages"),
        (request_body(messages=[{"role": "robot", "content": "hi"}]), "messages.0.role"),
    ],
)
async def test_invalid_fields_are_422_with_an_openai_error(body: dict[str, Any], param: str) -> None:
    async with http_client(make_app(FakeRag())) as client:
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == param and error["message"].startswith(param)


async def test_chain_errors_before_any_output_get_their_status_in_both_modes() -> None:
    fake = FakeRag(fail_first=InputError("the question is too long (5000 characters, at most 4000)"))
    async with http_client(make_app(fake)) as client:
        plain = await client.post("/v1/chat/completions", json=request_body())
        streamed = await client.post("/v1/chat/completions", json=request_body(stream=True))
    for response in (plain, streamed):
        assert response.status_code == 422
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"]["code"] == 422 and "too long" in response.json()["error"]["message"]

    async with openai_client(make_app(fake)) as oai:
        with pytest.raises(openai.UnprocessableEntityError, match="too long"):
            await oai.chat.completions.create(
                model=DEFAULT_MODEL, messages=[{"role": "user", "content": QUESTION}], stream=True
            )


async def test_a_failed_retrieval_after_condensing_is_an_http_error_not_a_stream() -> None:
    fake = FakeRag(condensed="Where is data stored?", fail_before_sources=StoreError("cannot reach Milvus"))
    async with http_client(make_app(fake)) as client:
        response = await client.post("/v1/chat/completions", json=request_body(stream=True))
    assert response.status_code == 503
    assert response.json()["error"] == {
        "message": "cannot reach Milvus",
        "type": "server_error",
        "param": None,
        "code": 503,
    }


async def test_an_error_mid_stream_is_an_error_event_and_the_openai_client_raises() -> None:
    fake = FakeRag(fail_midway=LLMError("DeepSeek answered 500 at https://api.deepseek.com: boom"))
    async with http_client(make_app(fake)) as client:
        response = await client.post("/v1/chat/completions", json=request_body(stream=True))
    payloads = sse_data(response.text)
    assert "[DONE]" not in payloads
    assert payloads[1]["choices"][0]["delta"] == {"content": ANSWER_TOKENS[0]}
    assert payloads[-1] == {
        "error": {
            "message": "DeepSeek answered 500 at https://api.deepseek.com: boom",
            "type": "server_error",
            "param": None,
            "code": 502,
        }
    }

    received: list[str] = []
    async with openai_client(make_app(fake)) as oai:
        stream = await oai.chat.completions.create(
            model=DEFAULT_MODEL, messages=[{"role": "user", "content": QUESTION}], stream=True
        )
        with pytest.raises(openai.APIError, match="boom"):
            async for chunk in stream:
                received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == ANSWER_TOKENS[0]


async def test_an_unexpected_error_mid_stream_is_a_500_error_event() -> None:
    fake = FakeRag(fail_midway=ValueError("bug"), error_chunk=False)
    async with http_client(make_app(fake)) as client:
        response = await client.post("/v1/chat/completions", json=request_body(stream=True))
    error = sse_data(response.text)[-1]["error"]
    assert error["code"] == 500 and error["message"] == "internal error: ValueError"


async def test_a_rag_error_without_an_error_chunk_still_ends_the_stream_with_its_status() -> None:
    fake = FakeRag(fail_midway=LLMError("DeepSeek stalled"), error_chunk=False)
    async with http_client(make_app(fake)) as client:
        response = await client.post("/v1/chat/completions", json=request_body(stream=True))
    error = sse_data(response.text)[-1]["error"]
    assert error["code"] == 502 and error["message"] == "DeepSeek stalled"


# Client disconnects


def asgi_scope(spec_version: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
    }


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
async def test_a_client_that_leaves_mid_stream_closes_the_chain(spec_version: str) -> None:
    """ASGI 2.3 servers (uvicorn) report the disconnect, which cancels the waiting chain; with
    2.4 the next `send` fails, and the chain is closed before it yields the rest."""
    fake = FakeRag(hang=spec_version == "2.3")
    app = make_app(fake)
    gone = asyncio.Event()
    body = json.dumps(request_body(stream=True)).encode()
    requests = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[Message] = []

    async def receive() -> Message:
        if requests:
            return requests.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if gone.is_set() and spec_version == "2.4":
            raise OSError("connection reset by peer")
        sent.append(message)
        if ANSWER_TOKENS[0].encode() in message.get("body", b""):
            gone.set()  # the client leaves after the first answer token

    async with asyncio.timeout(10):
        with contextlib.suppress(Exception):
            await app(asgi_scope(spec_version), receive, send)
    # Closed by the time the response returns, not later by the garbage collector.
    assert fake.closed.is_set() and not fake.finished
    assert sent[0]["status"] == 200
    assert not any(b"[DONE]" in m.get("body", b"") for m in sent)


# Models


async def test_models_lists_every_model() -> None:
    app = make_app(FakeRag())
    async with http_client(app) as client:
        body = (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == MODELS
    assert all(m["object"] == "model" and m["owned_by"] == "milvus-deepseek-rag" for m in body["data"])
    assert all(isinstance(m["created"], int) for m in body["data"])

    async with openai_client(app) as oai:
        assert [m.id async for m in oai.models.list()] == MODELS


async def test_the_default_model_is_listed_even_when_models_leaves_it_out() -> None:
    app = FastAPI()
    app.include_router(make_openai_router(FakeRag().runnable(), ["other"], "main-model"))
    async with http_client(app) as client:
        listed = (await client.get("/v1/models")).json()["data"]
        answered = await client.post("/v1/chat/completions", json=request_body(model="main-model"))
    assert [m["id"] for m in listed] == ["other", "main-model"]
    assert answered.status_code == 200
