"""Ingest: files → chunks → ids from content → embed only what is new → Milvus; a summary.

Chunk ids are hashes of (root, source, the file's content, position), made by the chunker
(loaders.markdown.chunk_id), so Milvus alone can tell what is already stored: no record
manager to keep in step with the collection. New chunks are written before stale ones are
deleted, so a crash at any point leaves either the old or the new version of a file, never
neither, and the next run finishes the job.
"""

from __future__ import annotations

import resource
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from queue import Empty, Queue
from typing import Any, TypeVar

from langchain_core.documents import Document
from tqdm import tqdm

from loaders.archive_safety import DEFAULT_MAX_UNZIPPED_BYTES
from loaders.formats import Limits
from loaders.markdown import Chunker, heading_text
from loaders.sources import DEFAULT_MAX_BYTES, UNSUPPORTED, DocumentSourceLoader, Skipped
from store.milvus import INGESTED_AT_FIELD, PRIMARY_FIELD, RagStore, dense_vector, escape

T = TypeVar("T")


@dataclass
class IngestReport:
    """What an ingest did. Chunk counts, except `files`."""

    files: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    total_chunks: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    model_loaded: bool = False
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        """True when a file could not be read, or nothing at all could be.

        Files passed over for their type (a picture in a docs folder) are listed, and fail
        the ingest only when they are all there was.
        """
        return self.files == 0 or any(s.kind != UNSUPPORTED for s in self.skipped)

    def why_nothing(self) -> str | None:
        """Why no file was read, when none was: one line for the user."""
        if self.files:
            return None
        unsupported = [s for s in self.skipped if s.kind == UNSUPPORTED]
        failed = len(self.skipped) - len(unsupported)
        parts = []
        if failed:
            parts.append(f"{failed} could not be read")
        if unsupported:
            types = sorted(
                {
                    s.reason.removeprefix("unsupported file type ")
                    .removeprefix("unsupported content type ")
                    .split(" (")[0]
                    .strip("()")
                    for s in unsupported
                }
            )
            parts.append(f"{len(unsupported)} of unsupported types ({', '.join(types)})")
        found = f"; of the files found, {' and '.join(parts)}" if parts else ": no files were found"
        return (
            "nothing was ingested" + found + ". Supported: .md, .markdown, .mdx, .txt, .text, .rst, "
            ".html, .htm, .xhtml, .pdf, .docx, in folders, zip archives or at URLs"
        )

    def as_dict(self) -> dict[str, Any]:
        """The JSON summary."""
        data = asdict(self)
        data["seconds"] = round(self.seconds, 2)
        data["peak_rss_mb"] = round(self.peak_rss_mb, 1)
        data["skipped"] = [{"path": s.path, "reason": s.reason, "kind": s.kind} for s in self.skipped]
        return data

    def summary(self) -> str:
        """One line for the terminal."""
        return (
            f"{self.files} files: {self.added} chunks added, {self.updated} updated, "
            f"{self.unchanged} unchanged, {self.deleted} deleted; {self.total_chunks} chunks "
            f"stored; {self.seconds:.1f} s, peak memory {self.peak_rss_mb:.0f} MiB"
            + (f"; {len(self.skipped)} skipped" if self.skipped else "")
        )


def write_chunks(store: RagStore, items: list[tuple[str, Document]]) -> None:
    """Embed chunks with the store's model and write them under the given ids."""
    if not items:
        return
    texts = [d.page_content for _, d in items]
    embed = store.embeddings.embed_documents
    vectors = embed(texts)
    # Chunks of one section share their heading: embed each distinct heading once.
    headings = [heading_text(d) for _, d in items]
    distinct = sorted(set(headings))
    by_heading = dict(zip(distinct, embed(distinct), strict=True))
    written_at = int(time.time())
    store.vectorstore.add_embeddings(
        texts,
        [dense_vector(v, by_heading[h]) for v, h in zip(vectors, headings, strict=True)],
        # A re-embedded chunk (rag tune) keeps when it was ingested; a new one gets now.
        [{INGESTED_AT_FIELD: written_at, **d.metadata} for _, d in items],
        ids=[i for i, _ in items],
    )


class _Writer:
    """Buffers new chunks, embeds them in batches and writes them, then runs deletes."""

    def __init__(self, store: RagStore, batch_size: int, bar: Any, seal_every: int | None = None):
        self.store = store
        self.batch_size = batch_size
        self.bar = bar
        self.pending: list[tuple[str, Document]] = []
        self.pending_deletes: list[str] = []
        self.seal_every = seal_every
        self.unsealed = 0

    def add(self, items: Iterable[tuple[str, Document]], deletes: Iterable[str]) -> None:
        self.pending.extend(items)
        self.pending_deletes.extend(deletes)
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            write_chunks(self.store, self.pending)
            self.bar.set_postfix_str(f"{len(self.pending)} chunks embedded", refresh=False)
            self.unsealed += len(self.pending)
            self.pending = []
        # Deletes only after the replacing chunks are stored: see the module docstring.
        self.delete(self.pending_deletes)
        self.pending_deletes = []
        if self.seal_every is not None and self.unsealed >= self.seal_every:
            self.store.flush()
            self.unsealed = 0

    def delete(self, ids: list[str]) -> None:
        for start in range(0, len(ids), 1000):
            self.store.client.delete(self.store.collection, ids=ids[start : start + 1000])


_DONE = object()


def prefetch(items: Iterable[T], depth: int = 32) -> Iterator[T]:
    """Iterate `items` in a background thread, `depth` ahead of the consumer.

    Reading and splitting files then overlaps with embedding, which releases the GIL.
    """
    queue: Queue[Any] = Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                queue.put(item)
        except BaseException as exc:  # handed to the consumer, raised there
            queue.put(_Failure(exc))
        queue.put(_DONE)

    thread = threading.Thread(target=produce, name="ingest-reader", daemon=True)
    thread.start()
    try:
        while (item := queue.get()) is not _DONE:
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                queue.get_nowait()
            except Empty:
                thread.join(timeout=0.1)


@dataclass
class _Failure:
    exc: BaseException


def stored_ids(store: RagStore, root: str) -> dict[str, set[str]]:
    """Ids of the chunks stored under one root, by source."""
    by_source: dict[str, set[str]] = defaultdict(set)
    if not store.exists():
        return by_source
    iterator = store.client.query_iterator(
        store.collection,
        batch_size=4096,
        filter=f"root == {escape(root)}",
        output_fields=[PRIMARY_FIELD, "source"],
    )
    try:
        while rows := iterator.next():
            for row in rows:
                by_source[row["source"]].add(row[PRIMARY_FIELD])
    finally:
        iterator.close()
    return by_source


def ingest(
    paths: list[str],
    store: RagStore,
    chunker: Chunker,
    *,
    prune: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    batch_size: int = 64,
    progress: bool = True,
    limits: Limits | None = None,
    root: str | None = None,
    on_file: Callable[[int, int, IngestReport], None] | None = None,
    allow_private_urls: bool = True,
    max_unzipped_bytes: int = DEFAULT_MAX_UNZIPPED_BYTES,
    seal_every: int | None = None,
) -> IngestReport:
    """Bring the store in line with the files under `paths`; returns what changed.

    `root` records every document under that root instead of the folder, archive or URL it
    was read from: uploads, read from a different temporary folder each time, keep the same
    ids that way. `on_file(files done, files in all, report so far)` is called after each
    file; it may raise to stop the ingest, which leaves every file in its old or its new
    version (see the module docstring). `allow_private_urls=False` refuses URLs on the
    server's own network (loaders/url_safety.py). `seal_every` N chunks written, the store
    seals them (RagStore.flush), for searches that run during the ingest.

    `limits` (size, pages, unpacked size, seconds per file) default to `max_bytes` and the
    loaders' defaults.
    """
    started = time.perf_counter()
    report = IngestReport()
    # The same path twice would insert its new chunks twice (ids are checked once per root).
    loader = DocumentSourceLoader(
        list(dict.fromkeys(paths)),
        limits=limits or Limits(max_bytes=max_bytes),
        allow_private_urls=allow_private_urls,
        max_unzipped_bytes=max_unzipped_bytes,
    )
    stored: dict[str, dict[str, set[str]]] = {}
    seen: dict[str, set[str]] = defaultdict(set)
    total = loader.count_candidates()
    bar = tqdm(
        total=total,
        unit="file",
        desc="ingest",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    writer = _Writer(store, batch_size, bar, seal_every)
    documents = loader.lazy_load()
    if root is not None:
        documents = (Document(d.page_content, metadata={**d.metadata, "root": root}) for d in documents)
    split = ((d, chunker.split_document(d)) for d in documents)
    with bar:
        for document, chunks in prefetch(split):
            bar.update(1)
            root, source = document.metadata["root"], document.metadata["source"]
            if root not in stored:
                stored[root] = stored_ids(store, root)
            seen[root].add(source)
            report.files += 1
            ids = [str(chunk.id) for chunk in chunks]
            old = stored[root].get(source, set())
            fresh = [(i, c) for i, c in zip(ids, chunks, strict=True) if i not in old]
            stale = sorted(old - set(ids))
            report.unchanged += len(ids) - len(fresh)
            if old:
                report.updated += len(fresh)
            else:
                report.added += len(fresh)
            report.deleted += len(stale)
            writer.add(fresh, stale)
            if on_file is not None:
                # Skipped files count as done (the reader, ahead of this loop, may have
                # skipped some that come later: the count is never more than the total).
                done = report.files + len(loader.skipped)
                on_file(done, max(total, done), report)
        writer.flush()
        if prune:
            for root, by_source in stored.items():
                # A file that failed to read still exists: keep its chunks.
                kept = seen[root] | {s.source for s in loader.skipped if s.root == root}
                gone = [i for s, ids in by_source.items() if s not in kept for i in ids]
                writer.delete(gone)
                report.deleted += len(gone)
    report.skipped = loader.skipped
    if on_file is not None:
        done = report.files + len(loader.skipped)
        on_file(done, max(total, done), report)
    if report.added or report.updated or report.deleted:
        store.flush()
    report.total_chunks = store.count()
    report.seconds = time.perf_counter() - started
    report.model_loaded = store.embeddings.loaded
    report.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return report
