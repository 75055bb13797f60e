"""The LangServe app: the chain at /rag, the chat at /chat, the retriever at /retriever, the MCP
tools at /mcp, the OpenAI-compatible API at /v1, the documents at /documents, /health; and the
same routes of each other knowledge base under /kb/{name}/ (access.py says who may use which)."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import openai
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from langchain_core.runnables import Runnable
from langserve import add_routes
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from access import AccessMiddleware, add_api_docs, grant_of
from documents_api import DocumentsAPI, make_documents_router
from errors import LLMError, RagError
from limits import install_limits
from observability import Observability, log_config
from openai_api import ModelChoice, make_openai_router, openai_router
from pages import kb_prefix, make_pages_router
from settings import DEFAULT_KB, Settings, get_settings, import_pymilvus_safely

if TYPE_CHECKING:
    from service import RagService

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, service: RagService | None = None) -> FastAPI:
    """The FastAPI app. The store and the embedding model open once, at start-up.

    `service`: the default knowledge base's, when the caller has one (tests); the other
    knowledge bases (RAG_KNOWLEDGE_BASES) share its LLM client and embedding model.
    """
    if settings is None:
        settings = service.settings if service else get_settings()
    # Imported here, after the settings: importing pymilvus reads MILVUS_URI (see settings.py).
    from chains.llm import describe_llm_error
    from mcp_server import mount_mcp
    from service import open_knowledge_bases

    keys = settings.key_ring()
    services = open_knowledge_bases(settings, default=service)
    service = services[DEFAULT_KB]
    observability = Observability.create(settings, services)
    documents = DocumentsAPI(services.values(), settings)
    mcp_endpoints: list[Callable[[], AbstractAsyncContextManager[None]]] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            for kb_service in services.values():
                kb_service.get_store()
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
        async with AsyncExitStack() as running:
            await running.enter_async_context(documents.running())
            for mcp_running in mcp_endpoints:  # the MCP session managers at /mcp, /kb/{name}/mcp
                await running.enter_async_context(mcp_running())
            yield
        gc.unfreeze()  # an app that stops in a process that goes on (tests) leaves nothing frozen
        for kb_service in services.values():
            kb_service.close()
        observability.process_exit()

    app = FastAPI(
        title="milvus-deepseek-rag",
        version="0.1.0",
        description="Answers from your documents, with citations. Milvus + DeepSeek + LangServe.",
        lifespan=lifespan,
        # Served by access.add_api_docs: each key sees the routes of its knowledge bases.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = service
    app.state.services = services  # by knowledge base

    # Pure ASGI middleware (not @app.middleware): it must not buffer streams or hide a
    # client's disconnect from the stream that should cancel the DeepSeek request.
    app.add_middleware(EndFailedStreamsMiddleware)
    install_limits(app, settings)  # inside the key check: only valid keys reach the limits
    app.add_middleware(AccessMiddleware, keys=keys, knowledge_bases=list(services))
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
        if keys.required:  # open to anyone then: the status alone, no paths or names
            report = {"status": report["status"]}
        return JSONResponse(status_code=status_code, content=report)

    @app.get("/health/details")
    async def health_details() -> JSONResponse:
        status_code, report = health_report(service)
        return JSONResponse(status_code=status_code, content=report)

    app.include_router(make_pages_router(services, keys))
    add_api_docs(app, services)

    chains = {}
    for kb, kb_service in services.items():
        prefix = kb_prefix(kb)
        # Each served runnable reports to the metrics through a LangChain callback handler.
        chains[kb] = chain = observability.watch(kb_service.chain)
        add_routes(app, chain, path=f"{prefix}/rag")
        add_routes(
            app, observability.watch(kb_service.chat_chain), path=f"{prefix}/chat", playground_type="chat"
        )
        add_routes(app, observability.watch(kb_service.configurable_retriever), path=f"{prefix}/retriever")
        if prefix:
            app.include_router(
                make_openai_router(chain, settings.model_list, settings.deepseek_model), prefix=prefix
            )
        app.include_router(make_documents_router(documents, kb_service, prefix), prefix=prefix)
        mcp_endpoints.append(mount_mcp(app, kb_service, settings, prefix=prefix, kb=kb))
    # The root /v1 is the default knowledge base's, and takes `{kb}:{model}` for the others.
    app.include_router(
        openai_router(partial(models_for, chains, settings.model_list), settings.deepseek_model)
    )
    return app


def models_for(chains: dict[str, Runnable], models: list[str], request: Request) -> dict[str, ModelChoice]:
    """The model ids of the root /v1 that the caller's key may name: the LLM's models for the
    default knowledge base, and `{kb}:{model}` for each other knowledge base it may read."""
    grant = grant_of(request)
    choices: dict[str, ModelChoice] = {}
    for kb, chain in chains.items():
        if grant.may_read(kb):
            for model in models:
                choices[model if kb == DEFAULT_KB else f"{kb}:{model}"] = ModelChoice(chain, model, kb)
    return choices


def health_report(service: RagService) -> tuple[int, dict[str, Any]]:
    """The HTTP status and the report of /health/details: 503 while Milvus is unreachable."""
    report = service.health()
    ok = report["milvus"]
    report["status"] = "ok" if ok and report["collection"] else ("empty" if ok else "down")
    return (200 if ok else 503), report


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
