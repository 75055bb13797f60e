"""The retriever: dense, BM25 (sparse) or hybrid search in Milvus, with source filters."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field
from pymilvus import AnnSearchRequest, RRFRanker

from chains.store import DENSE_FIELD, OUTPUT_FIELDS, SPARSE_FIELD, TEXT_FIELD, RagStore, escape
from errors import InputError, StoreError
from settings import SearchMode

RRF_K = 60
# Each side of a hybrid search contributes this many candidates (at least) before fusion.
HYBRID_CANDIDATES = 20


GLOB_SPECIAL = re.compile(r"[*?\[]")


def glob_to_like(pattern: str) -> str:
    """A Milvus `like` pattern that matches at least what a shell glob matches.

    `like` knows only `%` and `_` (and `_` is also a literal in file names), so the
    pattern is the glob's literal prefix when the rest can't be translated exactly;
    `fnmatch` then checks each result.
    """
    if not re.search(r"[_%\[\]]", pattern):
        return pattern.replace("*", "%").replace("?", "_")
    match = GLOB_SPECIAL.search(pattern)
    prefix = pattern[: match.start()] if match else pattern
    return prefix.replace("_", "\\_").replace("%", "\\%") + "%"


def build_filter(source_glob: str | None = None, expr: str | None = None) -> str:
    """The Milvus filter expression for a source glob and/or a raw expression."""
    parts = []
    if source_glob:
        parts.append(f"source like {escape(glob_to_like(source_glob))}")
    if expr:
        parts.append(f"({expr})")
    return " and ".join(parts)


class MilvusRetriever(BaseRetriever):
    """Top-k chunks for a query; each Document's metadata carries `score` and `id`.

    pymilvus is called directly rather than through langchain-milvus's search, which
    can't run a single field of a multi-vector collection nor a BM25-only search.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    # A RagStore, or a function returning one (the server opens the store lazily).
    store: Any = Field(exclude=True)
    k: int = 3
    search: SearchMode = "hybrid"
    source_glob: str | None = None
    expr: str | None = None
    max_k: int = 50

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun | None = None
    ) -> list[Document]:
        return self.retrieve(query)

    def retrieve(
        self,
        query: str,
        k: int | None = None,
        search: SearchMode | None = None,
        source_glob: str | None = None,
        expr: str | None = None,
    ) -> list[Document]:
        """Search with per-call overrides of k, mode and filters."""
        if not isinstance(query, str) or not query.strip():
            raise InputError("the query is empty")
        k = self.k if k is None else k
        if not 1 <= k <= self.max_k:
            raise InputError(f"k must be between 1 and {self.max_k}, got {k}")
        mode = search or self.search
        glob = source_glob if source_glob is not None else self.source_glob
        filter_expr = build_filter(glob, expr if expr is not None else self.expr)
        store: RagStore = self.store() if callable(self.store) else self.store
        if not store.exists():
            return []
        exact = not glob or glob_to_like(glob) == glob.replace("*", "%").replace("?", "_")
        fetch = k if exact else min(max(k * 5, 50), 16384)
        try:
            hits = self._search(store, query, fetch, mode, filter_expr)
        except InputError:
            raise
        except Exception as exc:
            message = str(exc)
            unreachable = any(w in message.lower() for w in ("connect", "unavailable", "deadline"))
            if filter_expr and not unreachable:
                raise InputError(f"invalid filter {filter_expr!r}: {message}") from exc
            raise StoreError(f"search failed at {store.settings.milvus_uri}: {message}") from exc
        documents = [to_document(hit, negated=mode == "sparse") for hit in hits]
        if glob:
            documents = [d for d in documents if fnmatch.fnmatch(d.metadata["source"], glob)]
        return documents[:k]

    def _search(
        self, store: RagStore, query: str, k: int, mode: SearchMode, filter_expr: str
    ) -> list[dict[str, Any]]:
        client, name = store.client, store.collection
        if mode == "sparse":
            return client.search(
                name,
                data=[query],
                anns_field=SPARSE_FIELD,
                limit=k,
                filter=filter_expr,
                output_fields=OUTPUT_FIELDS,
                search_params={"metric_type": "BM25", "params": {}},
            )[0]
        vector = store.embeddings.embed_query(query)
        if mode == "dense":
            return client.search(
                name,
                data=[vector],
                anns_field=DENSE_FIELD,
                limit=k,
                filter=filter_expr,
                output_fields=OUTPUT_FIELDS,
                search_params={"metric_type": "COSINE", "params": {}},
            )[0]
        candidates = max(k, HYBRID_CANDIDATES)
        requests = [
            AnnSearchRequest(
                data=[vector],
                anns_field=DENSE_FIELD,
                param={"metric_type": "COSINE", "params": {}},
                limit=candidates,
                expr=filter_expr or None,
            ),
            AnnSearchRequest(
                data=[query],
                anns_field=SPARSE_FIELD,
                param={"metric_type": "BM25", "params": {}},
                limit=candidates,
                expr=filter_expr or None,
            ),
        ]
        return client.hybrid_search(
            name, reqs=requests, ranker=RRFRanker(RRF_K), limit=k, output_fields=OUTPUT_FIELDS
        )[0]


def to_document(hit: dict[str, Any], negated: bool = False) -> Document:
    """A LangChain Document from one pymilvus search hit."""
    entity = hit.get("entity", hit)
    score = float(hit.get("distance", 0.0))
    if negated:  # Milvus Lite reports BM25 scores negated, as distances
        score = abs(score)
    return Document(
        page_content=entity.get(TEXT_FIELD, ""),
        metadata={
            "id": hit.get("id", hit.get("pk", entity.get("pk"))),
            "source": entity.get("source", ""),
            "root": entity.get("root", ""),
            "headers": list(entity.get("headers") or []),
            "chunk_index": entity.get("chunk_index", 0),
            "score": score,
        },
    )


def make_retriever(
    store: RagStore | Callable[[], RagStore], k: int, search: SearchMode, max_k: int = 50
) -> MilvusRetriever:
    """The retriever over a store (or a function that returns the open store)."""
    return MilvusRetriever(store=store, k=k, search=search, max_k=max_k)
