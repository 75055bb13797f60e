"""`rag tune` end to end on the FAQ pages: mine, train a step, re-embed into a new collection,
compare, switch, query with the tuned model (and its ONNX encoder), ingest more, roll back;
an interrupted tune leaves the old collection serving; a worse model is not switched to."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pymilvus import MilvusClient

import service as service_module
from service import open_service, rollback_collection, tune_collection
from settings import Settings
from store.active import active_alias, resolve
from store.indexing import ingest
from store.milvus import DENSE_FIELD, HEAD_WEIGHT
from store.tuning import TuneConfig, read_chunks, read_model_record
from tests.llm_server import LLMServer

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RAG = [sys.executable, "-m", "cli"]
QUESTION = "How is data stored in milvus?"
SECTION = "Where does Milvus store data?"
# A step or two of training: enough to change the weights, quick on 2 cores.
QUICK = ["--max-pairs", "16", "--batch-size", "8"]


def clean_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEEPSEEK_", "MILVUS_", "RAG_"))}
    env.update(values)
    return env


def rag(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(RAG + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def top_section(env: dict[str, str]) -> list[str]:
    result = rag(["search", QUESTION, "--json", "-k", "1"], env)
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout)["results"][0]["headers"])


def test_tune_switches_to_the_tuned_model_ingest_uses_it_and_rollback_returns(
    tmp_path: Path, corpus: Path, eval_file: Path
) -> None:
    db = tmp_path / "tune.db"
    cache = tmp_path / "cache"
    env = clean_env(MILVUS_URI=str(db), RAG_CACHE_DIR=str(cache))
    assert rag(["ingest", str(corpus / "milvus-faq"), "--quiet"], env).returncode == 0

    result = rag(["tune", *QUICK, "--force", "--eval", str(eval_file)], env)
    assert result.returncode == 0, result.stderr
    assert "tune: training" in result.stderr and "tune: re-embedding" in result.stderr  # the bars
    assert "| held-out sentences |" in result.stdout and "| dev.jsonl | 36 |" in result.stdout
    assert "→" in result.stdout and "switched: rag_docs is now served by rag_docs__ft_" in result.stdout

    stats = json.loads(rag(["stats", "--json"], env).stdout)
    model = stats["embedding_model"]
    assert model.startswith("all-MiniLM-L6-v2-tuned-") and stats["base_model"] == "all-MiniLM-L6-v2"
    assert stats["active_collection"] == f"rag_docs__ft_{model.rsplit('-', 1)[1]}"
    assert stats["collection"] == "rag_docs" and stats["tuned_from"] == "rag_docs"
    assert stats["total_chunks"] >= 60 and stats["tune"]["after"]["dev.jsonl"]["questions"] == 36
    model_dir = cache / "models" / model
    record = read_model_record(model_dir)
    assert record["base_model"] == "all-MiniLM-L6-v2" and record["data"]["train_pairs"] == 16
    assert record["figures"]["switched"] is True

    # Questions go through the tuned model's own ONNX export, or on request its int8 copy.
    assert top_section(env) == ["Product FAQ", SECTION]
    exports = [p for p in cache.glob(f"{model}-*.onnx") if not p.name.endswith("-int8.onnx")]
    assert exports, sorted(p.name for p in cache.iterdir())
    assert top_section({**env, "RAG_QUERY_ENCODER": "onnx-int8"}) == ["Product FAQ", SECTION]
    assert list(cache.glob(f"{model}-*-int8.onnx")), sorted(p.name for p in cache.iterdir())

    # Chunks ingested now are embedded with the tuned model, into the tuned collection.
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "notes.md").write_text("# Team notes\n\n## Backups\n\nWe back up the Milvus bucket nightly.\n")
    added = json.loads(rag(["ingest", str(extra), "--json"], env).stdout)
    assert added["added"] == 1 and added["total_chunks"] == stats["total_chunks"] + 1
    service = open_service(Settings(_env_file=None, MILVUS_URI=str(db), RAG_CACHE_DIR=str(cache)), llm=None)
    try:
        store = service.get_store()
        assert store.collection == stats["active_collection"] and store.embeddings.name == model
        (row,) = store.client.query(
            store.collection, filter='source == "notes.md"', output_fields=["text", DENSE_FIELD]
        )
        text, heading = np.asarray(store.embeddings.embed_documents([row["text"], "Backups"]))
    finally:
        service.close()
    from sentence_transformers import SentenceTransformer

    # The tuned weights themselves, loaded apart from the service, give the stored vector.
    alone = SentenceTransformer(str(model_dir), device="cpu").encode([row["text"]], normalize_embeddings=True)
    assert float(alone[0] @ text) > 0.9999
    expected = text + HEAD_WEIGHT * heading
    stored = np.asarray(row[DENSE_FIELD])
    assert float(stored @ expected / np.linalg.norm(stored) / np.linalg.norm(expected)) > 0.9999

    result = rag(["tune", "--rollback"], env)
    assert result.returncode == 0, result.stderr
    assert f"rag_docs is served by rag_docs again (was {stats['active_collection']})" in result.stdout
    stats = json.loads(rag(["stats", "--json"], env).stdout)
    assert stats["active_collection"] == "rag_docs" and stats["embedding_model"] == "all-MiniLM-L6-v2"
    assert top_section(env) == ["Product FAQ", SECTION]
    result = rag(["tune", "--rollback"], env)
    assert result.returncode == 2 and "replaced nothing" in result.stderr


@pytest.fixture
def faq_on_server(milvus_server: str, corpus: Path, embeddings: Any, tmp_path: Path) -> Settings:
    """The FAQ ingested into a fresh collection of the `milvus-lite server`."""
    settings = Settings(
        _env_file=None,
        MILVUS_URI=milvus_server,
        RAG_COLLECTION=f"tune_{uuid.uuid4().hex[:8]}",
        RAG_CACHE_DIR=str(tmp_path / "cache"),
        RAG_QUERY_ENCODER="torch",
        DEEPSEEK_API_KEY=None,
    )
    service = open_service(settings, llm=None)
    service.embeddings._function = embeddings.function
    report = ingest([str(corpus / "milvus-faq")], service.get_store(), service.chunker(), progress=False)
    assert report.total_chunks >= 60
    service.close()
    return settings


def test_an_interrupted_tune_leaves_the_old_collection_serving(
    faq_on_server: Settings, embeddings: Any
) -> None:
    settings = faq_on_server
    env = clean_env(
        MILVUS_URI=settings.milvus_uri,
        RAG_COLLECTION=settings.collection,
        RAG_CACHE_DIR=settings.cache_dir,
        RAG_QUERY_ENCODER="torch",
    )
    serving = open_service(settings, llm=None)
    serving.embeddings._function = embeddings.function
    # A Ctrl-C from a terminal: the suite itself may run with SIGINT ignored (`nohup`, `make
    # test &`), which a child would inherit; a handler, unlike SIG_IGN, is reset at exec.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        tune = subprocess.Popen(
            [*RAG, "tune"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        assert tune.stderr is not None
        seen = ""
        while "tune: training" not in seen:
            char = tune.stderr.read(1)
            assert char, f"tune ended before training: {seen}"
            seen += char
        # Training runs in the other process while this one answers from the old collection.
        (hit,) = serving.retriever.retrieve(QUESTION, k=1)
        assert SECTION in hit.metadata["headers"]
        tune.send_signal(signal.SIGINT)
        _, rest = tune.communicate(timeout=120)
    finally:
        if tune.poll() is None:
            tune.kill()
    assert tune.returncode == 130, seen + rest
    assert "rag: interrupted" in rest and "Traceback" not in rest

    client = MilvusClient(settings.milvus_uri)
    try:
        assert not [c for c in client.list_collections() if c.startswith(f"{settings.collection}__")]
        assert active_alias(settings.collection) not in client.list_aliases()["aliases"]
    finally:
        client.close()
    (hit,) = serving.retriever.retrieve(QUESTION, k=1)
    assert SECTION in hit.metadata["headers"] and serving.get_store().collection == settings.collection
    serving.close()
    assert not list((Path(settings.cache_dir) / "models").glob("*-tuned-*")), "no model was saved"


def test_a_worse_model_is_not_switched_to_unless_forced_and_a_running_service_follows_a_switch(
    faq_on_server: Settings, embeddings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = faq_on_server
    serving = open_service(settings, llm=None)
    serving.embeddings._function = embeddings.function
    assert serving.retriever.retrieve(QUESTION, k=1)
    # A learning rate this high wrecks the weights in a few steps.
    # Measured in dense mode: the held-out sentences are the chunks' own words, which BM25 finds
    # in hybrid mode however wrecked the dense vectors are.
    wrecked = TuneConfig(max_pairs=32, batch_size=8, learning_rate=5e-3, epochs=6)
    dense = settings.model_copy(update={"search": "dense"})
    report = tune_collection(dense, config=wrecked, progress=False)
    assert not report.switched and report.reason.startswith("worse on held-out sentences")
    assert report.after["held-out sentences"]["mrr@10"] < report.before["held-out sentences"]["mrr@10"]
    client = MilvusClient(settings.milvus_uri)
    try:
        assert not client.has_collection(report.built), "the rejected collection is dropped"
        assert resolve(client, settings.collection) == settings.collection
    finally:
        client.close()

    report = tune_collection(
        settings, config=TuneConfig(max_pairs=16, batch_size=8), force=True, progress=False
    )
    assert report.switched
    monkeypatch.setattr(service_module, "ACTIVE_RECHECK_S", 0.0)
    (hit,) = serving.retriever.retrieve(QUESTION, k=1)
    assert serving.get_store().collection == report.built
    assert serving.embeddings.name == report.model and SECTION in hit.metadata["headers"]
    assert rollback_collection(settings) == (report.built, settings.collection)
    serving.retriever.retrieve(QUESTION, k=1)
    assert serving.get_store().collection == settings.collection
    assert serving.embeddings.name == "all-MiniLM-L6-v2"
    serving.close()


def test_doc2query_adds_written_questions_from_the_llm(
    faq_on_server: Settings, llm_server: LLMServer
) -> None:
    from chains.doc2query import cache_file, make_question_writer
    from chains.llm import make_llm

    settings = faq_on_server.model_copy(
        update={"deepseek_api_key": llm_server.api_key_secret(), "deepseek_base_url": llm_server.url}
    )
    llm_server.behaviour.reply = "1. Where does milvus keep its data?\n2. How is data persisted?"
    writer = make_question_writer(make_llm(settings), settings, progress=False)
    report = tune_collection(
        settings,
        config=TuneConfig(max_pairs=16, batch_size=8),
        force=True,
        question_writer=writer,
        progress=False,
    )
    chunks = report.data["chunks"]
    assert len(llm_server.requests) == chunks
    record = read_model_record(Path(report.model_dir))
    assert record["generated_questions"] == 2 * chunks
    cached = cache_file(settings).read_text().splitlines()
    assert len(cached) == chunks and json.loads(cached[0])["questions"] == [
        "Where does milvus keep its data?",
        "How is data persisted?",
    ]
    # Asked again, the writer answers from its cache: no request.
    llm_server.reset()
    service = open_service(settings, llm=None)
    try:
        stored = read_chunks(service.get_store())
    finally:
        service.close()
    questions = make_question_writer(make_llm(settings), settings, progress=False)(stored)
    assert len(questions) == chunks and not llm_server.requests
