"""Settings read the documented environment variables; defaults; the cached accessor."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from settings import Settings, get_settings

ENV_NAMES = [
    "DEEPSEEK_API_KEY",
    "DEEPSEEK_BASE_URL",
    "DEEPSEEK_MODEL",
    "DEEPSEEK_TIMEOUT",
    "DEEPSEEK_MAX_RETRIES",
    "MILVUS_URI",
    "MILVUS_TOKEN",
    "RAG_COLLECTION",
    "RAG_EMBEDDING",
    "RAG_EMBEDDING_BATCH",
    "RAG_TOP_K",
    "RAG_MAX_K",
    "RAG_SEARCH",
    "RAG_CHUNK_TOKENS",
    "RAG_MAX_QUESTION_CHARS",
    "RAG_HOST",
    "RAG_PORT",
]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No inherited variables and no `.env` in the working directory."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_defaults(clean_env: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert s.deepseek_api_key is None
    assert s.deepseek_base_url == "https://api.deepseek.com"
    assert s.deepseek_model == "deepseek-v4-flash"
    assert s.milvus_uri == "./milvus_rag.db"
    assert s.collection == "rag_docs"
    assert s.top_k == 3
    assert s.search == "dense"
    assert s.embedding == "minilm"
    assert s.chunk_tokens <= 254
    assert not s.llm_configured
    assert not s.milvus_is_server


def test_documented_environment_variables_are_read(clean_env: pytest.MonkeyPatch) -> None:
    values = {
        "DEEPSEEK_API_KEY": "sk-env",
        "DEEPSEEK_BASE_URL": "http://localhost:9999/v1",
        "DEEPSEEK_MODEL": "deepseek-v4-pro",
        "DEEPSEEK_TIMEOUT": "12.5",
        "DEEPSEEK_MAX_RETRIES": "0",
        "MILVUS_URI": "http://127.0.0.1:19530",
        "MILVUS_TOKEN": "root:Milvus",
        "RAG_COLLECTION": "team_docs",
        "RAG_EMBEDDING": "default",
        "RAG_EMBEDDING_BATCH": "8",
        "RAG_TOP_K": "7",
        "RAG_MAX_K": "30",
        "RAG_SEARCH": "sparse",
        "RAG_CHUNK_TOKENS": "128",
        "RAG_MAX_QUESTION_CHARS": "500",
        "RAG_HOST": "0.0.0.0",
        "RAG_PORT": "9001",
    }
    assert set(values) == set(ENV_NAMES)
    for name, value in values.items():
        clean_env.setenv(name, value)

    s = Settings()

    assert s.deepseek_api_key is not None and s.deepseek_api_key.get_secret_value() == "sk-env"
    assert s.deepseek_base_url == "http://localhost:9999/v1"
    assert s.deepseek_model == "deepseek-v4-pro"
    assert s.deepseek_timeout == 12.5
    assert s.deepseek_max_retries == 0
    assert s.milvus_uri == "http://127.0.0.1:19530"
    assert s.milvus_token is not None and s.milvus_token.get_secret_value() == "root:Milvus"
    assert s.collection == "team_docs"
    assert s.embedding == "default"
    assert s.embedding_batch_size == 8
    assert s.top_k == 7
    assert s.max_k == 30
    assert s.search == "sparse"
    assert s.chunk_tokens == 128
    assert s.max_question_chars == 500
    assert s.host == "0.0.0.0"
    assert s.port == 9001
    assert s.llm_configured
    assert s.milvus_is_server


def test_dotenv_file_is_read_and_environment_wins(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("RAG_TOP_K=5\nRAG_COLLECTION=from_dotenv\n")
    clean_env.setenv("RAG_COLLECTION", "from_env")
    s = Settings()
    assert s.top_k == 5
    assert s.collection == "from_env"


def test_secrets_are_not_shown(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DEEPSEEK_API_KEY", "sk-very-secret")
    clean_env.setenv("MILVUS_TOKEN", "tok-very-secret")
    s = Settings()
    assert "very-secret" not in repr(s) and "very-secret" not in str(s.model_dump())


def test_empty_key_is_not_configured(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DEEPSEEK_API_KEY", "")
    assert not Settings().llm_configured


@pytest.mark.parametrize("uri", ["https://in03.zillizcloud.com", "tcp://milvus:19530", "grpc://x:1"])
def test_server_uris(clean_env: pytest.MonkeyPatch, uri: str) -> None:
    clean_env.setenv("MILVUS_URI", uri)
    assert Settings().milvus_is_server


def test_lite_file_uri(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("MILVUS_URI", "/data/rag.db")
    assert not Settings().milvus_is_server


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RAG_TOP_K", "0"),
        ("RAG_TOP_K", "51"),
        ("RAG_COLLECTION", "bad-name"),
        ("RAG_COLLECTION", "1starts_with_digit"),
        ("RAG_SEARCH", "fuzzy"),
        ("RAG_CHUNK_TOKENS", "400"),
        ("RAG_PORT", "70000"),
        ("DEEPSEEK_TIMEOUT", "0"),
    ],
)
def test_invalid_values_are_rejected(clean_env: pytest.MonkeyPatch, name: str, value: str) -> None:
    clean_env.setenv(name, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    assert name in str(info.value)


def test_field_names_work_as_keywords() -> None:
    s = Settings(_env_file=None, top_k=9, collection="kw_name")
    assert (s.top_k, s.collection) == (9, "kw_name")


def test_get_settings_is_cached_until_cleared(clean_env: pytest.MonkeyPatch) -> None:
    get_settings.cache_clear()
    clean_env.setenv("RAG_TOP_K", "4")
    first = get_settings()
    assert first.top_k == 4
    clean_env.setenv("RAG_TOP_K", "6")
    assert get_settings() is first
    assert get_settings().top_k == 4
    get_settings.cache_clear()
    assert get_settings().top_k == 6
    get_settings.cache_clear()
