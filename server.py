"""The LangServe app: the chain at /rag, the chat at /chat, the retriever at /retriever, the MCP
tools at /mcp, /health."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import openai
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse
from langserve import add_routes
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from documents_api import make_documents_router
from errors import LLMError, RagError
from limits import install_limits
from observability import Observability, log_config
from openai_api import make_openai_router
from pages import OPEN_PATHS, make_pages_router, presented_key, valid_key
from settings import Settings, get_settings, import_pymilvus_safely

if TYPE_CHECKING:
    from service import RagService

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, service: RagService | None = None) -> FastAPI:
    """The FastAPI app. The store and the embedding model open once, at start-up."""
    if settings is None:
        settings = service.settings if service else get_settings()
    # Imported here, after the settings: importing pymilvus reads MILVUS_URI (see settings.py).
    from chains.llm import describe_llm_error
    from mcp_server import mount_mcp
    from service import open_service

    service = service or open_service(settings)
    observability = Observability.create(settings, service)

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
        log.info("ready")
        async with mcp_running():  # the MCP session manager at /mcp
            yield
        gc.unfreeze()  # an app that stops in a process that goes on (tests) leaves nothing frozen
        service.close()
        observability.process_exit()

    app = FastAPI(
        title="milvus-deepseek-rag",
        version="0.1.0",
        description="Answers from your documents, with citations. Milvus + DeepSeek + LangServe.",
        lifespan=lifespan,
    )
    app.state.service = service

    # Pure ASGI middleware (not @app.middleware): it must not buffer streams or hide a
    # client's disconnect from the stream that should cancel the DeepSeek request.
    app.add_middleware(EndFailedStreamsMiddleware)
    install_limits(app, settings)  # inside the key check: only valid keys reach the limits
    if settings.api_key_list:
        app.add_middleware(ApiKeyMiddleware, keys=settings.api_key_list)
    # Request ids, HTTP metrics, /metrics (behind the API keys like every route but /health).
    observability.install(app)

    @app.exception_handler(RagError)
    async def rag_error(_: Request, exc: RagError) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content={"detail": str(exc)})

    @app.exception_handler(openai.APIError)
    async def llm_error(_: Request, exc: openai.APIError) -> JSONResponse:
        error = describe_llm_error(exc, settings.deepseek_base_url) or LLMError(str(exc))
        return JSONResponse(status_code=error.status_code, content={"detail": str(error)})

    @app.get("/health")
    async def health() -> JSONResponse:
        status_code, report = health_report(service)
        if settings.api_key_list:  # open to anyone then: the status alone, no paths or names
            report = {"status": report["status"]}
        return JSONResponse(status_code=status_code, content=report)

    @app.get("/health/details")
    async def health_details() -> JSONResponse:
        status_code, report = health_report(service)
        return JSONResponse(status_code=status_code, content=report)

    app.include_router(make_pages_router(service))

    # Each served runnable reports to the metrics through a LangChain callback handler.
    chain = observability.watch(service.chain)
    add_routes(app, chain, path="/rag")
    add_routes(app, observability.watch(service.chat_chain), path="/chat", playground_type="chat")
    add_routes(app, observability.watch(service.configurable_retriever), path="/retriever")
    app.include_router(make_openai_router(chain, settings.model_list, settings.deepseek_model))
    mcp_running = mount_mcp(app, service, settings)
    app.include_router(make_documents_router(service, settings))
    return app


def health_report(service: RagService) -> tuple[int, dict[str, Any]]:
    """The HTTP status and the report of /health/details: 503 while Milvus is unreachable."""
    report = service.health()
    ok = report["milvus"]
    report["status"] = "ok" if ok and report["collection"] else ("empty" if ok else "down")
    return (200 if ok else 503), report


class ApiKeyMiddleware:
    """API-key auth on every route but /health and the first page's sign-in, before any
    route runs: a bad key never reaches Milvus or DeepSeek, and the key is never logged.
    The key comes as `Authorization: Bearer <key>`, or from a browser that signed in on `/`."""

    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        connection = HTTPConnection(scope)
        if valid_key(presented_key(connection), self.keys):
            await self.app(scope, receive, send)
            return
        if scope["method"] == "GET" and "text/html" in connection.headers.get("accept", ""):
            # A person in a browser (a playground, /docs): to the page that asks for the key.
            await RedirectResponse("/", status_code=303)(scope, receive, send)
            return
        response = JSONResponse(
            status_code=401,
            content={
                "detail": "missing or invalid API key: send Authorization: Bearer <key> "
                "(in a browser, sign in on the first page, /)"
            },
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)


class EndFailedStreamsMiddleware:
    """End a response whose app failed after its first bytes, as a complete response.

    When the chain fails mid-stream, its last data chunk says why ({"error": {...}}), LangServe
    sends its generic `error` event and then re-raises. Passed on, the exception would be
    logged with a traceback twice (Starlette, uvicorn) and uvicorn would drop the connection,
    so that clients read a truncated body. Here it is logged once, a RagError (a stalled or
    failed DeepSeek answer, a deadline) in one line, and the body ends as HTTP says it should.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = ended = False

        async def tracking_send(message: Message) -> None:
            nonlocal started, ended
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                ended = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if not started:
                raise  # the exception handlers answer it with a status and a JSON reason
            reason = _rag_error_behind(exc)
            if reason is not None:
                log.warning("%s %s ended with an error: %s", scope["method"], scope["path"], reason)
            else:
                log.error("%s %s failed mid-response", scope["method"], scope["path"], exc_info=exc)
            if not ended:
                await send({"type": "http.response.body", "body": b"", "more_body": False})


def _rag_error_behind(exc: BaseException) -> RagError | None:
    """The RagError that `exc` is or was raised from. Starlette re-raises an exception that
    has a handler (RagError has) as a RuntimeError from it once the response has started."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, RagError):
        cause = cause.__cause__
    return cause


def __getattr__(name: str) -> Any:
    # `uvicorn server:app` works without building the app (or reading settings) at import.
    if name == "app":
        return create_app()
    raise AttributeError(name)


def main() -> None:
    """`python server.py`: serve with settings from the environment."""
    import uvicorn

    settings = get_settings()
    import_pymilvus_safely()  # before the log configuration: pymilvus sets up its logger on import
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=log_config(settings))


if __name__ == "__main__":
    main()
