"""A Milvus Lite file with the tutorial's FAQ pages ingested once per module."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from service import RagService, open_service
from settings import Settings
from store.indexing import ingest
from tests.llm_server import LLMServer


@pytest.fixture(scope="module")
def faq_db(tmp_path_factory: pytest.TempPathFactory, corpus: Path, embeddings: Any) -> Iterator[Settings]:
    """Settings of a Lite file holding the ingested FAQ (closed again before tests open it)."""
    db = tmp_path_factory.mktemp("faq") / "faq.db"
    settings = Settings(_env_file=None, MILVUS_URI=str(db), RAG_COLLECTION=f"faq_{uuid.uuid4().hex[:8]}")
    service = open_service(settings, llm=None)
    service.embeddings._function = embeddings.function  # reuse the loaded model
    report = ingest([str(corpus / "milvus-faq")], service.get_store(), service.chunker(), progress=False)
    assert report.files == 4 and report.total_chunks >= 60 and not report.skipped
    service.close()
    yield settings


QUESTION = "How is data stored in milvus?"
SECTION = "Where does Milvus store data?"


def with_llm(settings: Settings, server: LLMServer) -> Settings:
    """Settings pointing DeepSeek at the local OpenAI-compatible test server."""
    return settings.model_copy(
        update={
            "deepseek_api_key": server.api_key_secret(),
            "deepseek_base_url": server.url,
            "deepseek_max_retries": 0,
            "deepseek_retry_backoff": 0.0,
        }
    )


def faq_service(settings: Settings, embeddings: Any, llm: Any) -> RagService:
    """A service over the FAQ store, sharing the session's loaded model."""
    service = open_service(settings, llm=llm)
    service.embeddings._function = embeddings.function
    return service


@asynccontextmanager
async def asgi_client(
    settings: Settings, embeddings: Any, llm: Any = "auto"
) -> AsyncIterator[httpx.AsyncClient]:
    """The app for these settings, started, with an httpx client on its ASGI transport."""
    from chains.llm import make_llm
    from server import create_app

    service = faq_service(settings, embeddings, llm=make_llm(settings) if llm == "auto" else llm)
    app = create_app(service=service)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


@contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """A real uvicorn on a free port. The socket listens before the thread starts, so
    clients connect as soon as this yields (the backlog holds them)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
