"""Opening Milvus (a Lite file, a server or Zilliz Cloud) and the collection schema we use."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from errors import StoreError
from settings import Settings, import_pymilvus_safely
from store.embeddings import PymilvusEmbeddings
from store.lite_file import release_lite_file

if TYPE_CHECKING:
    from langchain_milvus import Milvus
    from pymilvus import MilvusClient

log = logging.getLogger(__name__)

TEXT_FIELD = "text"
# One vector per chunk: embedding(chunk text) + HEAD_WEIGHT · embedding(deepest heading).
# Both are unit vectors, so with the IP metric a question q scores
# cos(q, chunk) + HEAD_WEIGHT · cos(q, heading): paraphrased questions match headings best,
# and summing the two in the stored vector costs one search instead of one per vector
# (a hybrid_search over two fields took 2-3x as long in Milvus Lite; docs/benchmarks.md).
DENSE_FIELD = "dense"
HEAD_WEIGHT = 0.5
# Collections made before the summed vector kept the heading in a field of its own.
LEGACY_HEAD_FIELD = "head"
SPARSE_FIELD = "sparse"  # BM25, filled by Milvus from the text
PRIMARY_FIELD = "pk"
# When the chunk was written (Unix seconds). Collections made before it lack the field:
# langchain-milvus leaves out metadata that a collection has no field for, and listings
# report null for them.
INGESTED_AT_FIELD = "ingested_at"


def metadata_schema() -> dict[str, Any]:
    """The scalar fields stored beside each chunk, in langchain-milvus's `metadata_schema` form."""
    from pymilvus import DataType

    return {
        "source": {"dtype": DataType.VARCHAR, "kwargs": {"max_length": 2048}},
        "root": {"dtype": DataType.VARCHAR, "kwargs": {"max_length": 2048}},
        "headers": {
            "dtype": DataType.ARRAY,
            "kwargs": {"element_type": DataType.VARCHAR, "max_capacity": 16, "max_length": 1024},
        },
        "chunk_index": {"dtype": DataType.INT64, "kwargs": {}},
        # The first and last page of a PDF chunk; null for formats without pages.
        "page": {"dtype": DataType.INT64, "kwargs": {"nullable": True}},
        "last_page": {"dtype": DataType.INT64, "kwargs": {"nullable": True}},
        INGESTED_AT_FIELD: {"dtype": DataType.INT64, "kwargs": {}},
    }


# Fields that collections made by earlier versions lack (they can't be added to a collection
# in Milvus Lite): such a collection gets a StoreError that says what to do.
PAGE_FIELDS = ("page", "last_page")


# langchain-milvus's defaults for a BM25 field (`drop_ratio_build` in the search params,
# metric IP) are rejected by Milvus Lite: it wants SPARSE_INVERTED_INDEX with metric BM25.
# IP, not COSINE: the stored vectors are not unit length (see DENSE_FIELD), and IP also
# spares Milvus Lite normalizing every stored vector on each search.
DENSE_INDEX = {"index_type": "FLAT", "metric_type": "IP", "params": {}}
# For collections far beyond what FLAT scans quickly (see docs/benchmarks.md for where).
HNSW_INDEX = {"index_type": "HNSW", "metric_type": "IP", "params": {"M": 16, "efConstruction": 200}}
HNSW_EF = 128
SPARSE_INDEX = {"index_type": "SPARSE_INVERTED_INDEX", "metric_type": "BM25", "params": {}}
DENSE_SEARCH = {"metric_type": "IP", "params": {}}
SPARSE_SEARCH = {"metric_type": "BM25", "params": {}}
# Searches return the text with each hit: cheaper than a second call for the top k
# (0.3 ms against 2 ms for a `get` in Milvus Lite).
OUTPUT_FIELDS = [TEXT_FIELD, "source", "root", "headers", "chunk_index", *PAGE_FIELDS]


GRPC_OPTIONS = {"grpc.keepalive_time_ms": 300_000, "grpc.keepalive_permit_without_calls": False}


def dense_index(settings: Settings) -> dict[str, Any]:
    """Index parameters of the dense field (used when the collection is created)."""
    return HNSW_INDEX if settings.index == "HNSW" else DENSE_INDEX


def dense_search_params(index_type: str) -> dict[str, Any]:
    """Search parameters matching the dense index actually built."""
    if index_type == "HNSW":
        return {"metric_type": "IP", "params": {"ef": HNSW_EF}}
    return DENSE_SEARCH


def dense_vector(chunk: Sequence[float], heading: Sequence[float]) -> list[float]:
    """The stored vector of a chunk, from the unit vectors of its text and its heading."""
    return [c + HEAD_WEIGHT * h for c, h in zip(chunk, heading, strict=True)]


def score(metric: str, distance: float) -> float:
    """A hit's score, higher is better, from the distance Milvus reports for this metric.

    IP is a similarity already. BM25 is a score of at least 0, but Milvus Lite reports it
    negated (as a distance, smaller is better) where Milvus reports it as it is; its size is
    the score on both. tests/integration/test_store.py checks each field on a Lite file and
    on a server, and that Lite still negates (so this can go when it stops).
    """
    return abs(distance) if metric == "BM25" else distance


def connection_args(settings: Settings) -> dict[str, Any]:
    """pymilvus connection arguments for MILVUS_URI / MILVUS_TOKEN."""
    uri = settings.milvus_uri
    if not settings.milvus_is_server:
        path = Path(uri).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        uri = str(path.resolve())
    # pymilvus pings every 10 s even when idle; Milvus Lite's gRPC server (file or
    # `milvus-lite server`) allows one ping per 5 minutes and then answers GOAWAY
    # "too_many_pings", which breaks the next call. Ping no more often than it allows.
    args: dict[str, Any] = {"uri": uri, "grpc_options": GRPC_OPTIONS}
    if settings.milvus_token is not None:
        args["token"] = settings.milvus_token.get_secret_value()
    return args


def describe_failure(settings: Settings, exc: Exception) -> str:
    """A message that says what went wrong opening Milvus and what to do."""
    text = str(exc)
    locked = ("lock" in text.lower(), "Open local milvus failed" in text, "opened by another" in text)
    if not settings.milvus_is_server and any(locked):
        return (
            f"the Milvus Lite file {settings.milvus_uri} is in use by another process "
            "(Milvus Lite allows one process per file): stop `rag serve`, or run "
            "`milvus-lite server --data-dir DIR --port 19530` and set MILVUS_URI=http://127.0.0.1:19530"
        )
    return f"cannot reach Milvus at {settings.milvus_uri}: {text.splitlines()[0] if text else exc!r}"


@dataclass
class RagStore:
    """The langchain-milvus store plus the raw client, for the calls LangChain doesn't wrap."""

    vectorstore: Milvus
    collection: str
    embeddings: PymilvusEmbeddings
    settings: Settings
    _index_type: str | None = None
    _exists: bool = False

    @property
    def client(self) -> MilvusClient:
        """The pymilvus client that the LangChain store owns."""
        return self.vectorstore.client

    @property
    def dense_index_type(self) -> str:
        """The index type of the dense field, as built (read once)."""
        if self._index_type is None:
            try:
                self._index_type = str(
                    self.client.describe_index(self.collection, DENSE_FIELD).get("index_type", "FLAT")
                )
            except Exception:
                return self.settings.index
        return self._index_type

    def exists(self) -> bool:
        """Whether the collection has been created (by a first ingest).

        Asked before every search, so a yes is remembered: collections are never dropped
        by this service (a drop from outside then surfaces as a failed search).
        """
        if not self._exists:
            self._exists = bool(self.client.has_collection(self.collection))
        return self._exists

    def search(
        self, data: Any, field_name: str, limit: int, filter_expr: str, params: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """Best `limit` hits for one query (a vector, or text for BM25) on one vector field.

        Each hit is {"pk", "score", "entity": OUTPUT_FIELDS}, best first; a higher score is
        better for every field (see `score`). Call only when the collection exists.
        """
        hits = self.client.search(
            self.collection,
            data=[data],
            anns_field=field_name,
            limit=limit,
            filter=filter_expr,
            output_fields=OUTPUT_FIELDS,
            search_params=params,
        )[0]
        metric = str(params["metric_type"])
        return [
            {"pk": h[PRIMARY_FIELD], "score": score(metric, float(h["distance"])), "entity": h["entity"]}
            for h in hits
        ]

    def count(self) -> int:
        """Number of chunks stored."""
        if not self.exists():
            return 0
        rows = self.client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0

    def flush(self) -> None:
        """Seal fresh rows so that searches stop scanning the unindexed memtable."""
        if self.exists():
            self.client.flush(self.collection)

    def close(self) -> None:
        """Release the connection and, for a Milvus Lite file, the file itself.

        pymilvus starts an in-process Milvus Lite server per file and keeps it (and the
        file's lock) until the process exits; stopping it lets another process, such as
        `rag ingest` beside a stopped `rag serve`, open the file.
        """
        try:
            self.client.close()
        except Exception:  # pragma: no cover - closing twice is harmless
            log.debug("closing the Milvus client failed", exc_info=True)
        if not self.settings.milvus_is_server:
            release_lite_file(connection_args(self.settings)["uri"])


def check_collection(client: MilvusClient, collection: str, embeddings: PymilvusEmbeddings) -> None:
    """Raise StoreError if an existing collection can't hold this model's vectors."""
    if not client.has_collection(collection):
        return
    info = client.describe_collection(collection)
    fields = {f["name"]: f for f in info.get("fields", [])}
    if not {DENSE_FIELD, SPARSE_FIELD} <= set(fields) or LEGACY_HEAD_FIELD in fields:
        raise StoreError(
            f"collection {collection!r} was not created by this version of the service (fields: "
            f"{', '.join(sorted(fields))}); set RAG_COLLECTION to a new name and ingest again"
        )
    stored_dim = int(fields[DENSE_FIELD].get("params", {}).get("dim", 0))
    if stored_dim != embeddings.dimension:
        raise StoreError(
            f"collection {collection!r} holds {stored_dim}-dimensional vectors but the embedding "
            f"model {embeddings.name!r} makes {embeddings.dimension}-dimensional ones: use the "
            "model it was built with, or set RAG_COLLECTION to a new name and ingest again"
        )
    if not set(PAGE_FIELDS) <= set(fields):
        raise StoreError(
            f"collection {collection!r} was made before page numbers were stored (no "
            f"{'/'.join(PAGE_FIELDS)} fields): set RAG_COLLECTION to a new name and ingest again, "
            "or delete the Milvus Lite file to rebuild it"
        )
    description = info.get("description") or ""
    if description.startswith("{"):
        stored_model = json.loads(description).get("embedding_model")
        if stored_model and stored_model != embeddings.name:
            log.warning(
                "collection %r was built with %s, now querying with %s",
                collection,
                stored_model,
                embeddings.name,
            )


def make_store(settings: Settings, embeddings: PymilvusEmbeddings) -> RagStore:
    """Open (never drop) the collection that settings name; it is created on first ingest."""
    import_pymilvus_safely()
    from langchain_milvus import BM25BuiltInFunction, Milvus

    try:
        vectorstore = Milvus(
            embedding_function=embeddings,
            collection_name=settings.collection,
            collection_description=json.dumps(
                {"embedding_model": embeddings.name, "dimension": embeddings.dimension}
            ),
            connection_args=connection_args(settings),
            consistency_level="Strong",
            index_params=[dense_index(settings), SPARSE_INDEX],
            search_params=[dense_search_params(settings.index), SPARSE_SEARCH],
            drop_old=False,
            auto_id=False,
            primary_field=PRIMARY_FIELD,
            text_field=TEXT_FIELD,
            vector_field=[DENSE_FIELD, SPARSE_FIELD],
            builtin_function=BM25BuiltInFunction(
                input_field_names=TEXT_FIELD, output_field_names=SPARSE_FIELD
            ),
            metadata_schema=metadata_schema(),
        )
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(describe_failure(settings, exc)) from exc
    try:
        check_collection(vectorstore.client, settings.collection, embeddings)
    except StoreError:
        vectorstore.client.close()
        raise
    return RagStore(vectorstore, settings.collection, embeddings, settings)


def one_line(exc: BaseException, expr: str = "") -> str:
    """Milvus's reason for refusing a call, on one line.

    Its filter errors span lines (the expression again, a caret under the fault), and
    pymilvus wraps the reason as `<MilvusException: (code=N, message=...)>`.
    """
    from pymilvus import MilvusException

    text = str(exc.message if isinstance(exc, MilvusException) else exc)
    lines = [line.strip() for line in text.splitlines()]
    kept = [line for line in lines if line and set(line) != {"^"} and line.strip("()") != expr.strip("()")]
    return "; ".join(kept) or type(exc).__name__


def escape(value: str) -> str:
    """A string literal for a Milvus filter expression."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def collection_stats(store: RagStore) -> dict[str, Any]:
    """Chunk count, sources, embedding model, dimension and index type of the collection."""
    stats: dict[str, Any] = {
        "collection": store.collection,
        "total_chunks": 0,
        "sources": [],
        "embedding_model": store.embeddings.name,
        "dimension": store.embeddings.dimension,
        "index_type": store.settings.index,
    }
    if not store.exists():
        return stats
    stats["total_chunks"] = store.count()
    info = store.client.describe_collection(store.collection)
    description = info.get("description") or ""
    if description.startswith("{"):
        stats["embedding_model"] = json.loads(description).get("embedding_model")
    for f in info.get("fields", []):
        if f["name"] == DENSE_FIELD:
            stats["dimension"] = int(f.get("params", {}).get("dim", 0))
    stats["index_type"] = store.dense_index_type
    sources: set[str] = set()
    iterator = store.client.query_iterator(
        store.collection, batch_size=4096, filter="", output_fields=["source"]
    )
    try:
        while rows := iterator.next():
            sources.update(row["source"] for row in rows)
    finally:
        iterator.close()
    stats["sources"] = sorted(sources)
    return stats
