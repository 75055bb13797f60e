"""Metrics from the chain's callbacks, the request middleware, and the log configuration."""

from __future__ import annotations

import json
import logging
import logging.config
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from access import AccessMiddleware
from api_keys import load_keys
from chains.rag import AnswerPolicy, build_rag_chain
from errors import LLMError, LLMTimeoutError
from observability import REQUEST_ID, ChainMetricsHandler, Metrics, Observability, log_config
from settings import Settings
from tests.unit.fakes import FAQ_DOCS, FixedRetriever, RecordingChat
from tests.unit.test_answer_stream import FAST, QUESTION, USAGE, status_error


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def watched_chain(llm: RecordingChat, registry: CollectorRegistry, policy: AnswerPolicy = FAST) -> Any:
    handler = ChainMetricsHandler(Metrics(registry))
    chain = build_rag_chain(FixedRetriever(documents=FAQ_DOCS), llm, policy=policy)
    return chain.with_config(callbacks=[handler]), handler


async def test_an_answer_records_retrieval_first_token_and_tokens(registry: CollectorRegistry) -> None:
    chain, handler = watched_chain(RecordingChat(reasoning="Passage one.", usage=USAGE), registry)
    chunks = [chunk async for chunk in chain.astream({"question": QUESTION})]
    assert "usage" in chunks[-1]
    assert value(registry, "rag_retrieval_duration_seconds_count") == 1
    assert value(registry, "rag_time_to_first_token_seconds_count") == 1
    assert 0 < value(registry, "rag_time_to_first_token_seconds_sum") < 5
    assert value(registry, "rag_deepseek_tokens_total", type="prompt") == 120
    assert value(registry, "rag_deepseek_tokens_total", type="completion") == 9
    assert value(registry, "rag_deepseek_prompt_cache_tokens_total", cache="hit") == 96
    assert value(registry, "rag_deepseek_prompt_cache_tokens_total", cache="miss") == 24
    assert value(registry, "rag_deepseek_errors_total", error="503") == 0
    assert not handler.answers and not handler.answer_of, "the finished answer is forgotten"


async def test_a_follow_up_counts_one_first_token_and_both_calls_tokens(registry: CollectorRegistry) -> None:
    usage = {"input_tokens": 10, "output_tokens": 2, "total_tokens": 12}
    chain, _ = watched_chain(RecordingChat(usage=usage), registry)
    history = [("human", "Where is data kept?"), ("ai", "In MinIO [1].")]
    async for _ in chain.astream({"question": "And the logs?", "chat_history": history}):
        pass
    assert value(registry, "rag_time_to_first_token_seconds_count") == 1
    assert value(registry, "rag_deepseek_tokens_total", type="completion") >= 2


async def test_a_failed_call_then_a_retry_are_counted(registry: CollectorRegistry) -> None:
    chain, _ = watched_chain(RecordingChat(failures=[status_error(503)], usage=USAGE), registry)
    async for _ in chain.astream({"question": QUESTION}):
        pass
    assert value(registry, "rag_deepseek_errors_total", error="503") == 1
    assert value(registry, "rag_deepseek_retries_total") == 1
    assert value(registry, "rag_time_to_first_token_seconds_count") == 1


async def test_giving_up_counts_each_failed_call_once(registry: CollectorRegistry) -> None:
    chain, _ = watched_chain(RecordingChat(failures=[status_error(503)] * 3), registry)
    with pytest.raises(LLMError):
        async for _ in chain.astream({"question": QUESTION}):
            pass
    assert value(registry, "rag_deepseek_errors_total", error="503") == 3
    assert value(registry, "rag_deepseek_errors_total", error="LLMError") == 0
    assert value(registry, "rag_deepseek_retries_total") == 2
    assert value(registry, "rag_time_to_first_token_seconds_count") == 0


async def test_an_empty_answer_is_one_deepseek_error(registry: CollectorRegistry) -> None:
    chain, _ = watched_chain(RecordingChat(answer=""), registry)
    with pytest.raises(LLMError, match="empty"):
        async for _ in chain.astream({"question": QUESTION}):
            pass
    assert value(registry, "rag_deepseek_errors_total", error="LLMError") == 1


async def test_a_stall_is_one_deepseek_error(registry: CollectorRegistry) -> None:
    chain, handler = watched_chain(RecordingChat(stall_after=1), registry)
    with pytest.raises(LLMTimeoutError):
        async for _ in chain.astream({"question": QUESTION}):
            pass
    assert value(registry, "rag_deepseek_errors_total", error="timeout") == 1
    assert value(registry, "rag_deepseek_retries_total") == 0
    assert not handler.answers


async def test_concurrent_answers_are_told_apart(registry: CollectorRegistry) -> None:
    import asyncio

    chain, handler = watched_chain(RecordingChat(usage=USAGE), registry)

    async def answer() -> None:
        async for _ in chain.astream({"question": QUESTION}):
            pass

    await asyncio.gather(*(answer() for _ in range(5)))
    assert value(registry, "rag_time_to_first_token_seconds_count") == 5
    assert value(registry, "rag_retrieval_duration_seconds_count") == 5
    assert value(registry, "rag_deepseek_tokens_total", type="prompt") == 5 * 120
    assert not handler.answers and not handler.answer_of


def test_runs_whose_parent_was_never_seen_are_answers_of_their_own(registry: CollectorRegistry) -> None:
    from uuid import uuid4

    handler = ChainMetricsHandler(Metrics(registry))
    unseen, run = uuid4(), uuid4()
    handler.on_retriever_start({}, "q", run_id=run, parent_run_id=unseen)
    handler.on_retriever_end([], run_id=run)
    assert value(registry, "rag_retrieval_duration_seconds_count") == 1
    assert not handler.answers and not handler.answer_of and not handler.retrievals


class FakeStore:
    def count(self) -> int:
        return 42


def small_app(api_keys: list[str] | None = None) -> tuple[FastAPI, Observability]:
    """An app with a route that takes a path parameter, one that fails, and /metrics."""
    settings = Settings(_env_file=None)
    store = SimpleNamespace(get_store=FakeStore)
    observability = Observability.create(settings, {"default": store})  # type: ignore[dict-item]
    app = FastAPI()
    if api_keys:
        app.add_middleware(
            AccessMiddleware, keys=load_keys(api_keys, "", ["default"]), knowledge_bases=["default"]
        )
    observability.install(app)

    @app.get("/items/{name}")
    async def item(name: str) -> dict[str, str]:
        logging.getLogger("server").warning("serving %s", name)
        return {"name": name, "request_id": REQUEST_ID.get()}

    @app.get("/broken")
    async def broken() -> None:
        raise ValueError("a bug")

    return app, observability


def client(app: FastAPI, **headers: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", headers=headers)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_request_ids_are_kept_when_sane_and_made_otherwise() -> None:
    app, _ = small_app()
    async with client(app) as http:
        kept = await http.get("/items/a", headers={"X-Request-ID": "trace-01.ab:cd"})
        made = await http.get("/items/b")
        refused = await http.get("/items/c", headers={"X-Request-ID": "two words\tand a tab"})
        too_long = await http.get("/items/d", headers={"X-Request-ID": "x" * 129})
    assert kept.headers["X-Request-ID"] == kept.json()["request_id"] == "trace-01.ab:cd"
    for response in (made, refused, too_long):
        request_id = response.headers["X-Request-ID"]
        assert len(request_id) == 32 and request_id == response.json()["request_id"]
    assert len({r.headers["X-Request-ID"] for r in (made, refused, too_long)}) == 3
    assert REQUEST_ID.get() == "-", "the id ends with its request"


async def test_an_unexpected_error_is_a_json_500_with_the_request_id() -> None:
    app, _ = small_app()
    async with client(app) as http:
        response = await http.get("/broken", headers={"X-Request-ID": "req-500"})
        metrics = await http.get("/metrics")
    assert response.status_code == 500
    assert response.json() == {"detail": "internal error: ValueError"}
    assert response.headers["X-Request-ID"] == "req-500"
    found = samples(metrics.text)
    assert (
        found[
            (
                "rag_http_requests_total",
                frozenset({("method", "GET"), ("route", "/broken"), ("status", "500"), ("kb", "")}),
            )
        ]
        == 1
    )


async def test_metrics_label_route_templates_and_follow_the_api_keys() -> None:
    app, _ = small_app(api_keys=["k1"])
    async with client(app, Authorization="Bearer k1") as http:
        for name in ("a", "b", "c"):
            assert (await http.get(f"/items/{name}")).status_code == 200
        assert (await http.get("/nothing/here")).status_code == 404
        async with client(app) as anonymous:
            refused = await anonymous.get("/metrics")
            assert (await anonymous.get("/items/z")).status_code == 401
        metrics = await http.get("/metrics")
    assert refused.status_code == 401 and refused.headers["X-Request-ID"]
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    found = samples(metrics.text)

    def requests(route: str, status: str, kb: str = "default") -> float:
        labels = frozenset({("method", "GET"), ("route", route), ("status", status), ("kb", kb)})
        return found.get(("rag_http_requests_total", labels), 0.0)

    assert requests("/items/{name}", "200") == 3  # the template, never the raw path
    assert requests("/items/{name}", "401", kb="") == 1  # refused before its knowledge base was known
    assert requests("/metrics", "401", kb="") == 1
    assert requests("unmatched", "404") == 1
    duration = (
        "rag_http_request_duration_seconds_count",
        frozenset({("method", "GET"), ("route", "/items/{name}"), ("kb", "default")}),
    )
    assert found[duration] == 3
    assert found[("rag_store_chunks", frozenset({("kb", "default")}))] == 42
    assert not any("/items/a" in labels for (_, label_set) in found for labels in dict(label_set).values())


@pytest.fixture
def configured_logging() -> Iterator[None]:
    yield
    logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})


async def test_json_log_lines_carry_the_request_id(
    configured_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    import pymilvus  # noqa: F401  (as the entry points do: it configures its logger on import)

    logging.config.dictConfig(log_config(Settings(_env_file=None, RAG_LOG_FORMAT="json")))
    logging.getLogger("pymilvus.decorators").error("RPC error: [search]")
    app, _ = small_app()
    async with client(app) as http:
        await http.get("/items/a", headers={"X-Request-ID": "json-1"})
        await http.get("/broken", headers={"X-Request-ID": "json-2"})
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]  # each line is JSON
    assert lines[0]["logger"] == "pymilvus.decorators" and lines[0]["request_id"] == "-"
    served = [line for line in lines if line["request_id"] == "json-1"]
    assert [(line["logger"], line["level"], line["message"]) for line in served] == [
        ("server", "WARNING", "serving a")
    ]
    (failed,) = [line for line in lines if line["request_id"] == "json-2"]
    assert failed["message"] == "unexpected error" and "ValueError: a bug" in failed["exc_info"]
    assert {"time", "process"} <= set(failed)


def test_text_log_lines_carry_the_process_and_request_id(
    configured_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logging.config.dictConfig(log_config(Settings(_env_file=None)))
    token = REQUEST_ID.set("text-1")
    try:
        logging.getLogger("chains.rag").info("an answer")
        logging.getLogger("httpx").info("quiet: other libraries from WARNING up")
    finally:
        REQUEST_ID.reset(token)
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith(" chains.rag [text-1] an answer") and " INFO [" in line
