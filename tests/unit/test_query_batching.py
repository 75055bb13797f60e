"""The query micro-batcher: concurrent queries share one encode call on one worker thread."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from errors import EmbeddingError
from store.embeddings import PymilvusEmbeddings, QueryBatcher

TIMEOUT = 10.0  # seconds; only reached when something is broken


def vector_of(text: str) -> list[float]:
    """A vector that says which text it belongs to."""
    return [float(len(text)), float(sum(map(ord, text)))]


class FakeEncoder:
    """Records each batch; with `hold`, the first batch blocks until `release` is set, so
    the calls that arrive meanwhile pile up in the queue."""

    def __init__(self, hold: bool = False, error: Exception | None = None):
        self.batches: list[list[str]] = []
        self.threads: set[str] = set()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.hold = hold
        self.error = error

    def __call__(self, texts: list[str]) -> list[list[float]]:
        self.batches.append(list(texts))
        self.threads.add(threading.current_thread().name)
        self.entered.set()
        if self.hold and len(self.batches) == 1:
            assert self.release.wait(TIMEOUT), "the test never released the encoder"
        if self.error is not None:
            raise self.error
        return [vector_of(t) for t in texts]

    # The pymilvus-model interface, for PymilvusEmbeddings(function=...).
    def encode_queries(self, texts: list[str]) -> list[list[float]]:
        return self(texts)

    def encode_documents(self, texts: list[str]) -> list[list[float]]:
        return self(texts)


class SubmitCounter:
    """Counts the requests a batcher has queued, so a test can wait for all of them."""

    def __init__(self, batcher: QueryBatcher):
        self.count = 0
        self._changed = threading.Condition()
        submit = batcher.submit

        def counting_submit(text: str) -> Any:
            future = submit(text)  # queued when this returns
            with self._changed:
                self.count += 1
                self._changed.notify_all()
            return future

        batcher.submit = counting_submit  # type: ignore[method-assign]

    def wait_for(self, count: int) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: self.count >= count, TIMEOUT), (
                f"only {self.count} of {count} requests were queued"
            )


def test_a_single_call_goes_through_at_once() -> None:
    encoder = FakeEncoder()
    batcher = QueryBatcher(encoder)
    try:
        assert not batcher.running, "no thread before the first call"
        assert batcher.embed("what is milvus?") == vector_of("what is milvus?")
        assert encoder.batches == [["what is milvus?"]]
        assert encoder.threads == {"query-embedder"}
    finally:
        batcher.close()


def test_concurrent_calls_are_coalesced_and_each_caller_gets_its_own_vector() -> None:
    encoder = FakeEncoder(hold=True)
    batcher = QueryBatcher(encoder, max_batch=64)
    texts = [f"question number {i}" + "?" * i for i in range(12)]
    try:
        first = batcher.submit("the first question")
        assert encoder.entered.wait(TIMEOUT)
        counter = SubmitCounter(batcher)
        with ThreadPoolExecutor(len(texts)) as pool:
            results = pool.map(batcher.embed, texts)
            counter.wait_for(len(texts))
            encoder.release.set()
            vectors = list(results)
        assert first.result(TIMEOUT) == vector_of("the first question")
        assert vectors == [vector_of(t) for t in texts]
        assert encoder.batches[0] == ["the first question"]
        # Everything that queued while the first batch ran went in as one batch.
        assert len(encoder.batches) == 2 and sorted(encoder.batches[1]) == sorted(texts)
    finally:
        encoder.release.set()
        batcher.close()


def test_batches_are_capped_at_max_batch() -> None:
    encoder = FakeEncoder(hold=True)
    batcher = QueryBatcher(encoder, max_batch=4)
    try:
        first = batcher.submit("first")
        assert encoder.entered.wait(TIMEOUT)
        futures = [batcher.submit(f"q{i}") for i in range(10)]
        encoder.release.set()
        assert [f.result(TIMEOUT) for f in futures] == [vector_of(f"q{i}") for i in range(10)]
        assert first.result(TIMEOUT) == vector_of("first")
        assert [len(b) for b in encoder.batches] == [1, 4, 4, 2]
    finally:
        encoder.release.set()
        batcher.close()


def test_an_exception_reaches_every_waiting_caller() -> None:
    error = EmbeddingError("the model broke")
    encoder = FakeEncoder(hold=True, error=error)
    batcher = QueryBatcher(encoder)
    try:
        first = batcher.submit("first")
        assert encoder.entered.wait(TIMEOUT)
        waiting = [batcher.submit(f"q{i}") for i in range(5)]
        encoder.release.set()
        for future in [first, *waiting]:
            with pytest.raises(EmbeddingError) as raised:
                future.result(TIMEOUT)
            assert raised.value is error
        # The worker survives a failing batch.
        encoder.error = None
        assert batcher.embed("again") == vector_of("again")
    finally:
        encoder.release.set()
        batcher.close()


def test_a_wrong_number_of_vectors_is_an_embedding_error() -> None:
    batcher = QueryBatcher(lambda texts: [[1.0]] * (len(texts) + 1))
    try:
        with pytest.raises(EmbeddingError, match="2 vectors for 1 texts"):
            batcher.embed("x")
    finally:
        batcher.close()


def test_close_stops_the_thread_and_a_later_call_starts_a_new_one() -> None:
    encoder = FakeEncoder()
    batcher = QueryBatcher(encoder)
    batcher.embed("one")
    thread = batcher._thread
    assert thread is not None and thread.daemon and thread.is_alive()
    batcher.close()
    assert not thread.is_alive() and not batcher.running
    batcher.close()  # twice is harmless
    assert batcher.embed("two") == vector_of("two")
    assert batcher.running and batcher._thread is not thread
    batcher.close()
    assert not batcher.running


def test_close_answers_what_was_queued_before_it() -> None:
    encoder = FakeEncoder(hold=True)
    batcher = QueryBatcher(encoder)
    first = batcher.submit("first")
    assert encoder.entered.wait(TIMEOUT)
    second = batcher.submit("second")
    closer = threading.Thread(target=batcher.close)
    closer.start()
    encoder.release.set()
    closer.join(TIMEOUT)
    assert not closer.is_alive()
    assert first.result(TIMEOUT) == vector_of("first") and second.result(TIMEOUT) == vector_of("second")


def test_a_cancelled_request_is_skipped() -> None:
    encoder = FakeEncoder(hold=True)
    batcher = QueryBatcher(encoder)
    try:
        batcher.submit("first")
        assert encoder.entered.wait(TIMEOUT)
        cancelled = batcher.submit("gone")
        kept = batcher.submit("kept")
        assert cancelled.cancel()
        encoder.release.set()
        assert kept.result(TIMEOUT) == vector_of("kept")
        assert ["gone"] not in encoder.batches and "gone" not in encoder.batches[1]
    finally:
        encoder.release.set()
        batcher.close()


def test_max_wait_collects_calls_that_arrive_shortly_after() -> None:
    encoder = FakeEncoder()
    # Generous, so that the second call always lands inside the window.
    batcher = QueryBatcher(encoder, max_wait=TIMEOUT, max_batch=2)
    try:
        futures = [batcher.submit("a"), batcher.submit("b")]
        assert [f.result(TIMEOUT) for f in futures] == [vector_of("a"), vector_of("b")]
        assert encoder.batches == [["a", "b"]]
    finally:
        batcher.close()


def test_invalid_settings_are_rejected() -> None:
    with pytest.raises(ValueError):
        QueryBatcher(FakeEncoder(), max_batch=0)
    with pytest.raises(ValueError):
        QueryBatcher(FakeEncoder(), max_wait=-1)


def test_embeddings_batch_concurrent_queries_on_one_worker() -> None:
    encoder = FakeEncoder(hold=True)
    embeddings = PymilvusEmbeddings("minilm", function=encoder)
    try:
        first = embeddings.queries.submit("first")
        assert encoder.entered.wait(TIMEOUT)
        texts = [f"q{i}" for i in range(8)]
        counter = SubmitCounter(embeddings.queries)
        with ThreadPoolExecutor(len(texts)) as pool:
            results = pool.map(embeddings.embed_query, texts)
            counter.wait_for(len(texts))
            encoder.release.set()
            assert list(results) == [vector_of(t) for t in texts]
        assert first.result(TIMEOUT) == vector_of("first")
        assert max(len(b) for b in encoder.batches) > 1
        assert encoder.threads == {"embed-queries"}
    finally:
        encoder.release.set()
        embeddings.close()
    assert not embeddings.queries.running


async def test_aembed_query_awaits_without_blocking_the_loop() -> None:
    encoder = FakeEncoder(hold=True)
    embeddings = PymilvusEmbeddings("minilm", function=encoder)
    try:
        task = asyncio.ensure_future(embeddings.aembed_query("async question"))
        # The loop keeps running while the encoder is held: this await returns.
        await asyncio.get_running_loop().run_in_executor(None, encoder.entered.wait, TIMEOUT)
        assert not task.done()
        encoder.release.set()
        assert await asyncio.wait_for(task, TIMEOUT) == vector_of("async question")
    finally:
        encoder.release.set()
        embeddings.close()


def test_documents_run_on_the_caller_in_batches() -> None:
    encoder = FakeEncoder()
    embeddings = PymilvusEmbeddings("minilm", batch_size=3, function=encoder)
    texts = [f"passage {i}" for i in range(7)]
    assert embeddings.embed_documents(texts) == [vector_of(t) for t in texts]
    assert [len(b) for b in encoder.batches] == [3, 3, 1]
    assert encoder.threads == {threading.current_thread().name}
    assert not embeddings.queries.running, "passages never start the query worker"


def test_no_thread_is_started_by_construction() -> None:
    before = threading.active_count()
    embeddings: Any = PymilvusEmbeddings("minilm", function=FakeEncoder())
    assert threading.active_count() == before and not embeddings.queries.running
