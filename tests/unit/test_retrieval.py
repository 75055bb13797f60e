"""Filters and the retriever's validation and result mapping, against a fake pymilvus client."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest
from pymilvus import MilvusException

from chains.retrieval import (
    BM25_WEIGHT,
    MilvusRetriever,
    build_filter,
    collapse_sections,
    fuse,
    glob_to_like,
    make_retriever,
    scale,
    to_document,
)
from errors import InputError, StoreError
from store.milvus import RagStore


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
    """Answers `search` with fixed hits per vector field."""

    def __init__(self, hits: dict[str, list[dict[str, Any]]] | None = None, error: Exception | None = None):
        self.hits = hits or {}
        self.error = error
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def search(self, *args: Any, **kwargs: Any) -> list[list[dict[str, Any]]]:
        self.calls.append(("search", args, kwargs))
        if self.error:
            raise self.error
        hits = self.hits.get(kwargs["anns_field"], [])
        fields = kwargs["output_fields"]
        return [
            [
                {"pk": h["pk"], "distance": h["distance"], "entity": {f: h["entity"][f] for f in fields}}
                for h in hits
            ]
        ]


class FakeEmbeddings:
    def __init__(self) -> None:
        self.queries: list[str] = []

    def embed_query(self, text: str) -> list[float]:
        self.queries.append(text)
        return [0.1, 0.2, 0.3]


def fake_store(client: FakeClient, exists: bool = True) -> RagStore:
    """A real RagStore over the fake client, as for a Milvus server."""
    client.has_collection = lambda name: exists  # type: ignore[attr-defined]
    return RagStore(
        vectorstore=cast(Any, SimpleNamespace(client=client)),
        collection="rag_docs",
        embeddings=cast(Any, FakeEmbeddings()),
        settings=cast(Any, SimpleNamespace(milvus_uri="http://milvus:19530", milvus_is_server=True)),
        _index_type="FLAT",
    )


def hit(source: str, distance: float, text: str = "t", headers: tuple[str, ...] = ("H",)) -> dict[str, Any]:
    return {
        "pk": f"id-{source}-{'/'.join(headers)}",
        "distance": distance,
        "entity": {
            "text": text,
            "source": source,
            "root": "/kb",
            "headers": list(headers),
            "chunk_index": 2,
            "page": None,
            "last_page": None,
        },
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


def test_sparse_search_uses_the_raw_text_and_filters_sources() -> None:
    client = FakeClient(
        hits={"sparse": [hit("faq/a.md", -7.5, "alpha"), hit("other/b.md", -3.0), hit("faq/c.md", -1.0)]}
    )
    retriever = MilvusRetriever(store=fake_store(client), k=3, search="sparse")

    docs = retriever.retrieve("milvus storage", k=2, source_glob="faq/*")

    search = [c for c in client.calls if c[0] == "search"]
    assert len(search) == 1
    kwargs = search[0][2]
    assert kwargs["data"] == ["milvus storage"]  # BM25 searches the raw text
    assert kwargs["anns_field"] == "sparse"
    assert kwargs["filter"] == 'source like "faq/%"'
    # "other/b.md" slipped through the (fake) server filter: the glob check drops it.
    assert [d.metadata["source"] for d in docs] == ["faq/a.md", "faq/c.md"]
    first = docs[0]
    assert first.page_content == "alpha"  # the text comes with the hit: no second call
    assert first.metadata == {
        "id": "id-faq/a.md-H",
        "source": "faq/a.md",
        "root": "/kb",
        "headers": ["H"],
        "chunk_index": 2,
        "page": None,
        "last_page": None,
        "score": pytest.approx(7.5),  # Milvus Lite's negated BM25 distance, as a score
    }


def test_dense_scores_keep_their_sign_and_order() -> None:
    # IP can be negative (a chunk pointing away from the question): it ranks last, as it is.
    client = FakeClient(hits={"dense": [hit("a.md", 0.4), hit("b.md", 0.1), hit("c.md", -0.6)]})
    docs = MilvusRetriever(store=fake_store(client), k=3, search="dense").retrieve("q")
    assert [(d.metadata["source"], d.metadata["score"]) for d in docs] == [
        ("a.md", pytest.approx(0.4)),
        ("b.md", pytest.approx(0.1)),
        ("c.md", pytest.approx(-0.6)),
    ]


@pytest.mark.parametrize("sign", [1, -1], ids=["milvus", "milvus lite"])
def test_bm25_scores_are_positive_whichever_sign_the_backend_reports(sign: int) -> None:
    client = FakeClient(hits={"sparse": [hit("a.md", sign * 7.5), hit("b.md", sign * 3.0)]})
    docs = MilvusRetriever(store=fake_store(client), k=2, search="sparse").retrieve("q")
    assert [(d.metadata["source"], d.metadata["score"]) for d in docs] == [
        ("a.md", pytest.approx(7.5)),
        ("b.md", pytest.approx(3.0)),
    ]


def test_dense_search_embeds_once_and_searches_the_summed_vector_once() -> None:
    client = FakeClient(hits={"dense": [hit("a.md", 1.1, "alpha")]})
    store = fake_store(client)
    docs = MilvusRetriever(store=store, k=4, search="dense").retrieve(
        "what is a segment?", expr="chunk_index > 0"
    )
    ((name, _, kwargs),) = client.calls  # one call: the text comes with the hits
    assert name == "search"
    assert store.embeddings.queries == ["what is a segment?"]
    assert kwargs["anns_field"] == "dense" and kwargs["data"] == [[0.1, 0.2, 0.3]]
    assert kwargs["filter"] == "(chunk_index > 0)"
    assert kwargs["search_params"]["metric_type"] == "IP"  # the summed vector isn't unit length
    assert "text" in kwargs["output_fields"]
    assert docs[0].page_content == "alpha"
    assert docs[0].metadata["score"] == pytest.approx(1.1)


def test_hybrid_adds_bm25_and_collapses_sections() -> None:
    client = FakeClient(
        hits={
            "dense": [
                hit("a.md", 1.05, headers=("A", "x")),
                hit("a.md", 1.04, headers=("A", "x")),
                hit("b.md", 1.0),
            ],
            "sparse": [hit("b.md", 9.0), hit("a.md", 1.0, headers=("A", "x"))],
        }
    )
    docs = MilvusRetriever(store=fake_store(client), k=3, search="hybrid").retrieve("segment")
    assert sorted(c[2]["anns_field"] for c in client.calls) == ["dense", "sparse"]
    # b.md wins with BM25; a.md's two chunks of one section count once.
    assert [(d.metadata["source"], d.metadata["headers"]) for d in docs] == [
        ("b.md", ["H"]),
        ("a.md", ["A", "x"]),
    ]
    assert docs[0].metadata["score"] == pytest.approx(1.0 + BM25_WEIGHT * 1.0)


def test_fuse_gives_missing_candidates_the_list_floor() -> None:
    a, b, c = ({"pk": p, "score": 0.0, "entity": {}} for p in "abc")
    lists = [
        (1.0, [{**a, "score": 0.9}, {**b, "score": 0.5}]),
        (0.5, [{**c, "score": 0.8}, {**b, "score": 0.4}]),
    ]
    scores = {h["pk"]: h["score"] for h in fuse(lists)}
    assert scores["a"] == pytest.approx(0.9 + 0.5 * 0.4)  # missing from list 2: its floor
    assert scores["b"] == pytest.approx(0.5 + 0.5 * 0.4)
    assert scores["c"] == pytest.approx(0.5 + 0.5 * 0.8)  # missing from list 1: its floor
    assert [h["pk"] for h in fuse(lists)] == ["a", "c", "b"]
    assert [h["score"] for h in scale([{**a, "score": 2.0}, {**b, "score": 6.0}])] == [0.0, 1.0]


def test_collapse_keeps_the_best_chunk_per_section() -> None:
    hits = [hit("a.md", 0.9, "1"), hit("a.md", 0.8, "2"), hit("b.md", 0.7), hit("a.md", 0.6, "3", ("Other",))]
    kept = collapse_sections(hits)
    assert [(h["entity"]["source"], h["entity"]["text"]) for h in kept] == [
        ("a.md", "1"),
        ("b.md", "t"),
        ("a.md", "3"),
    ]


def test_per_call_mode_overrides_the_default() -> None:
    client = FakeClient()
    MilvusRetriever(store=fake_store(client), k=3, search="hybrid").retrieve("q", search="sparse")
    assert [c[2]["anns_field"] for c in client.calls if c[0] == "search"] == ["sparse"]


def test_bad_filter_is_an_input_error() -> None:
    client = FakeClient(error=RuntimeError("cannot parse expression: chunk_index >>> 2"))
    retriever = MilvusRetriever(store=fake_store(client), k=3, search="sparse")
    with pytest.raises(InputError, match="invalid filter"):
        retriever.retrieve("q", expr="chunk_index >>> 2")


REASON = "unexpected token ')' at column 11\n  (nosuch ==)\n            ^\nexpected literal or '('"


@pytest.mark.parametrize(
    "error",
    [RuntimeError(REASON), MilvusException(code=6, message=REASON)],
    ids=["in process", "over grpc"],
)
def test_milvus_filter_errors_are_reported_on_one_line(error: Exception) -> None:
    # Milvus Lite's parser echoes the expression with a caret under the fault.
    retriever = MilvusRetriever(store=fake_store(FakeClient(error=error)), k=3)
    with pytest.raises(InputError) as caught:
        retriever.retrieve("q", expr="nosuch ==")
    assert str(caught.value) == (
        "invalid filter '(nosuch ==)': unexpected token ')' at column 11; expected literal or '('"
    )


def test_search_failure_without_filter_is_a_store_error() -> None:
    client = FakeClient(error=RuntimeError("connection refused"))
    retriever = MilvusRetriever(store=fake_store(client), k=3, search="sparse")
    with pytest.raises(StoreError, match="http://milvus:19530"):
        retriever.retrieve("q")


def test_unreachable_server_with_a_filter_is_still_a_store_error() -> None:
    client = FakeClient(error=RuntimeError("failed to connect to all addresses; connection refused"))
    retriever = MilvusRetriever(store=fake_store(client), k=3, search="sparse")
    with pytest.raises(StoreError):
        retriever.retrieve("q", source_glob="faq/*")


def test_retriever_is_a_langchain_runnable() -> None:
    client = FakeClient(hits={"dense": [hit("a.md", 0.5, "runnable text")]})
    docs = MilvusRetriever(store=fake_store(client), k=1, search="dense").invoke("q")
    assert [d.page_content for d in docs] == ["runnable text"]


def test_to_document_carries_the_pages_of_a_pdf_chunk() -> None:
    entity = {**hit("guide.pdf", 0.7)["entity"], "page": 3, "last_page": 4}
    doc = to_document({"pk": "p", "distance": 0.7, "entity": entity})
    assert (doc.metadata["page"], doc.metadata["last_page"]) == (3, 4)


def test_to_document_handles_flat_hits() -> None:
    doc = to_document({"pk": "x", "score": 0.5, "text": "flat", "source": "s.md"})
    assert doc.page_content == "flat"
    assert doc.metadata["id"] == "x"
    assert doc.metadata["headers"] == []
    assert doc.metadata["score"] == pytest.approx(0.5)
