"""Ingesting from http(s) URLs: a loopback HTTP server serves a page and a zip archive."""

from __future__ import annotations

import io
import threading
import zipfile
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from loaders.sources import DocumentSourceLoader


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture
def site(tmp_path: Path) -> Iterator[str]:
    (tmp_path / "guide.md").write_text("# Guide\n\nHello from a URL.\n")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("docs/en/faq/a.md", "# A\n\nFirst.\n")
        archive.writestr("docs/en/faq/b.md", "# B\n\nSecond.\n")
    (tmp_path / "docs.zip").write_bytes(buffer.getvalue())
    (tmp_path / "blob.md").write_bytes(b"\x00\x01binary")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_urls_of_pages_and_archives_are_loaded(site: str) -> None:
    loader = DocumentSourceLoader([f"{site}/guide.md", f"{site}/docs.zip"])
    documents = list(loader.lazy_load())
    assert [(d.metadata["source"], d.metadata["root"]) for d in documents] == [
        ("guide.md", f"{site}/guide.md"),
        ("docs/en/faq/a.md", f"{site}/docs.zip"),
        ("docs/en/faq/b.md", f"{site}/docs.zip"),
    ]
    assert "Hello from a URL." in documents[0].page_content
    assert loader.skipped == []


def test_bad_urls_are_skipped_with_a_reason(site: str) -> None:
    loader = DocumentSourceLoader([f"{site}/missing.md", f"{site}/blob.md", "http://127.0.0.1:9/x.md"])
    assert list(loader.lazy_load()) == []
    reasons = {s.path: s.reason for s in loader.skipped}
    assert "404" in reasons[f"{site}/missing.md"]
    assert reasons[f"{site}/blob.md"] == "binary file"
    assert reasons["http://127.0.0.1:9/x.md"].startswith("download failed")
