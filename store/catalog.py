"""What a collection holds, document by document: list, read and delete the chunks of a source.

A document is a (root, source) pair, as ingest stores it: `source` is the name a person
knows (a path under the ingested folder, an archive member, an uploaded file's name), and
`root` the folder, archive, URL or `upload:` it came from. Every function takes the store
to work on, so that the same code serves any collection.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from store.milvus import INGESTED_AT_FIELD, PRIMARY_FIELD, TEXT_FIELD, RagStore, escape

PAGE = 4096


@dataclass
class DocumentEntry:
    """One stored document: how many chunks, and when the newest of them was written."""

    source: str
    root: str
    chunks: int
    # Unix seconds; None for chunks written before the collection had the field.
    ingested_at: int | None


def has_ingested_at(store: RagStore) -> bool:
    """Whether the collection records when each chunk was written (made since the field exists)."""
    fields = store.client.describe_collection(store.collection).get("fields", [])
    return any(f["name"] == INGESTED_AT_FIELD for f in fields)


def _rows(store: RagStore, filter_expr: str, fields: list[str]) -> Iterator[dict[str, Any]]:
    iterator = store.client.query_iterator(
        store.collection, batch_size=PAGE, filter=filter_expr, output_fields=fields
    )
    try:
        while rows := iterator.next():
            yield from rows
    finally:
        iterator.close()


def source_filter(source: str, root: str | None = None) -> str:
    """The Milvus filter for the chunks of one source (under one root, if given)."""
    expr = f"source == {escape(source)}"
    return expr if root is None else f"{expr} and root == {escape(root)}"


def list_documents(store: RagStore) -> list[DocumentEntry]:
    """Every document of the collection, by source then root."""
    if not store.exists():
        return []
    dated = has_ingested_at(store)
    fields = ["source", "root"] + ([INGESTED_AT_FIELD] if dated else [])
    found: dict[tuple[str, str], DocumentEntry] = {}
    for row in _rows(store, "", fields):
        key = (row["source"], row["root"])
        entry = found.get(key)
        if entry is None:
            entry = found[key] = DocumentEntry(row["source"], row["root"], 0, None)
        entry.chunks += 1
        written = row.get(INGESTED_AT_FIELD)
        if written is not None and (entry.ingested_at is None or written > entry.ingested_at):
            entry.ingested_at = int(written)
    return [found[key] for key in sorted(found)]


def document_chunks(store: RagStore, source: str, root: str | None = None) -> list[dict[str, Any]]:
    """The chunks of one source (under one root, if given), in document order."""
    if not store.exists():
        return []
    dated = has_ingested_at(store)
    fields = [PRIMARY_FIELD, TEXT_FIELD, "source", "root", "headers", "chunk_index", "page", "last_page"]
    rows = list(_rows(store, source_filter(source, root), fields + ([INGESTED_AT_FIELD] if dated else [])))
    chunks = [
        {
            "id": row[PRIMARY_FIELD],
            "root": row["root"],
            "chunk_index": int(row["chunk_index"]),
            "headers": list(row.get("headers") or []),
            "page": row.get("page"),
            "last_page": row.get("last_page"),
            "text": row[TEXT_FIELD],
            "ingested_at": row.get(INGESTED_AT_FIELD),
        }
        for row in rows
    ]
    return sorted(chunks, key=lambda c: (c["root"], c["chunk_index"]))


def delete_document(store: RagStore, source: str, root: str | None = None) -> int:
    """Delete the chunks of one source (under one root, if given); how many there were."""
    if not store.exists():
        return 0
    ids = [row[PRIMARY_FIELD] for row in _rows(store, source_filter(source, root), [PRIMARY_FIELD])]
    # By the ids just read, in the batches ingest deletes in: the count returned is the
    # number of chunks removed, whatever a server reports for a delete by expression.
    for start in range(0, len(ids), 1000):
        store.client.delete(store.collection, ids=ids[start : start + 1000])
    if ids:
        store.flush()
    return len(ids)
