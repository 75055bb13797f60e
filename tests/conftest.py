"""Shared fixtures: the corpus, the real embedding model, Milvus Lite files, a `milvus-lite
server` on loopback, and the OpenAI-compatible test server."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from settings import Settings, get_settings, import_pymilvus_safely
from tests.llm_server import LLMServer
from workers import LiteServer

# Test modules import pymilvus directly; a Milvus Lite path in MILVUS_URI must not break that.
import_pymilvus_safely()

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def corpus() -> Path:
    """../shared/corpus (CI has it); a missing corpus fails loudly."""
    path = SHARED / "corpus"
    assert (path / "milvus-faq" / "product_faq.md").is_file(), f"corpus missing at {path}"
    return path


@pytest.fixture(scope="session")
def eval_file() -> Path:
    path = SHARED / "eval" / "dev.jsonl"
    assert path.is_file(), f"eval set missing at {path}"
    return path


@pytest.fixture(scope="session")
def embeddings() -> Any:
    """The real packaged all-MiniLM-L6-v2, loaded once for the session."""
    from store.embeddings import PymilvusEmbeddings

    model = PymilvusEmbeddings("minilm")
    model.embed_query("warm up")
    return model


@pytest.fixture(autouse=True)
def _clear_settings_cache() -> Iterator[None]:
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Milvus gRPC endpoint (`milvus-lite server`) on a free loopback port, started as
    `rag serve --workers` starts it: ready once a pymilvus call is answered."""
    with LiteServer.start(tmp_path_factory.mktemp("milvus-server") / "data") as server:
        yield server.uri


@pytest.fixture(params=["lite", "server"])
def milvus_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each store test runs on a Milvus Lite file and on a server URI."""
    if request.param == "lite":
        return str(tmp_path / "milvus.db")
    return str(request.getfixturevalue("milvus_server"))


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings with a fresh collection per test; keyword overrides use the env names."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "MILVUS_URI": str(tmp_path / "milvus.db"),
            "RAG_COLLECTION": f"t_{uuid.uuid4().hex[:12]}",
            "DEEPSEEK_API_KEY": None,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)

    return make


@pytest.fixture(scope="session")
def _llm_server() -> Iterator[LLMServer]:
    server = LLMServer()
    yield server
    server.close()


@pytest.fixture
def llm_server(_llm_server: LLMServer) -> Iterator[LLMServer]:
    """The OpenAI-compatible test server, reset for each test."""
    _llm_server.reset()
    yield _llm_server
    _llm_server.release.set()
