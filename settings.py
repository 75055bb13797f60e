"""One typed settings object, read from the environment and `.env` once."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SearchMode = Literal["hybrid", "dense", "sparse"]


class Settings(BaseSettings):
    """Every knob of the service. Environment variables win over `.env`."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    deepseek_api_key: SecretStr | None = Field(default=None, alias="DEEPSEEK_API_KEY")
    deepseek_base_url: str = Field(default="https://api.deepseek.com", alias="DEEPSEEK_BASE_URL")
    deepseek_model: str = Field(default="deepseek-v4-flash", alias="DEEPSEEK_MODEL")
    deepseek_timeout: float = Field(default=60.0, alias="DEEPSEEK_TIMEOUT", gt=0)
    deepseek_max_retries: int = Field(default=2, alias="DEEPSEEK_MAX_RETRIES", ge=0)
    # Model ids a request may pick (configurable `model`); DEEPSEEK_MODEL is always allowed.
    deepseek_models: str = Field(default="deepseek-v4-flash,deepseek-v4-pro", alias="DEEPSEEK_MODELS")
    # Whole-answer budget: DeepSeek sends keep-alive comments while busy, so a read
    # timeout alone never fires.
    deepseek_deadline: float = Field(default=120.0, alias="DEEPSEEK_DEADLINE", gt=0)
    # Longest silence allowed between two streamed chunks before the answer is abandoned.
    deepseek_stall_timeout: float = Field(default=30.0, alias="DEEPSEEK_STALL_TIMEOUT", gt=0)
    # First retry waits this long, then twice as long each time (with jitter).
    deepseek_retry_backoff: float = Field(default=0.5, alias="DEEPSEEK_RETRY_BACKOFF", ge=0)

    milvus_uri: str = Field(default="./milvus_rag.db", alias="MILVUS_URI")
    milvus_token: SecretStr | None = Field(default=None, alias="MILVUS_TOKEN")
    collection: str = Field(default="rag_docs", alias="RAG_COLLECTION", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")

    embedding: str = Field(default="minilm", alias="RAG_EMBEDDING")
    embedding_batch_size: int = Field(default=64, alias="RAG_EMBEDDING_BATCH", ge=1)
    # Questions through an int8 copy of an ONNX export of the model (2x faster than the
    # export, which is 2.5x faster than torch here), the export itself, or torch.
    query_encoder: Literal["onnx-int8", "onnx", "torch"] = Field(
        default="onnx-int8", alias="RAG_QUERY_ENCODER"
    )
    cache_dir: str = Field(default="~/.cache/milvus-deepseek-rag", alias="RAG_CACHE_DIR")
    top_k: int = Field(default=3, alias="RAG_TOP_K", ge=1, le=50)
    max_k: int = Field(default=20, alias="RAG_MAX_K", ge=1)
    search: SearchMode = Field(default="hybrid", alias="RAG_SEARCH")
    index: Literal["FLAT", "HNSW"] = Field(default="FLAT", alias="RAG_INDEX")
    chunk_tokens: int = Field(default=240, alias="RAG_CHUNK_TOKENS", ge=32, le=254)
    max_question_chars: int = Field(default=4000, alias="RAG_MAX_QUESTION_CHARS", ge=1)
    # Earlier messages of a conversation that go to the condense and answer prompts.
    history_messages: int = Field(default=8, alias="RAG_HISTORY_MESSAGES", ge=0, le=100)

    api_keys: SecretStr | None = Field(default=None, alias="RAG_API_KEYS")

    # Documents over HTTP and request limits (documents_api.py, limits.py, docs/http-api.md).
    # Where ingest jobs and uploaded files wait; "": beside a Milvus Lite file, else in RAG_CACHE_DIR.
    jobs_dir: str = Field(default="", alias="RAG_JOBS_DIR")
    max_body_mb: float = Field(default=2.0, alias="RAG_MAX_BODY_MB", gt=0)
    max_upload_mb: float = Field(default=100.0, alias="RAG_MAX_UPLOAD_MB", gt=0)
    max_file_mb: float = Field(default=20.0, alias="RAG_MAX_FILE_MB", gt=0)
    max_unzipped_mb: float = Field(default=1024.0, alias="RAG_MAX_UNZIPPED_MB", gt=0)
    # URLs that resolve to loopback, private or link-local addresses, fetched for a client.
    allow_private_urls: bool = Field(default=False, alias="RAG_ALLOW_PRIVATE_URLS")
    max_batch: int = Field(default=16, alias="RAG_MAX_BATCH", ge=1)
    # Requests per minute per API key (per client address without keys); 0: no limit.
    rate_limit: float = Field(default=0.0, alias="RAG_RATE_LIMIT", ge=0)
    rate_burst: int = Field(default=30, alias="RAG_RATE_BURST", ge=1)
    host: str = Field(default="127.0.0.1", alias="RAG_HOST")
    port: int = Field(default=8000, alias="RAG_PORT", ge=1, le=65535)
    # Log lines as text, or as one JSON object per line (for a log collector).
    log_format: Literal["text", "json"] = Field(default="text", alias="RAG_LOG_FORMAT")
    # prometheus-client's own variable: set, metrics go to files there that every process
    # writing to it shares (multiprocess mode). `rag serve --workers N` sets it for its workers;
    # prometheus-client reads it from the environment when it is imported, so set it there,
    # not in .env.
    prometheus_multiproc_dir: str | None = Field(default=None, alias="PROMETHEUS_MULTIPROC_DIR")

    @property
    def llm_configured(self) -> bool:
        """True when a DeepSeek key is set."""
        return self.deepseek_api_key is not None and bool(self.deepseek_api_key.get_secret_value())

    @property
    def model_list(self) -> list[str]:
        """Model ids a request may choose, the default first."""
        models = [self.deepseek_model] + [m.strip() for m in self.deepseek_models.split(",")]
        return list(dict.fromkeys(m for m in models if m))

    @property
    def api_key_list(self) -> list[str]:
        """The accepted bearer tokens (RAG_API_KEYS, comma-separated); empty: no auth."""
        if self.api_keys is None:
            return []
        return [k.strip() for k in self.api_keys.get_secret_value().split(",") if k.strip()]

    @property
    def milvus_is_server(self) -> bool:
        """True when MILVUS_URI names a server rather than a Milvus Lite file."""
        return self.milvus_uri.startswith(("http://", "https://", "tcp://", "grpc://"))

    @property
    def jobs_path(self) -> Path:
        """The folder of the ingest jobs' database and of uploads waiting to be ingested."""
        if self.jobs_dir:
            return Path(self.jobs_dir).expanduser()
        if self.milvus_is_server:
            return Path(self.cache_dir).expanduser() / "jobs"
        lite = Path(self.milvus_uri).expanduser()
        return lite.with_name(lite.name + "-jobs")

    @model_validator(mode="after")
    def _k_within_limit(self) -> Settings:
        if self.top_k > self.max_k:
            raise ValueError(f"RAG_TOP_K ({self.top_k}) exceeds RAG_MAX_K ({self.max_k})")
        return self

    @model_validator(mode="after")
    def _batch_within_burst(self) -> Settings:
        # A batch costs one request per input: a larger one could never pass.
        if self.rate_limit and self.max_batch > self.rate_burst:
            raise ValueError(f"RAG_MAX_BATCH ({self.max_batch}) exceeds RAG_RATE_BURST ({self.rate_burst})")
        return self

    @field_validator("milvus_uri", mode="before")
    @classmethod
    def _default_when_empty(cls, value: object) -> object:
        return value or "./milvus_rag.db"


def import_pymilvus_safely() -> None:
    """Import pymilvus without letting it choke on a Milvus Lite path in MILVUS_URI.

    pymilvus parses MILVUS_URI (also from `.env`, via load_dotenv) once, when first
    imported, and refuses anything but http(s)://host:port; our MILVUS_URI may be a file.
    It is hidden (set empty, which pymilvus skips and load_dotenv won't override) for the
    import only, then put back for Settings to read.
    """
    import sys

    if "pymilvus" in sys.modules:
        return
    original = os.environ.get("MILVUS_URI")
    os.environ["MILVUS_URI"] = ""
    try:
        import pymilvus  # noqa: F401
    finally:
        if original is None:
            del os.environ["MILVUS_URI"]
        else:
            os.environ["MILVUS_URI"] = original


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read on first use. Tests call `get_settings.cache_clear()`."""
    return Settings()
