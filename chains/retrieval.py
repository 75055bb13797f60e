"""The retriever: dense, BM25 (sparse) or hybrid search in Milvus, with source filters."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import ConfigurableField, Runnable
from pydantic import ConfigDict, Field

from errors import InputError, StoreError
from settings import SearchMode
from store.milvus import (
    DENSE_FIELD,
    SPARSE_FIELD,
    SPARSE_SEARCH,
    TEXT_FIELD,
    RagStore,
    dense_search_params,
    escape,
    one_line,
)

# Each list (dense, BM25) contributes this many candidates.
CANDIDATES = 20
BM25_WEIGHT = 0.05


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
    # "" (not None) means no filter: these fields are the per-request settings that
    # LangServe's playground draws, and its form renderer cannot draw an optional field.
    source_glob: str = ""
    expr: str = ""
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
        fetch = k if exact else max(k * 5, 50)
        try:
            ranked = self._rank(store, query, fetch, mode, filter_expr)
            if glob:
                ranked = [h for h in ranked if fnmatch.fnmatch(h["entity"]["source"], glob)]
            return [to_document(hit) for hit in collapse_sections(ranked)[:k]]
        except InputError:
            raise
        except Exception as exc:
            message = one_line(exc, filter_expr)
            unreachable = any(w in message.lower() for w in ("connect", "unavailable", "deadline"))
            if filter_expr and not unreachable:
                raise InputError(f"invalid filter {filter_expr!r}: {message}") from exc
            raise StoreError(f"search failed at {store.settings.milvus_uri}: {message}") from exc

    def _rank(
        self, store: RagStore, query: str, k: int, mode: SearchMode, filter_expr: str
    ) -> list[dict[str, Any]]:
        """Hits best first, each {"pk", "score" (higher is better), "entity": the stored fields}."""
        # Candidates per list: enough to fill k distinct sections after collapsing.
        limit = min(max(k * 4, CANDIDATES), 16384)

        def search(data: Any, field: str, params: dict[str, Any]) -> list[dict[str, Any]]:
            return store.search(data, field, limit, filter_expr, params)

        if mode == "sparse":
            return search(query, SPARSE_FIELD, SPARSE_SEARCH)
        # One search scores cos(chunk) + 0.5·cos(heading): see store.milvus.DENSE_FIELD.
        dense = search(
            store.embeddings.embed_query(query), DENSE_FIELD, dense_search_params(store.dense_index_type)
        )
        if mode == "dense":
            return dense
        # BM25 after the dense search, not beside the embedding in a thread: on 2 cores the
        # overlap bought nothing (docs corpus, the two interleaved over 200 queries: p50
        # 46.4 ms in a thread, 44.8 ms in turn), as both want the interpreter and the cores.
        lexical = search(query, SPARSE_FIELD, SPARSE_SEARCH)
        return fuse([(1.0, dense), (BM25_WEIGHT, scale(lexical))])


def scale(hits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """BM25 scores min-max scaled to 0..1 within the list (they are unbounded)."""
    if not hits:
        return hits
    low, high = min(h["score"] for h in hits), max(h["score"] for h in hits)
    span = (high - low) or 1.0
    return [{**h, "score": (h["score"] - low) / span} for h in hits]


def fuse(lists: list[tuple[float, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Weighted sum of scores across lists: (cos(chunk) + 0.5·cos(heading)) + 0.05·BM25.

    A candidate missing from a list gets that list's lowest returned score (all we know
    is that it ranks below it). Measured on dev.jsonl over the 224 doc pages, this beats
    Milvus's RRFRanker (the weak BM25 list pulls right answers down) and its
    WeightedRanker (which squashes scores before adding them); see docs/benchmarks.md.
    """
    merged = {h["pk"]: h for _, hits in reversed(lists) for h in hits}
    total = dict.fromkeys(merged, 0.0)
    for weight, hits in lists:
        floor = min((h["score"] for h in hits), default=0.0)
        scores = {h["pk"]: h["score"] for h in hits}
        for pk in merged:
            total[pk] += weight * scores.get(pk, floor)
    ranked = sorted(merged.values(), key=lambda h: -total[h["pk"]])
    return [{**h, "score": total[h["pk"]]} for h in ranked]


def collapse_sections(hits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the best chunk of each section: k results should be k different sections."""
    seen: set[tuple[str, tuple[str, ...]]] = set()
    kept = []
    for hit in hits:
        key = (hit["entity"]["source"], tuple(hit["entity"].get("headers") or []))
        if key not in seen:
            seen.add(key)
            kept.append(hit)
    return kept


def to_document(hit: dict[str, Any]) -> Document:
    """A LangChain Document from one hit of `RagStore.search` (or of `fuse`)."""
    entity = hit.get("entity", hit)
    score = float(hit.get("score", 0.0))
    return Document(
        page_content=entity.get(TEXT_FIELD, ""),
        metadata={
            "id": hit.get("id", hit.get("pk", entity.get("pk"))),
            "source": entity.get("source", ""),
            "root": entity.get("root", ""),
            "headers": list(entity.get("headers") or []),
            "chunk_index": entity.get("chunk_index", 0),
            "page": entity.get("page"),
            "last_page": entity.get("last_page"),
            "score": score,
        },
    )


def make_retriever(
    store: RagStore | Callable[[], RagStore], k: int, search: SearchMode, max_k: int = 50
) -> MilvusRetriever:
    """The retriever over a store (or a function that returns the open store)."""
    return MilvusRetriever(store=store, k=k, search=search, max_k=max_k)


def per_request_settings(retriever: MilvusRetriever) -> Runnable:
    """The retriever with k, search mode, source glob and filter settable per call.

    Over LangServe: `{"config": {"configurable": {"k": 5, "search": "dense",
    "source": "faq/*", "filter": "chunk_index == 0"}}}`.
    """
    return retriever.configurable_fields(
        k=ConfigurableField(id="k", name="k", description="passages to retrieve"),
        search=ConfigurableField(id="search", name="search", description="hybrid, dense or sparse"),
        source_glob=ConfigurableField(id="source", name="source", description="glob on the source path"),
        expr=ConfigurableField(id="filter", name="filter", description="Milvus filter expression"),
    )
