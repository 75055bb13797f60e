"""The LangServe app: the chain at /rag, the chat at /chat, the retriever at /retriever, /health."""

from __future__ import annotations

import gc
import hmac
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import openai
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse
from langserve import add_routes
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from documents_api import make_documents_router
from errors import STREAM_ERRORS, LLMError, RagError
from limits import install_limits
from openai_api import make_openai_router
from settings import Settings, get_settings

if TYPE_CHECKING:
    from service import RagService

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, service: RagService | None = None) -> FastAPI:
    """The FastAPI app. The store and the embedding model open once, at start-up."""
    if settings is None:
        settings = service.settings if service else get_settings()
    # Imported here, after the settings: importing pymilvus reads MILVUS_URI (see settings.py).
    from chains.llm import describe_llm_error
    from service import open_service

    service = service or open_service(settings)
    _run_langserve_callbacks_inline()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            service.get_store()
            # Load the weights now, not on the first request.
            service.embeddings.embed_query("warm up")
        except RagError as exc:
            log.error("starting without Milvus: %s", exc)
        # The start-up heap (torch, transformers, LangChain: ~250k objects) lives as long as
        # the process; frozen, the collector stops rescanning it. Unfrozen, a full collection
        # every ~200 answers stalled one for 255 ms (measured here with gc.callbacks).
        gc.collect()
        gc.freeze()
        yield
        gc.unfreeze()  # an app that stops in a process that goes on (tests) leaves nothing frozen
        service.close()

    app = FastAPI(
        title="milvus-deepseek-rag",
        version="0.1.0",
        description="Answers from your documents, with citations. Milvus + DeepSeek + LangServe.",
        lifespan=lifespan,
    )
    app.state.service = service

    # Pure ASGI middleware (not @app.middleware): it must not buffer streams or hide a
    # client's disconnect from the stream that should cancel the DeepSeek request.
    app.add_middleware(StreamErrorMiddleware)
    install_limits(app, settings)  # inside the key check: only valid keys reach the limits
    if settings.api_key_list:
        app.add_middleware(ApiKeyMiddleware, keys=settings.api_key_list)

    @app.exception_handler(RagError)
    async def rag_error(_: Request, exc: RagError) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content={"detail": str(exc)})

    @app.exception_handler(openai.APIError)
    async def llm_error(_: Request, exc: openai.APIError) -> JSONResponse:
        error = describe_llm_error(exc, settings.deepseek_base_url) or LLMError(str(exc))
        return JSONResponse(status_code=error.status_code, content={"detail": str(error)})

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse(status_code=500, content={"detail": f"internal error: {type(exc).__name__}"})

    @app.get("/health")
    async def health() -> JSONResponse:
        report = service.health()
        ok = report["milvus"]
        report["status"] = "ok" if ok and report["collection"] else ("empty" if ok else "down")
        return JSONResponse(status_code=200 if ok else 503, content=report)

    @app.get("/", include_in_schema=False)
    async def index() -> RedirectResponse:
        return RedirectResponse("/rag/playground/")

    add_routes(app, service.chain, path="/rag")
    add_routes(app, service.chat_chain, path="/chat", playground_type="chat")
    add_routes(app, service.configurable_retriever, path="/retriever")
    app.include_router(make_openai_router(service.chain, settings.model_list, settings.deepseek_model))
    app.include_router(make_documents_router(service, settings))
    return app


class ApiKeyMiddleware:
    """Bearer-token auth on every route but /health, before any route runs: a bad key
    never reaches Milvus or DeepSeek, and the key is never logged."""

    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self.app = app
        self.keys = [key.encode() for key in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode()
        if scheme.lower() == "bearer" and any(hmac.compare_digest(given, k) for k in self.keys):
            await self.app(scope, receive, send)
            return
        response = JSONResponse(
            status_code=401,
            content={"detail": "missing or invalid API key: send Authorization: Bearer <key>"},
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)


# What LangServe sends on any failure mid-stream, whatever the cause.
GENERIC_STREAM_ERROR = b'{"status_code": 500, "message": "Internal Server Error"}'


def _run_langserve_callbacks_inline() -> None:
    """Let LangChain call LangServe's event aggregator in line rather than in tasks.

    LangServe attaches an AsyncEventAggregatorCallback to every call (a new one each time,
    inside its handlers, hence the class attribute). Its handlers only append to a list,
    but LangChain runs a handler that is not marked `run_inline` through asyncio.gather:
    a task, and a turn of the event loop, for every event, every answer token included
    (-0.6 ms an answer at 1 client, measured with bench/ab_serve.py). In line, each is a
    function call, and the events are recorded in the same order.
    """
    from langserve.callbacks import AsyncEventAggregatorCallback

    AsyncEventAggregatorCallback.run_inline = True


class StreamErrorMiddleware:
    """Put the real reason into LangServe's stream `error` event.

    LangServe hides every mid-stream exception behind a generic 500 so as not to leak
    secrets; our RagErrors are written for users (a stalled or empty DeepSeek answer, a
    deadline), so the chain records them (chains.rag.STREAM_ERRORS) and they replace it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].endswith(
            ("/stream", "/stream_events", "/stream_log")
        ):
            await self.app(scope, receive, send)
            return
        errors: list[RagError] = []
        started = False

        async def send_with_reason(message: Message) -> None:
            nonlocal started
            started = True
            body = message.get("body", b"")
            if errors and message["type"] == "http.response.body" and GENERIC_STREAM_ERROR in body:
                error = errors[-1]
                reason = json.dumps({"status_code": error.status_code, "message": str(error)})
                message = {**message, "body": body.replace(GENERIC_STREAM_ERROR, reason.encode())}
            await send(message)

        token = STREAM_ERRORS.set(errors)
        try:
            await self.app(scope, receive, send_with_reason)
        except Exception as exc:
            if not started:
                raise
            # LangServe re-raises after its error event; the client has the reason by now,
            # so end the stream cleanly instead of aborting the connection.
            if errors:
                log.warning("stream ended with an error: %s", errors[-1])
            else:
                log.exception("stream failed", exc_info=exc)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            STREAM_ERRORS.reset(token)


def __getattr__(name: str) -> Any:
    # `uvicorn server:app` works without building the app (or reading settings) at import.
    if name == "app":
        return create_app()
    raise AttributeError(name)


def main() -> None:
    """`python server.py`: serve with settings from the environment."""
    import uvicorn

    settings = get_settings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port)


if __name__ == "__main__":
    main()
