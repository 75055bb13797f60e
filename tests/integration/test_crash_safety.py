"""`kill -9` in the middle of an ingest, then the same ingest again, leaves exactly the
chunks of a clean ingest: nothing duplicated, nothing missing. Lite file and server URI."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from loaders.markdown import Chunker, token_counter
from loaders.sources import DocumentSourceLoader
from store.embeddings import load_tokenizer, packaged_minilm_path
from store.milvus import PRIMARY_FIELD, make_store

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def stored_rows(settings: Any, embeddings: Any) -> tuple[int, list[tuple[str, str, int]]]:
    store = make_store(settings, embeddings)
    try:
        count = store.count()
        rows: list[tuple[str, str, int]] = []
        iterator = store.client.query_iterator(
            store.collection,
            batch_size=1000,
            filter="",
            output_fields=[PRIMARY_FIELD, "source", "chunk_index"],
        )
        while batch := iterator.next():
            rows.extend((r[PRIMARY_FIELD], r["source"], r["chunk_index"]) for r in batch)
        iterator.close()
    finally:
        store.close()
    return count, sorted(rows)


def ingest_command(folder: Path) -> list[str]:
    return [sys.executable, "-m", "cli", "ingest", str(folder), "--json"]


def test_kill_9_during_ingest_then_rerun_matches_a_clean_ingest(
    milvus_uri: str, make_settings: Any, embeddings: Any, corpus: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "docs"
    shutil.copytree(corpus / "milvus-docs" / "about", folder)
    collection = f"crash_{uuid.uuid4().hex[:8]}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("DEEPSEEK_", "MILVUS_", "RAG_"))},
        "MILVUS_URI": milvus_uri,
        "RAG_COLLECTION": collection,
        "RAG_EMBEDDING_BATCH": "16",
    }
    process = subprocess.Popen(
        ingest_command(folder)[:-1],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    # Kill it right after it reports its first written batch: mid-ingest, mid-batch.
    progress = ""
    while "chunks embedded" not in progress:
        char = process.stderr.read(1)
        assert char, f"ingest ended before writing anything: {progress[-500:]}"
        progress += char
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL

    settings = make_settings(MILVUS_URI=milvus_uri, RAG_COLLECTION=collection)
    partial_count, _ = stored_rows(settings, embeddings)
    assert partial_count > 0, "the kill should come after some chunks were written"

    rerun = subprocess.run(
        ingest_command(folder), cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr
    recovered = stored_rows(settings, embeddings)

    # What a clean ingest stores: ids are content hashes, so they can be computed directly.
    chunker = Chunker(token_counter(load_tokenizer(packaged_minilm_path())), settings.chunk_tokens)
    expected_rows = sorted(
        (chunk.id, chunk.metadata["source"], chunk.metadata["chunk_index"])
        for doc in DocumentSourceLoader([str(folder)]).lazy_load()
        for chunk in chunker.split_document(doc)
    )
    expected = (len(expected_rows), expected_rows)

    assert recovered[0] == expected[0] > partial_count
    assert len({pk for pk, _, _ in recovered[1]}) == recovered[0], "no duplicate ids"
    assert recovered[1] == expected[1]
