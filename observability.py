"""Operating the server: Prometheus metrics at /metrics, a request id on every response and
log line, and logging as text or JSON (RAG_LOG_FORMAT).

The chain is watched through a LangChain callback handler bound to the runnables that the
server serves, so chains/ knows nothing of metrics; the HTTP side through a pure ASGI
middleware. With `rag serve --workers N` every worker writes its metrics to files in
PROMETHEUS_MULTIPROC_DIR (prometheus-client's multiprocess mode) and any worker's /metrics
reports the sum over all of them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.runnables import Runnable
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api_keys import OPEN, Grant
from errors import LLMError, LLMTimeoutError
from settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

    from service import RagService

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
# An id the client sent is kept when it looks like one (a UUID, a trace id, a ULID...);
# anything else (too long, spaces, control characters) is replaced, so logs stay one line.
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
NO_REQUEST = "-"
# The request that the code running now serves (set by RequestMiddleware).
REQUEST_ID: ContextVar[str] = ContextVar("request_id", default=NO_REQUEST)

# Whole requests: an answer streams for seconds (DeepSeek writes it token by token).
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
FIRST_TOKEN_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)
RETRIEVAL_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
# Chain runs followed at once; runs whose end never came are dropped past this many.
MAX_TRACKED_RUNS = 10_000


def request_id_of(scope: Scope) -> str:
    """The client's X-Request-ID if it is a sane one, else a new id."""
    given = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
    return given if SANE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Adds `request_id` (or "-" outside a request) to every record a handler writes."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s [%(request_id)s] %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(process)d %(request_id)s %(message)s"
# Loggers of this project: their INFO lines are shown; other libraries' from WARNING up
# (httpx, for one, logs every request it sends at INFO).
OWN_LOGGERS = (
    "server",
    "service",
    "openai_api",
    "workers",
    "observability",
    "cli",
    "chains",
    "store",
    "loaders",
)


def log_config(settings: Settings) -> dict[str, Any]:
    """A `logging.config.dictConfig` dict for the server: uvicorn's loggers (it takes this as
    its public `log_config` parameter) and ours, as text or JSON lines, each with the process
    id and the request id."""
    if settings.log_format == "json":
        from pythonjsonlogger.core import RESERVED_ATTRS

        formatter: dict[str, Any] = {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": JSON_FIELDS,
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
            # uvicorn adds its message again with terminal colours as an extra field.
            "reserved_attrs": [*RESERVED_ATTRS, "color_message"],
        }
    else:
        formatter = {"format": TEXT_FORMAT}

    def handler(stream: str) -> dict[str, Any]:
        return {
            "class": "logging.StreamHandler",
            "formatter": "default",
            "filters": ["request_id"],
            "stream": stream,
        }

    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"default": formatter},
        # As uvicorn does: the access log on stdout, everything else on stderr.
        "handlers": {"default": handler("ext://sys.stderr"), "access": handler("ext://sys.stdout")},
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
            # pymilvus gives its logger a handler of its own when imported: ours replaces it
            # (apply this after importing pymilvus, as the entry points do).
            "pymilvus": {"handlers": ["default"], "level": "WARNING", "propagate": False},
            **{name: {"level": "INFO"} for name in OWN_LOGGERS},
        },
        "root": {"handlers": ["default"], "level": "WARNING"},
    }


class Metrics:
    """The service's metrics. `registry=None`: they are only written to the multiprocess files."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        from prometheus_client import Counter, Histogram

        self.requests = Counter(
            "rag_http_requests",
            "HTTP requests by method, route template, status code and knowledge base.",
            ["method", "route", "status", "kb"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "rag_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response (a streamed answer included).",
            ["method", "route", "kb"],
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.first_token_seconds = Histogram(
            "rag_time_to_first_token_seconds",
            "Time from the start of an answer to DeepSeek's first token (reasoning or answer).",
            buckets=FIRST_TOKEN_BUCKETS,
            registry=registry,
        )
        self.retrieval_seconds = Histogram(
            "rag_retrieval_duration_seconds",
            "Time to retrieve the passages for one question (embedding and Milvus search).",
            buckets=RETRIEVAL_BUCKETS,
            registry=registry,
        )
        self.llm_errors = Counter(
            "rag_deepseek_errors",
            "Failed DeepSeek calls, retried ones included, by error: an HTTP status, timeout, "
            "connection, or the exception's type.",
            ["error"],
            registry=registry,
        )
        self.llm_retries = Counter(
            "rag_deepseek_retries",
            "DeepSeek calls made again after a failed one for the same answer.",
            registry=registry,
        )
        self.tokens = Counter(
            "rag_deepseek_tokens",
            "Tokens DeepSeek reported, by type (prompt, completion).",
            ["type"],
            registry=registry,
        )
        self.prompt_cache_tokens = Counter(
            "rag_deepseek_prompt_cache_tokens",
            "Prompt tokens DeepSeek reported as cache hits or misses.",
            ["cache"],
            registry=registry,
        )


STORE_CHUNKS = ("rag_store_chunks", "Chunks in the collection of each knowledge base.")


class StoreCollector:
    """`rag_store_chunks` per knowledge base, counted in Milvus at each scrape (any worker
    can: the store is shared)."""

    def __init__(self, services: Mapping[str, RagService]) -> None:
        self.services = services

    def describe(self) -> list[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        return [GaugeMetricFamily(*STORE_CHUNKS, labels=["kb"])]

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(*STORE_CHUNKS, labels=["kb"])
        for kb, service in self.services.items():
            try:
                family.add_metric([kb], service.get_store().count())
            except Exception as exc:  # Milvus down: the sample is absent, /health says why
                log.warning("chunks of knowledge base %s not counted: %s", kb, exc)
        if family.samples:
            yield family


def error_kind(error: BaseException) -> str:
    """The `error` label of a failed DeepSeek call: by the openai client's exception classes
    (LangChain's integrations raise subclasses of them), not by their names."""
    import openai

    if isinstance(error, openai.APIStatusError):
        return str(error.status_code)
    if isinstance(error, openai.APITimeoutError | LLMTimeoutError):  # no answer in time, or a stall
        return "timeout"
    if isinstance(error, openai.APIConnectionError):
        return "connection"
    return type(error).__name__


@dataclass
class _Answer:
    """What the handler follows of one top-level run (one request to a chain)."""

    started: float
    retrieved: bool = False
    answering: bool = False
    llm_failed: bool = False  # the last DeepSeek call failed (and none started since)


class ChainMetricsHandler(BaseCallbackHandler):
    """Records retrieval latency, time to first token, DeepSeek errors, retries and tokens
    from LangChain's callbacks.

    Bound to the served runnables with `with_config(callbacks=...)`, it sees every run of
    every request, and follows each top-level run (an answer) by its run ids: the first token
    after the retrieval is the answer's first token (a follow-up's rewrite comes before), and
    a DeepSeek call that starts after one failed in the same answer is a retry.
    """

    # Called in line by LangChain (not in an executor thread): each is a few dict operations.
    run_inline = True

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.answers: dict[UUID, _Answer] = {}  # by the top-level run's id
        self.answer_of: dict[UUID, UUID] = {}  # run id -> its top-level run's id
        self.retrievals: dict[UUID, float] = {}  # retriever run id -> start

    def _start(self, run_id: UUID, parent_run_id: UUID | None) -> _Answer:
        if len(self.answer_of) > MAX_TRACKED_RUNS:  # ends that never came (a crashed run)
            self.answers.clear()
            self.answer_of.clear()
            self.retrievals.clear()
        # A run whose parent this handler never saw starts an answer of its own.
        top = self.answer_of.get(parent_run_id, run_id) if parent_run_id is not None else run_id
        self.answer_of[run_id] = top
        return self.answers.setdefault(top, _Answer(time.perf_counter()))

    def _answer(self, run_id: UUID) -> _Answer | None:
        top = self.answer_of.get(run_id)
        return None if top is None else self.answers.get(top)

    def _end(self, run_id: UUID) -> None:
        if self.answer_of.pop(run_id, None) == run_id:
            self.answers.pop(run_id, None)

    def on_chain_start(
        self, serialized: Any, inputs: Any, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        self._start(run_id, parent_run_id)

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._end(run_id)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        # A stall, the deadline or an empty answer fail the answer, not a DeepSeek call (the
        # call was closed by us, or ended well): counted here. An error DeepSeek returned
        # was counted at its call, which is then the last one, failed.
        answer = self.answers.get(run_id) if self.answer_of.get(run_id) == run_id else None
        if answer is not None and isinstance(error, LLMError) and not answer.llm_failed:
            self.metrics.llm_errors.labels(error_kind(error)).inc()
        self._end(run_id)

    def on_tool_start(
        self, serialized: Any, input_str: str, *, run_id: UUID, parent_run_id: UUID | None = None, **kw: Any
    ) -> None:
        self._start(run_id, parent_run_id)

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._end(run_id)

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._end(run_id)

    def on_retriever_start(
        self, serialized: Any, query: str, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        self._start(run_id, parent_run_id)
        self.retrievals[run_id] = time.perf_counter()

    def on_retriever_end(self, documents: Sequence[Any], *, run_id: UUID, **kwargs: Any) -> None:
        started = self.retrievals.pop(run_id, None)
        if started is not None:
            self.metrics.retrieval_seconds.observe(time.perf_counter() - started)
        answer = self._answer(run_id)
        if answer is not None:
            answer.retrieved = True
        self._end(run_id)

    def on_retriever_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self.retrievals.pop(run_id, None)
        self._end(run_id)

    def on_chat_model_start(
        self,
        serialized: Any,
        messages: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        self._llm_start(run_id, parent_run_id)

    def on_llm_start(
        self, serialized: Any, prompts: Any, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        self._llm_start(run_id, parent_run_id)

    def _llm_start(self, run_id: UUID, parent_run_id: UUID | None) -> None:
        answer = self._start(run_id, parent_run_id)
        if answer.llm_failed:
            self.metrics.llm_retries.inc()
            answer.llm_failed = False

    def on_llm_new_token(
        self, token: str | list[str | dict[str, Any]], *, run_id: UUID, chunk: Any = None, **kwargs: Any
    ) -> None:
        answer = self._answer(run_id)
        if answer is None or answer.answering or not answer.retrieved:
            return
        message = getattr(chunk, "message", None)
        reasoning = getattr(message, "additional_kwargs", {}).get("reasoning_content")
        if token or reasoning:
            answer.answering = True
            self.metrics.first_token_seconds.observe(time.perf_counter() - answer.started)

    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        for generations in getattr(response, "generations", []):
            for generation in generations:
                self._count_tokens(getattr(getattr(generation, "message", None), "usage_metadata", None))
        self._end(run_id)

    def _count_tokens(self, usage: dict[str, Any] | None) -> None:
        if not usage:
            return
        self.metrics.tokens.labels("prompt").inc(usage.get("input_tokens", 0))
        self.metrics.tokens.labels("completion").inc(usage.get("output_tokens", 0))
        hits = (usage.get("input_token_details") or {}).get("cache_read")
        if hits is not None:  # DeepSeek: prompt tokens = cache hits + cache misses
            self.metrics.prompt_cache_tokens.labels("hit").inc(hits)
            self.metrics.prompt_cache_tokens.labels("miss").inc(max(usage.get("input_tokens", 0) - hits, 0))

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        # Closed by us (a stall, the deadline, a client that left): not DeepSeek's failure.
        if not isinstance(error, GeneratorExit | asyncio.CancelledError):
            self.metrics.llm_errors.labels(error_kind(error)).inc()
            answer = self._answer(run_id)
            if answer is not None:
                answer.llm_failed = True
        self._end(run_id)


class VisibleSamples:
    """A registry's samples that a key limited to some knowledge bases may see: those with
    the `kb` label of one of them. The others (another knowledge base's traffic, and the
    process-wide DeepSeek and retrieval figures, which mix every knowledge base) are the
    operator's: an admin key scrapes the whole registry."""

    def __init__(self, registry: CollectorRegistry, grant: Grant) -> None:
        self.registry = registry
        self.grant = grant

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import Metric

        for family in self.registry.collect():
            samples = [
                s for s in family.samples if s.labels.get("kb") and self.grant.may_read(s.labels["kb"])
            ]
            if samples:
                visible = Metric(family.name, family.documentation, family.type, family.unit)
                visible.samples = samples
                yield visible


class RequestMiddleware:
    """Per request: a request id (X-Request-ID on the response, `request_id` on log lines),
    the HTTP metrics, and a JSON 500 for an unexpected error.

    Pure ASGI (not @app.middleware), outermost of ours: it must not buffer a stream, and it
    sees every response, a 401 included. An unexpected error is answered here rather than by
    Starlette's outer error middleware, whose response would not carry the request id.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        token = REQUEST_ID.set(request_id)
        started = time.perf_counter()
        status = 500
        responded = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                responded = True
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if responded:
                raise
            log.exception("unexpected error")
            response = JSONResponse(
                status_code=500, content={"detail": f"internal error: {type(exc).__name__}"}
            )
            await response(scope, receive, send_with_id)
        finally:
            route, kb = self._route(scope)
            self.metrics.requests.labels(scope["method"], route, str(status), kb).inc()
            self.metrics.request_seconds.labels(scope["method"], route, kb).observe(
                time.perf_counter() - started
            )
            REQUEST_ID.reset(token)

    def _route(self, scope: Scope) -> tuple[str, str]:
        """The route's template (`/rag/invoke`, `/rag/c/{config_hash}/invoke`), never the raw
        path, and its knowledge base: `/kb/hr/rag/invoke` is `/rag/invoke` of `hr`.

        The knowledge base is the one the access middleware let through (or the one a
        `{kb}:{model}` id chose), never a name taken from the path as it came: "" otherwise.
        """
        route = scope.get("route")
        if route is None:  # refused before routing (401), or no route (404): match it here
            matches = [r for r in self.routes if r.matches(scope)[0] is not Match.NONE]
            route = matches[0] if matches else None
        template = str(getattr(route, "path", "unmatched"))
        state = scope.get("state") or {}
        prefix = state.get("kb_prefix", "")
        if prefix and template.startswith(prefix + "/"):
            template = template[len(prefix) :]
        return template, str(state.get("kb", ""))


@dataclass
class Observability:
    """The metrics of one app, the handler that feeds them from the chain, and /metrics."""

    settings: Settings
    services: Mapping[str, RagService]
    metrics: Metrics
    handler: ChainMetricsHandler
    scrape_registry: CollectorRegistry

    @classmethod
    def create(cls, settings: Settings, services: Mapping[str, RagService]) -> Observability:
        """Metrics in a registry of this app's own, or in the multiprocess files when
        PROMETHEUS_MULTIPROC_DIR is set (`rag serve --workers N`); `services`: the service of
        each knowledge base, by name."""
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        scrape_registry = CollectorRegistry()
        if settings.prometheus_multiproc_dir:
            metrics = Metrics(registry=None)
            MultiProcessCollector(scrape_registry, path=settings.prometheus_multiproc_dir)
        else:
            metrics = Metrics(registry=scrape_registry)
        scrape_registry.register(StoreCollector(services))
        return cls(settings, services, metrics, ChainMetricsHandler(metrics), scrape_registry)

    def watch(self, runnable: Runnable) -> Runnable:
        """The runnable with the metrics handler among its callbacks (inherited by every step)."""
        return runnable.with_config(callbacks=[self.handler])

    def install(self, app: FastAPI) -> None:
        """Add the request middleware (call after the other middleware: it must be outermost)
        and GET /metrics, in Prometheus's text format."""
        from fastapi import Response
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        app.add_middleware(RequestMiddleware, metrics=self.metrics, routes=app.routes)

        # Sync: counting the chunks is a blocking pymilvus call, so FastAPI runs it in a thread.
        @app.get("/metrics", include_in_schema=False)
        def metrics(request: Request) -> Response:
            grant: Grant = getattr(request.state, "grant", OPEN)
            registry = self.scrape_registry if grant.is_admin else VisibleSamples(self.scrape_registry, grant)
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def process_exit(self) -> None:
        """At a worker's shutdown: prometheus-client's clean-up of this process's files."""
        if self.settings.prometheus_multiproc_dir:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid(), path=self.settings.prometheus_multiproc_dir)
