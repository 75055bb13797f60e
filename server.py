"""The LangServe app: the chain at /rag, the retriever at /retriever, and /health."""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import openai
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse
from langserve import add_routes

from errors import LLMError, RagError
from settings import Settings, get_settings

if TYPE_CHECKING:
    from chains.service import RagService

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, service: RagService | None = None) -> FastAPI:
    """The FastAPI app. The store and the embedding model open once, at start-up."""
    if settings is None:
        settings = service.settings if service else get_settings()
    # Imported here, after the settings: importing pymilvus reads MILVUS_URI (see settings.py).
    from chains.llm import describe_llm_error
    from chains.service import open_service

    service = service or open_service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            service.get_store()
            # Load the weights now, not on the first request.
            service.embeddings.embed_query("warm up")
        except RagError as exc:
            log.error("starting without Milvus: %s", exc)
        yield
        service.close()

    app = FastAPI(
        title="milvus-deepseek-rag",
        version="0.1.0",
        description="Answers from your documents, with citations. Milvus + DeepSeek + LangServe.",
        lifespan=lifespan,
    )
    app.state.service = service

    keys = [key.encode() for key in settings.api_key_list]
    if keys:

        @app.middleware("http")
        async def require_api_key(request: Request, call_next: Any) -> Any:
            # Checked before any route runs: a bad key never reaches Milvus or DeepSeek.
            if request.url.path == "/health":
                return await call_next(request)
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            given = token.strip().encode()
            if scheme.lower() != "bearer" or not any(hmac.compare_digest(given, k) for k in keys):
                return JSONResponse(
                    status_code=401,
                    content={"detail": "missing or invalid API key: send Authorization: Bearer <key>"},
                    headers={"WWW-Authenticate": "Bearer"},
                )
            return await call_next(request)

    @app.exception_handler(RagError)
    async def rag_error(_: Request, exc: RagError) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content={"detail": str(exc)})

    @app.exception_handler(openai.APIError)
    async def llm_error(_: Request, exc: openai.APIError) -> JSONResponse:
        error = describe_llm_error(exc, settings) or LLMError(str(exc))
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
    add_routes(app, service.configurable_retriever, path="/retriever")
    return app


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
