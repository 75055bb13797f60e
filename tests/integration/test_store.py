"""The store suite, run on a Milvus Lite file and on a `milvus-lite server` URI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langchain_core.documents import Document
from langchain_text_splitters import MarkdownHeaderTextSplitter

from chains.retrieval import make_retriever
from errors import InputError, StoreError
from loaders.markdown import Chunker, token_counter
from loaders.sources import DocumentSourceLoader
from store.embeddings import PymilvusEmbeddings
from store.indexing import ingest
from store.milvus import collection_stats, make_store

pytestmark = pytest.mark.integration

DOCS = {
    "guide/install.md": "# Install\n\n## Requirements\n\nYou need Python 3.11 and make.\n\n"
    "## Steps\n\nRun make serve to install everything and start the server.\n",
    "guide/storage.md": "# Storage\n\n## Where is data kept?\n\nChunks are kept in a Milvus Lite "
    "file called milvus_rag.db unless MILVUS_URI names a server.\n",
    "faq/etcd.md": "# Troubleshooting\n\n## etcd pod pending\n\nThe etcd pod stays pending when "
    "no PersistentVolumeClaim can be bound: create a StorageClass.\n",
}


class CountingEmbeddings(PymilvusEmbeddings):
    """The real model, counting the passages it embeds."""

    def __init__(self, model: PymilvusEmbeddings):
        super().__init__(model.spec)
        self._function = model.function
        self.embedded = 0

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        self.embedded += len(texts)
        return super().embed_documents(texts)


def write_docs(root: Path, docs: dict[str, str]) -> Path:
    for name, text in docs.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.fixture
def setup(make_settings: Any, milvus_uri: str, embeddings: PymilvusEmbeddings, tmp_path: Path) -> Any:
    settings = make_settings(MILVUS_URI=milvus_uri)
    model = CountingEmbeddings(embeddings)
    store = make_store(settings, model)
    chunker = Chunker(token_counter(None), 200)
    root = write_docs(tmp_path / "corpus", DOCS)
    yield settings, model, store, chunker, root
    if store.exists():
        store.client.drop_collection(store.collection)
    store.close()


class UpgradedSplitter(MarkdownHeaderTextSplitter):
    """A langchain-text-splitters release that handles whitespace differently."""

    def split_text(self, text: str) -> list[Document]:
        return [
            Document(page_content=d.page_content.replace(" ", "  "), metadata=d.metadata)
            for d in super().split_text(text)
        ]


def test_reingest_after_a_splitter_upgrade_embeds_nothing(
    setup: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, model, store, chunker, root = setup
    first = ingest([str(root)], store, chunker, progress=False)
    embedded = model.embedded
    texts_before = {d.page_content for d in make_retriever(store, 4, "dense").retrieve("Python make server")}

    monkeypatch.setattr("loaders.markdown.MarkdownHeaderTextSplitter", UpgradedSplitter)
    upgraded = [
        c.page_content for d in DocumentSourceLoader([str(root)]).load() for c in chunker.split_document(d)
    ]
    assert not texts_before & set(upgraded), "the simulated upgrade changes every chunk's text"
    again = ingest([str(root)], store, chunker, progress=False)

    assert (again.added, again.updated, again.deleted, again.unchanged) == (0, 0, 0, first.total_chunks)
    assert model.embedded == embedded, "a splitter upgrade must not re-embed the corpus"
    assert store.count() == first.total_chunks


def test_ingest_is_idempotent_and_tracks_changes(setup: Any) -> None:
    settings, model, store, chunker, root = setup
    first = ingest([str(root)], store, chunker, progress=False)
    assert first.files == 3 and first.added == 4 and first.total_chunks == 4
    # 4 chunk texts and the 4 distinct headings of their sections.
    assert model.embedded == 8

    again = ingest([str(root)], store, chunker, progress=False)
    assert (again.added, again.updated, again.deleted, again.unchanged) == (0, 0, 0, 4)
    assert model.embedded == 8, "an unchanged corpus must embed nothing"

    (root / "guide/storage.md").write_text(
        "# Storage\n\n## Where is data kept?\n\nIn Zilliz Cloud when MILVUS_URI points there.\n"
    )
    changed = ingest([str(root)], store, chunker, progress=False)
    assert (changed.updated, changed.deleted, changed.unchanged) == (1, 1, 3)
    assert store.count() == 4
    texts = [d.page_content for d in make_retriever(store, 3, "dense").retrieve("Zilliz Cloud")]
    assert any("Zilliz Cloud" in t for t in texts)
    assert not any("milvus_rag.db" in t for t in texts)

    (root / "faq/etcd.md").unlink()
    kept = ingest([str(root)], store, chunker, progress=False)
    assert kept.deleted == 0 and store.count() == 4, "without --prune nothing is removed"
    pruned = ingest([str(root)], store, chunker, prune=True, progress=False)
    assert pruned.deleted == 1 and store.count() == 3


def test_prune_never_touches_other_roots(setup: Any, tmp_path: Path) -> None:
    _, _, store, chunker, root = setup
    other = write_docs(tmp_path / "other", {"notes.md": "# Notes\n\nA note about quotas.\n"})
    ingest([str(root), str(other)], store, chunker, progress=False)
    assert store.count() == 5
    report = ingest([str(root)], store, chunker, prune=True, progress=False)
    assert report.deleted == 0 and store.count() == 5


@pytest.mark.parametrize("mode", ["dense", "sparse", "hybrid"])
def test_search_modes_find_the_right_section(setup: Any, mode: str) -> None:
    _, _, store, chunker, root = setup
    ingest([str(root)], store, chunker, progress=False)
    retriever = make_retriever(store, 2, mode)  # type: ignore[arg-type]
    results = retriever.retrieve("etcd pod pending PersistentVolumeClaim")
    assert results, mode
    top = results[0].metadata
    assert top["source"] == "faq/etcd.md"
    assert top["headers"] == ["Troubleshooting", "etcd pod pending"]
    assert top["score"] > 0
    assert len(results) <= 2


def test_source_glob_and_expression_filters(setup: Any) -> None:
    _, _, store, chunker, root = setup
    ingest([str(root)], store, chunker, progress=False)
    retriever = make_retriever(store, 5, "hybrid")
    only_guide = retriever.retrieve("etcd pod pending", source_glob="guide/*")
    assert only_guide and all(d.metadata["source"].startswith("guide/") for d in only_guide)
    by_expr = retriever.retrieve("install", expr='source == "faq/etcd.md"', search="dense")
    assert [d.metadata["source"] for d in by_expr] == ["faq/etcd.md"]
    with pytest.raises(InputError):
        retriever.retrieve("install", expr="source ===== broken")


def test_stats_report_what_is_stored(setup: Any) -> None:
    _, _, store, chunker, root = setup
    ingest([str(root)], store, chunker, progress=False)
    stats = collection_stats(store)
    assert stats["total_chunks"] == 4
    assert stats["sources"] == sorted(DOCS)
    assert stats["dimension"] == 384
    assert stats["embedding_model"] == "all-MiniLM-L6-v2"


def test_collection_with_another_dimension_is_refused(
    make_settings: Any, milvus_uri: str, embeddings: PymilvusEmbeddings
) -> None:
    from langchain_core.embeddings import DeterministicFakeEmbedding

    from store.milvus import RagStore

    settings = make_settings(MILVUS_URI=milvus_uri)
    small = PymilvusEmbeddings("minilm")
    small._dimension = 8
    small._function = type(
        "Fake8",
        (),
        {"encode_documents": lambda self, t: DeterministicFakeEmbedding(size=8).embed_documents(t)},
    )()
    store: RagStore = make_store(settings, small)
    store.vectorstore.add_embeddings(
        ["hello"],
        small.embed_documents(["hello"]),
        [{"source": "a", "root": "r", "headers": [], "chunk_index": 0}],
        ids=["x"],
    )
    store.close()
    with pytest.raises(StoreError) as info:
        make_store(settings, embeddings)
    message = str(info.value)
    assert "8-dimensional" in message and "384-dimensional" in message


def test_collection_of_the_two_vector_layout_is_refused(make_settings: Any, milvus_uri: str) -> None:
    from langchain_core.embeddings import DeterministicFakeEmbedding
    from langchain_milvus import BM25BuiltInFunction, Milvus

    from store.milvus import SPARSE_INDEX, connection_args

    settings = make_settings(MILVUS_URI=milvus_uri)
    fake = DeterministicFakeEmbedding(size=384)
    cosine = {"index_type": "FLAT", "metric_type": "COSINE", "params": {}}
    # The layout of earlier versions: chunk and heading vectors in fields of their own.
    old = Milvus(
        embedding_function=[fake, fake],
        collection_name=settings.collection,
        connection_args=connection_args(settings),
        index_params=[cosine, cosine, SPARSE_INDEX],
        vector_field=["dense", "head", "sparse"],
        builtin_function=BM25BuiltInFunction(input_field_names="text", output_field_names="sparse"),
        primary_field="pk",
        text_field="text",
        auto_id=False,
    )
    vector = fake.embed_query("hello")
    old.add_embeddings(["hello"], [[vector, vector]], ids=["x"])
    try:
        with pytest.raises(StoreError, match="not created by this version.*RAG_COLLECTION"):
            make_store(settings, PymilvusEmbeddings("minilm"))
    finally:
        old.client.drop_collection(settings.collection)
        old.client.close()


def test_collection_made_before_page_numbers_is_refused_with_what_to_do(
    make_settings: Any, milvus_uri: str
) -> None:
    from langchain_core.embeddings import DeterministicFakeEmbedding
    from langchain_milvus import BM25BuiltInFunction, Milvus

    from store.milvus import DENSE_INDEX, SPARSE_INDEX, connection_args, metadata_schema

    settings = make_settings(MILVUS_URI=milvus_uri)
    fake = DeterministicFakeEmbedding(size=384)
    # The layout of the version before: the same fields, without page and last_page.
    schema = {k: v for k, v in metadata_schema().items() if k not in ("page", "last_page")}
    old = Milvus(
        embedding_function=fake,
        collection_name=settings.collection,
        connection_args=connection_args(settings),
        index_params=[DENSE_INDEX, SPARSE_INDEX],
        vector_field=["dense", "sparse"],
        builtin_function=BM25BuiltInFunction(input_field_names="text", output_field_names="sparse"),
        primary_field="pk",
        text_field="text",
        auto_id=False,
        metadata_schema=schema,
    )
    metadata = {"source": "a.md", "root": "/kb", "headers": ["A"], "chunk_index": 0}
    old.add_embeddings(["hello"], [fake.embed_query("hello")], [metadata], ids=["x"])
    try:
        with pytest.raises(StoreError, match="made before page numbers.*RAG_COLLECTION to a new name"):
            make_store(settings, PymilvusEmbeddings("minilm"))
    finally:
        old.client.drop_collection(settings.collection)
        old.client.close()


def test_dense_score_is_chunk_plus_half_heading_similarity(
    setup: Any, embeddings: PymilvusEmbeddings
) -> None:
    from loaders.markdown import heading_text
    from store.milvus import HEAD_WEIGHT

    _, _, store, chunker, root = setup
    ingest([str(root)], store, chunker, progress=False)
    question = "where are the chunks kept?"
    results = make_retriever(store, 3, "dense").retrieve(question)
    assert results[0].metadata["source"] == "guide/storage.md"
    q = embeddings.embed_query(question)

    def dot(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    for doc in results:
        chunk, heading = embeddings.embed_documents([doc.page_content, heading_text(doc)])
        expected = dot(q, chunk) + HEAD_WEIGHT * dot(q, heading)
        assert doc.metadata["score"] == pytest.approx(expected, abs=1e-3)
    scores = [d.metadata["score"] for d in results]
    assert scores == sorted(scores, reverse=True)


def test_every_field_scores_higher_is_better_and_lite_still_negates_bm25(setup: Any) -> None:
    from store.milvus import DENSE_FIELD, DENSE_SEARCH, SPARSE_FIELD, SPARSE_SEARCH

    _, model, store, chunker, root = setup
    ingest([str(root)], store, chunker, progress=False)
    queries = [
        (DENSE_FIELD, model.embed_query("etcd pod pending PersistentVolumeClaim"), DENSE_SEARCH),
        (SPARSE_FIELD, "etcd pod pending PersistentVolumeClaim", SPARSE_SEARCH),
    ]
    for field, data, params in queries:
        hits = store.search(data, field, 10, "", params)
        scores = [h["score"] for h in hits]
        assert hits[0]["entity"]["source"] == "faq/etcd.md", field
        assert scores == sorted(scores, reverse=True), field
        assert scores[0] > 0, field
    # Both backends here are Milvus Lite (a file, and `milvus-lite server`), which reports a BM25
    # hit's distance negated; store.milvus.score takes its size. If this fails, Lite changed its
    # convention: check store.milvus.score against the new one.
    raw = store.client.search(
        store.collection, data=[queries[1][1]], anns_field=SPARSE_FIELD, limit=3, search_params=SPARSE_SEARCH
    )[0]
    assert raw and all(h["distance"] < 0 for h in raw)


def test_a_closed_lite_file_can_be_opened_by_another_process(
    make_settings: Any, embeddings: PymilvusEmbeddings, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    from store.milvus import connection_args

    settings = make_settings(MILVUS_URI=str(tmp_path / "released.db"))
    store = make_store(settings, embeddings)
    assert not store.exists()  # opened (and the file locked) by this process
    store.close()
    # As `rag ingest` beside a stopped `rag serve`: Milvus Lite lets one process hold a file.
    script = (
        "import sys; from pymilvus import MilvusClient\n"
        "client = MilvusClient(uri=sys.argv[1]); print(client.list_collections()); client.close()"
    )
    uri = connection_args(settings)["uri"]
    opened = subprocess.run(
        [sys.executable, "-c", script, uri],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MILVUS_URI": ""},
    )
    assert opened.returncode == 0, opened.stderr[-2000:]
    assert opened.stdout.strip() == "[]"


def test_bad_files_are_skipped_and_nothing_stored_is_lost(setup: Any) -> None:
    _, _, store, chunker, root = setup
    ingest([str(root)], store, chunker, progress=False)
    (root / "guide/storage.md").write_bytes(b"\x00\x01\x02 not text any more")
    (root / "empty.md").write_text("  \n")
    (root / "latin1.md").write_bytes("# Caf\xe9\n".encode("latin-1"))
    (root / "loop").symlink_to(root)
    report = ingest([str(root)], store, chunker, prune=True, progress=False)
    reasons = {Path(s.path).name: s.reason for s in report.skipped}
    assert reasons["storage.md"] == "binary file"
    assert reasons["empty.md"] == "empty file"
    assert reasons["latin1.md"].startswith("not UTF-8")
    assert any("symlink loop" in s.reason for s in report.skipped)
    assert report.failed and report.deleted == 0
    assert store.count() == 4, "the unreadable file's chunks are kept, even with --prune"


def test_hnsw_index_is_built_and_searched(
    make_settings: Any, milvus_uri: str, embeddings: PymilvusEmbeddings, tmp_path: Path
) -> None:
    settings = make_settings(MILVUS_URI=milvus_uri, RAG_INDEX="HNSW")
    store = make_store(settings, embeddings)
    try:
        root = write_docs(tmp_path / "hnsw", DOCS)
        ingest([str(root)], store, Chunker(token_counter(None), 200), progress=False)
        assert collection_stats(store)["index_type"] == "HNSW"
        top = make_retriever(store, 1, "dense").retrieve("etcd pod pending PersistentVolumeClaim")[0]
        assert top.metadata["source"] == "faq/etcd.md"
    finally:
        store.client.drop_collection(store.collection)
        store.close()
