"""One typed settings object, read from the environment and `.env` once."""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from api_keys import KeyRing, load_keys
from errors import InputError

SearchMode = Literal["hybrid", "dense", "sparse"]
# The knowledge base of RAG_COLLECTION, served at the routes without a /kb/{name} prefix.
DEFAULT_KB = "default"
# A knowledge base's name: part of its collection's name and of its routes' paths.
KB_NAME = re.compile(r"[a-z0-9]+(?:_[a-z0-9]+)*")
KB_NAME_MAX = 32
# Each knowledge base adds its own routes (about 60) and a Milvus collection; Milvus's
# maintainers advise staying well under 1,000 collections (docs/deployment.md).
MAX_KNOWLEDGE_BASES = 100
MILVUS_NAME_MAX = 255


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
    # Questions through an ONNX export of the model (2.5x faster than torch here), its int8
    # copy (faster again, but it costs a model tuned by `rag tune` several questions of
    # quality: docs/benchmarks.md), or torch.
    query_encoder: Literal["onnx-int8", "onnx", "torch"] = Field(default="onnx", alias="RAG_QUERY_ENCODER")
    cache_dir: str = Field(default="~/.cache/milvus-deepseek-rag", alias="RAG_CACHE_DIR")
    top_k: int = Field(default=3, alias="RAG_TOP_K", ge=1, le=50)
    max_k: int = Field(default=20, alias="RAG_MAX_K", ge=1)
    # Dense: on paraphrased questions hybrid scores within a question or two of it at over twice
    # the latency on a large corpus in Milvus Lite (docs/benchmarks.md, rag tune).
    search: SearchMode = Field(default="dense", alias="RAG_SEARCH")
    index: Literal["FLAT", "HNSW"] = Field(default="FLAT", alias="RAG_INDEX")
    chunk_tokens: int = Field(default=240, alias="RAG_CHUNK_TOKENS", ge=32, le=254)
    max_question_chars: int = Field(default=4000, alias="RAG_MAX_QUESTION_CHARS", ge=1)
    # Earlier messages of a conversation that go to the condense and answer prompts.
    history_messages: int = Field(default=8, alias="RAG_HISTORY_MESSAGES", ge=0, le=100)

    api_keys: SecretStr | None = Field(default=None, alias="RAG_API_KEYS")

    # Knowledge bases and scoped keys (docs/deployment.md, "Knowledge bases and keys").
    # More knowledge bases beside the default one, comma-separated: each is the collection
    # RAG_COLLECTION_<name>, served under /kb/<name>/ and named by `rag ... --kb <name>`.
    knowledge_bases: str = Field(default="", alias="RAG_KNOWLEDGE_BASES")
    # A TOML or JSON file of keys limited to some knowledge bases and a role (api_keys.py).
    keys_file: str = Field(default="", alias="RAG_KEYS_FILE")

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
        return _split(self.api_keys.get_secret_value()) if self.api_keys is not None else []

    @property
    def knowledge_base_names(self) -> list[str]:
        """Every knowledge base, the default one first."""
        return [DEFAULT_KB, *_split(self.knowledge_bases)]

    def collection_for(self, kb: str) -> str:
        """The Milvus collection of a knowledge base."""
        return self.collection if kb == DEFAULT_KB else f"{self.collection}_{kb}"

    def for_knowledge_base(self, kb: str) -> Settings:
        """These settings with the collection of `kb`; InputError for an unknown name."""
        if kb not in self.knowledge_base_names:
            raise InputError(
                f"no knowledge base {kb!r}; there are {', '.join(self.knowledge_base_names)} "
                "(RAG_KNOWLEDGE_BASES)"
            )
        return self.model_copy(update={"collection": self.collection_for(kb)})

    @property
    def keys_required(self) -> bool:
        """Whether requests need an API key (RAG_API_KEYS or RAG_KEYS_FILE is set)."""
        return bool(self.api_key_list or self.keys_file)

    def key_ring(self) -> KeyRing:
        """Every accepted key and what it may do (reads RAG_KEYS_FILE)."""
        return load_keys(self.api_key_list, self.keys_file, self.knowledge_base_names)

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

    @field_validator("knowledge_bases")
    @classmethod
    def _valid_knowledge_bases(cls, value: str) -> str:
        names = _split(value)
        for name in names:
            if name == DEFAULT_KB:
                raise ValueError(f"{DEFAULT_KB!r} is the knowledge base of RAG_COLLECTION; name the others")
            if len(name) > KB_NAME_MAX or not KB_NAME.fullmatch(name):
                raise ValueError(
                    f"{name[:40]!r} is not a knowledge base name: lower-case letters and digits, "
                    f"words joined by single underscores, at most {KB_NAME_MAX} characters"
                )
        if len(set(names)) < len(names):
            raise ValueError("a knowledge base is named twice")
        if len(names) > MAX_KNOWLEDGE_BASES:
            raise ValueError(f"{len(names)} knowledge bases; at most {MAX_KNOWLEDGE_BASES}")
        return value

    @model_validator(mode="after")
    def _collections_fit(self) -> Settings:
        longest = max(self.knowledge_base_names, key=len)
        if len(self.collection_for(longest)) > MILVUS_NAME_MAX:
            raise ValueError(
                f"the collection of knowledge base {longest!r} would be longer than "
                f"{MILVUS_NAME_MAX} characters: shorten RAG_COLLECTION"
            )
        return self

    @field_validator("keys_file")
    @classmethod
    def _keys_readable(cls, value: str, info: ValidationInfo) -> str:
        # Read once here, so that a bad keys file stops `rag serve` at start-up with the reason.
        if value and "knowledge_bases" in info.data:
            api_keys = info.data.get("api_keys")
            plain = _split(api_keys.get_secret_value()) if api_keys is not None else []
            load_keys(plain, value, [DEFAULT_KB, *_split(info.data["knowledge_bases"])])
        return value

    @field_validator("milvus_uri", mode="before")
    @classmethod
    def _default_when_empty(cls, value: object) -> object:
        return value or "./milvus_rag.db"


def _split(text: str) -> list[str]:
    """The items of a comma-separated setting, without blanks."""
    return [item.strip() for item in text.split(",") if item.strip()]


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
