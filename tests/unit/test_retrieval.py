"""Filters and the retriever's validation and result mapping, against a fake pymilvus client."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest

from chains.retrieval import MilvusRetriever, build_filter, glob_to_like, make_retriever, to_document
from errors import InputError, StoreError


@pytest.mark.parametrize(
    ("glob", "like"),
    [
        ("faq/*", "faq/%"),
        ("*.md", "%.md"),
        ("faq/?.md", "faq/_.md"),
        ("100%/*", "100\\%/%"),
        ("exact.md", "exact.md"),
    ],
)
def test_glob_to_like(glob: str, like: str) -> None:
    assert glob_to_like(glob) == like


def test_build_filter_combinations() -> None:
    assert build_filter() == ""
    assert build_filter(None, None) == ""
    assert build_filter("faq/*") == 'source like "faq/%"'
    assert build_filter(expr="chunk_index > 2") == "(chunk_index > 2)"
    assert build_filter("faq/*", "chunk_index > 2 or chunk_index < 1") == (
        'source like "faq/%" and (chunk_index > 2 or chunk_index < 1)'
    )


def test_build_filter_escapes_quotes_in_globs() -> None:
    assert build_filter('we"ird\\*') == 'source like "we\\"ird\\\\%"'


class ExplodingStore:
    """Any use of the store fails the test: validation must come first."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the store was used ({name}) before the input was validated")


@pytest.mark.parametrize("query", ["", "   ", "\n\t"])
def test_empty_query_is_an_input_error(query: str) -> None:
    retriever = MilvusRetriever(store=ExplodingStore(), k=3, max_k=20)
    with pytest.raises(InputError, match="empty"):
        retriever.retrieve(query)


@pytest.mark.parametrize("k", [0, -1, 21, 1000])
def test_k_out_of_range_is_an_input_error(k: int) -> None:
    retriever = MilvusRetriever(store=ExplodingStore(), k=3, max_k=20)
    with pytest.raises(InputError, match="between 1 and 20"):
        retriever.retrieve("what is milvus?", k=k)


def test_default_k_out_of_range_is_an_input_error() -> None:
    retriever = make_retriever(cast(Any, ExplodingStore()), k=30, search="dense", max_k=20)
    with pytest.raises(InputError):
        retriever.retrieve("what is milvus?")


class FakeClient:
    def __init__(self, hits: list[dict[str, Any]] | None = None, error: Exception | None = None):
        self.hits = hits or []
        self.error = error
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def search(self, *args: Any, **kwargs: Any) -> list[list[dict[str, Any]]]:
        self.calls.append(("search", args, kwargs))
        if self.error:
            raise self.error
        return [self.hits]

    def hybrid_search(self, *args: Any, **kwargs: Any) -> list[list[dict[str, Any]]]:
        self.calls.append(("hybrid_search", args, kwargs))
        if self.error:
            raise self.error
        return [self.hits]


class FakeEmbeddings:
    def __init__(self) -> None:
        self.queries: list[str] = []

    def embed_query(self, text: str) -> list[float]:
        self.queries.append(text)
        return [0.1, 0.2, 0.3]


def fake_store(client: FakeClient, exists: bool = True) -> Any:
    return SimpleNamespace(
        client=client,
        collection="rag_docs",
        embeddings=FakeEmbeddings(),
        settings=SimpleNamespace(milvus_uri="./test.db"),
        exists=lambda: exists,
    )


def hit(source: str, distance: float, text: str = "t") -> dict[str, Any]:
    return {
        "id": f"id-{source}",
        "distance": distance,
        "entity": {"text": text, "source": source, "root": "/kb", "headers": ["H"], "chunk_index": 2},
    }


def test_missing_collection_gives_no_results() -> None:
    client = FakeClient()
    opened = []

    def open_store() -> Any:
        opened.append(True)
        return fake_store(client, exists=False)

    retriever = make_retriever(open_store, k=3, search="hybrid")
    assert retriever.retrieve("anything") == []
    assert opened == [True]  # the store function is called lazily, at query time
    assert client.calls == []


def test_sparse_search_maps_hits_and_filters_sources() -> None:
    client = FakeClient(hits=[hit("faq/a.md", -7.5, "alpha"), hit("other/b.md", -3.0), hit("faq/c.md", -1.0)])
    retriever = MilvusRetriever(store=fake_store(client), k=3, search="sparse")

    docs = retriever.retrieve("milvus storage", k=2, source_glob="faq/*")

    ((name, args, kwargs),) = client.calls
    assert name == "search" and args == ("rag_docs",)
    assert kwargs["data"] == ["milvus storage"]  # BM25 searches the raw text
    assert kwargs["anns_field"] == "sparse"
    assert kwargs["limit"] == 2
    assert kwargs["filter"] == 'source like "faq/%"'
    # "other/b.md" slipped through the (fake) server filter: the glob check drops it.
    assert [d.metadata["source"] for d in docs] == ["faq/a.md", "faq/c.md"]
    first = docs[0]
    assert first.page_content == "alpha"
    assert first.metadata["score"] == pytest.approx(7.5)
    assert first.metadata == {
        "id": "id-faq/a.md",
        "source": "faq/a.md",
        "root": "/kb",
        "headers": ["H"],
        "chunk_index": 2,
        "score": pytest.approx(7.5),
    }


def test_dense_search_embeds_the_query() -> None:
    client = FakeClient(hits=[hit("a.md", 0.8)])
    store = fake_store(client)
    docs = MilvusRetriever(store=store, k=4, search="dense").retrieve(
        "what is a segment?", expr="chunk_index > 0"
    )
    ((name, _, kwargs),) = client.calls
    assert name == "search"
    assert store.embeddings.queries == ["what is a segment?"]
    assert kwargs["data"] == [[0.1, 0.2, 0.3]]
    assert kwargs["anns_field"] == "dense"
    assert kwargs["limit"] == 4
    assert kwargs["filter"] == "(chunk_index > 0)"
    assert docs[0].metadata["score"] == pytest.approx(0.8)


def test_hybrid_search_fuses_dense_and_sparse() -> None:
    client = FakeClient(hits=[hit("a.md", 0.03)])
    store = fake_store(client)
    docs = MilvusRetriever(store=store, k=3, search="hybrid").retrieve("segment")
    ((name, _, kwargs),) = client.calls
    assert name == "hybrid_search"
    assert kwargs["limit"] == 3
    fields = sorted(r.anns_field for r in kwargs["reqs"])
    assert fields == ["dense", "sparse"]
    assert all(r.limit >= 3 for r in kwargs["reqs"])
    assert [d.metadata["source"] for d in docs] == ["a.md"]


def test_per_call_mode_overrides_the_default() -> None:
    client = FakeClient()
    MilvusRetriever(store=fake_store(client), k=3, search="hybrid").retrieve("q", search="sparse")
    assert client.calls[0][0] == "search"


def test_bad_filter_is_an_input_error() -> None:
    client = FakeClient(error=RuntimeError("cannot parse expression: chunk_index >>> 2"))
    retriever = MilvusRetriever(store=fake_store(client), k=3, search="sparse")
    with pytest.raises(InputError, match="invalid filter"):
        retriever.retrieve("q", expr="chunk_index >>> 2")


def test_search_failure_without_filter_is_a_store_error() -> None:
    client = FakeClient(error=RuntimeError("connection refused"))
    retriever = MilvusRetriever(store=fake_store(client), k=3, search="sparse")
    with pytest.raises(StoreError, match="./test.db"):
        retriever.retrieve("q")


def test_unreachable_server_with_a_filter_is_still_a_store_error() -> None:
    client = FakeClient(error=RuntimeError("failed to connect to all addresses; connection refused"))
    retriever = MilvusRetriever(store=fake_store(client), k=3, search="sparse")
    with pytest.raises(StoreError):
        retriever.retrieve("q", source_glob="faq/*")


def test_retriever_is_a_langchain_runnable() -> None:
    client = FakeClient(hits=[hit("a.md", 0.5, "runnable text")])
    docs = MilvusRetriever(store=fake_store(client), k=1, search="dense").invoke("q")
    assert [d.page_content for d in docs] == ["runnable text"]


def test_to_document_handles_flat_hits() -> None:
    doc = to_document({"pk": "x", "distance": 0.5, "text": "flat", "source": "s.md"})
    assert doc.page_content == "flat"
    assert doc.metadata["id"] == "x"
    assert doc.metadata["headers"] == []
    assert doc.metadata["score"] == pytest.approx(0.5)
