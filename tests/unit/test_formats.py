"""PDF, HTML and DOCX through the loaders: structure kept, and bad input skipped with a reason.

Every file is made here (tests/documents.py); PDF and DOCX go through the real worker process.
"""

from __future__ import annotations

import hashlib
import io
import threading
import zipfile
import zlib
from collections.abc import Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from langchain_core.documents import Document

from loaders.formats import Limits
from loaders.markdown import Chunker, token_counter
from loaders.sources import DocumentSourceLoader, Skipped
from tests import documents as make
from tests.documents import CODE, Page, Text, heading, paragraph, table

MIB = 1024 * 1024


def load(*paths: Path | str, limits: Limits | None = None) -> tuple[dict[str, Document], dict[str, Skipped]]:
    loader = DocumentSourceLoader([str(p) for p in paths], limits=limits)
    docs = {d.metadata["source"]: d for d in loader.load()}
    return docs, {s.source or s.path: s for s in loader.skipped}


def chunks_of(document: Document) -> list[Document]:
    return Chunker(token_counter(None)).split_document(document)


def sections(document: Document) -> dict[str, Document]:
    """Chunks by heading path (the first chunk of each)."""
    found: dict[str, Document] = {}
    for chunk in chunks_of(document):
        found.setdefault(" > ".join(chunk.metadata["headers"]), chunk)
    return found


# --- HTML ---------------------------------------------------------------------------------

PAGE = """<!DOCTYPE html>
<html><head><title>Install | Example Docs</title>
<style>body { color: red }</style>
<script>var tracking = "SCRIPT-TEXT";</script></head>
<body>
<header class="site"><a href="/">SITE-HEADER</a></header>
<nav><a href="/docs">NAV-LINK Docs</a> | <a href="/blog">Blog</a></nav>
<aside class="sidebar"><ul><li>SIDEBAR-ITEM</li></ul></aside>
<main><article>
<header><h1>Installing Example</h1></header>
<p>Example runs on <a href="https://example.com/linux">Linux</a> and macOS.</p>
<h2>Requirements</h2>
<p>You need Python.</p>
<table><tr><th>Package</th><th>Version</th></tr><tr><td>python</td><td>3.11</td></tr></table>
<h3>Optional extras</h3>
<pre><code>pip install example[all]
# then check it
example --version</code></pre>
<h4>Four</h4><h5>Five</h5><h6>Six</h6><p>Deep text.</p>
<form><button>SUBMIT-BUTTON</button></form>
</article></main>
<footer>FOOTER-TEXT Copyright</footer>
<script>console.log("SCRIPT-TWO")</script>
</body></html>
"""


def test_html_keeps_the_article_headings_tables_and_code_without_the_site_around_it(tmp_path: Path) -> None:
    (tmp_path / "install.html").write_text(PAGE)
    docs, skipped = load(tmp_path / "install.html")
    assert skipped == {}
    document = docs["install.html"]
    assert document.metadata["format"] == "html"
    found = sections(document)
    assert set(found) == {
        "Installing Example",
        "Installing Example > Requirements",
        "Installing Example > Requirements > Optional extras",
        "Installing Example > Requirements > Optional extras > Four > Five > Six",
    }
    assert "Linux and macOS" in found["Installing Example"].page_content  # link text, no URL
    assert "| Package | Version |\n| --- | --- |\n| python | 3.11 |" in document.page_content
    code = found["Installing Example > Requirements > Optional extras"].page_content
    assert "```\npip install example[all]\n# then check it\nexample --version\n```" in code
    text = "".join(c.page_content for c in chunks_of(document))
    for furniture in (
        "SITE-HEADER",
        "NAV-LINK",
        "SIDEBAR-ITEM",
        "FOOTER-TEXT",
        "SCRIPT",
        "SUBMIT-BUTTON",
        "color",
    ):
        assert furniture not in text


def test_html_without_main_or_article_keeps_the_body_without_the_chrome(tmp_path: Path) -> None:
    (tmp_path / "plain.htm").write_text(
        "<html><body><nav>NAV</nav><h1>Title</h1><p>Body text.</p><footer>FOOT</footer></body></html>"
    )
    docs, _ = load(tmp_path / "plain.htm")
    (chunk,) = chunks_of(docs["plain.htm"])
    assert chunk.metadata["headers"] == ["Title"]
    assert "Body text." in chunk.page_content
    assert "NAV" not in chunk.page_content and "FOOT" not in chunk.page_content


class RecordingHandler(BaseHTTPRequestHandler):
    """Serves one page per path, with the Content-Type given, and records every request."""

    pages: dict[str, tuple[str, bytes]] = {}
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (the http.server name)
        self.requests.append(self.path)
        content_type, body = self.pages.get(self.path, ("text/plain", b""))
        self.send_response(200 if self.path in self.pages else 404)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture
def site() -> Iterator[tuple[str, type[RecordingHandler]]]:
    handler = type("Handler", (RecordingHandler,), {"pages": {}, "requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def test_html_base_and_file_links_are_never_followed(
    tmp_path: Path, site: tuple[str, type[RecordingHandler]]
) -> None:
    url, handler = site
    secret = tmp_path / "secret.md"
    secret.write_text("# Secret\n\nCANARY-FILE-TEXT\n")
    page = f"""<html><head><base href="{url}/private/"><link rel="import" href="{url}/imported.html">
    <base href="file://{tmp_path}/"></head><body><main>
    <h1>Links</h1>
    <p><a href="secret.md">relative to base</a> <a href="file://{secret}">a file link</a></p>
    <img src="file://{secret}" alt="an image"><iframe src="{url}/framed.html"></iframe>
    <object data="file://{secret}"></object><embed src="{url}/embedded.pdf">
    </main></body></html>"""
    handler.pages["/page.html"] = ("text/html; charset=utf-8", page.encode())
    (tmp_path / "page.html").write_text(page)

    docs, skipped = load(f"{url}/page.html", tmp_path / "page.html")

    assert skipped == {}
    assert handler.requests == ["/page.html"], "only the page itself is fetched"
    for document in docs.values():
        assert "CANARY-FILE-TEXT" not in document.page_content
        assert "relative to base" in document.page_content and "a file link" in document.page_content


def test_a_urls_content_type_picks_the_parser(site: tuple[str, type[RecordingHandler]]) -> None:
    url, handler = site
    pdf = make.make_pdf([Page([heading("Served PDF", 18), Text("PDF body text.")])])
    docx = make.make_docx([paragraph("Served DOCX", "Heading1"), paragraph("DOCX body text.")])
    handler.pages.update(
        {
            "/article": ("text/html", b"<h1>Served HTML</h1><p>HTML body text.</p>"),
            "/paper": ("application/pdf", pdf),
            "/download": ("application/octet-stream", pdf),  # says nothing: the name decides
            "/report.pdf": ("application/octet-stream", pdf),
            "/letter": (
                "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
                docx,
            ),
            "/raw/notes.md": ("text/plain; charset=utf-8", b"---\ntitle: Notes\n---\nFront matter read.\n"),
            "/logo": ("image/png", b"\x89PNG\r\n\x1a\n"),
        }
    )
    paths = ["/article", "/paper", "/report.pdf", "/letter", "/raw/notes.md", "/logo", "/download"]
    loader = DocumentSourceLoader([url + p for p in paths])
    docs = {d.metadata["root"].removeprefix(url): d for d in loader.load()}

    assert {p: d.metadata["format"] for p, d in docs.items()} == {
        "/article": "html",
        "/paper": "pdf",
        "/report.pdf": "pdf",
        "/letter": "docx",
        "/raw/notes.md": "markdown",
    }
    assert chunks_of(docs["/article"])[0].metadata["headers"] == ["Served HTML"]
    assert chunks_of(docs["/paper"])[0].metadata["headers"] == ["Served PDF"]
    assert chunks_of(docs["/letter"])[0].metadata["headers"] == ["Served DOCX"]
    assert chunks_of(docs["/raw/notes.md"])[0].metadata["headers"] == ["Notes"]
    reasons = {s.path.removeprefix(url): (s.reason, s.kind) for s in loader.skipped}
    assert reasons == {
        "/logo": ("unsupported content type image/png", "unsupported"),
        "/download": ("unsupported content type application/octet-stream", "unsupported"),
    }


# --- DOCX -----------------------------------------------------------------------------------


def test_docx_heading_styles_become_the_heading_path_and_tables_stay_tables(tmp_path: Path) -> None:
    body = [
        paragraph("Operations Guide", "Title"),
        paragraph("Intro before any heading."),
        paragraph("Backups", "Heading1"),
        paragraph("Back up nightly."),
        paragraph("Retention", "Heading2"),
        table([["Tier", "Days"], ["hot", "7"], ["cold", "90"]]),
        paragraph("Restores", "Heading1"),
        paragraph("Restore from the latest snapshot."),
    ]
    (tmp_path / "ops.docx").write_bytes(make.make_docx(body))
    docs, skipped = load(tmp_path / "ops.docx")
    assert skipped == {}
    found = sections(docs["ops.docx"])
    # The Title style is a top heading, as Heading 1 is.
    assert set(found) == {"Operations Guide", "Backups", "Backups > Retention", "Restores"}
    assert "Intro before any heading." in found["Operations Guide"].page_content
    assert "| Tier | Days |\n| --- | --- |\n| hot | 7 |\n| cold | 90 |" in (
        found["Backups > Retention"].page_content
    )
    assert found["Backups"].metadata["page"] is None


def test_corrupt_and_truncated_docx_are_skipped_and_the_rest_is_read(tmp_path: Path) -> None:
    good = make.make_docx([paragraph("Fine", "Heading1"), paragraph("Readable " * 400)])
    (tmp_path / "good.docx").write_bytes(good)
    (tmp_path / "truncated.docx").write_bytes(good[: len(good) // 2])
    (tmp_path / "garbage.docx").write_bytes(b"this is not a word document")
    (tmp_path / "hollow.docx").write_bytes(_zip({"readme.txt": b"no document"}))

    docs, skipped = load(tmp_path)

    assert list(docs) == ["good.docx"]
    assert skipped["truncated.docx"].reason == "corrupt or truncated DOCX (not a readable zip archive)"
    assert skipped["garbage.docx"].reason == "corrupt or truncated DOCX (not a readable zip archive)"
    assert skipped["hollow.docx"].reason == "corrupt DOCX (no word/document.xml inside)"


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_docx_zip_bomb_is_skipped_by_its_unpacked_size(tmp_path: Path) -> None:
    bomb = make.make_docx([paragraph("Small")], extra={"word/media/filler.bin": b"\0" * (8 * MIB)})
    assert len(bomb) < 64 * 1024  # 8 MB of zeros packs into a few kB
    (tmp_path / "bomb.docx").write_bytes(bomb)
    (tmp_path / "fine.docx").write_bytes(make.make_docx([paragraph("Fine", "Heading1"), paragraph("ok")]))

    docs, skipped = load(tmp_path, limits=Limits(max_unpacked_bytes=1 * MIB))

    assert list(docs) == ["fine.docx"]
    assert skipped["bomb.docx"].reason == "DOCX unpacks to 8 MB, over the limit of 1 MB (a zip bomb?)"


def test_docx_that_understates_its_unpacked_size_is_not_unpacked_past_it(tmp_path: Path) -> None:
    honest = make.make_docx([paragraph("Title", "Heading1"), paragraph("x" * 50_000)])
    (tmp_path / "liar.docx").write_bytes(make.understate_sizes(honest, "word/document.xml", 100))
    docs, skipped = load(tmp_path / "liar.docx", limits=Limits(max_unpacked_bytes=1 * MIB))
    assert docs == {}
    assert skipped["liar.docx"].reason.startswith("corrupt DOCX (BadZipFile")


def test_the_default_unpacked_size_limit_is_far_above_real_documents() -> None:
    assert Limits().max_unpacked_bytes == 200 * MIB
    assert Limits().max_pages == 2000 and Limits().seconds == 120


# --- PDF --------------------------------------------------------------------------------------


def guide_pdf() -> bytes:
    return make.make_pdf(
        [
            Page(
                [
                    heading("User Guide", 20),
                    Text("This guide explains the product."),
                    heading("Installing", 15),
                    Text("Install it with pip."),
                    Text("Which Python does it need?", "F2", 11),  # bold at body size: a question
                    Text("Python 3.11 or newer."),
                    Text("pip install example", *CODE),
                    Text("# a comment in the code", *CODE),
                ]
            ),
            Page([Text("Still about Python, on page two."), heading("Upgrading", 15), Text("Run pip -U.")]),
            Page([Text("Upgrades keep your data, on page three.")]),
        ]
    )


def test_pdf_headings_come_from_font_sizes_and_weight_and_chunks_carry_pages(tmp_path: Path) -> None:
    (tmp_path / "guide.pdf").write_bytes(guide_pdf())
    docs, skipped = load(tmp_path / "guide.pdf")
    assert skipped == {}
    document = docs["guide.pdf"]
    assert document.metadata["format"] == "pdf" and document.metadata["pages"] == 3
    pages = {
        " > ".join(c.metadata["headers"]): (c.metadata["page"], c.metadata["last_page"])
        for c in chunks_of(document)
    }
    assert pages == {
        "User Guide": (1, 1),
        "User Guide > Installing": (1, 1),
        "User Guide > Installing > Which Python does it need?": (1, 2),
        "User Guide > Upgrading": (2, 3),
    }
    code = sections(document)["User Guide > Installing > Which Python does it need?"].page_content
    assert "```\npip install example\n# a comment in the code\n```" in code, "code stays code, not a heading"


def test_pdf_outline_names_the_headings_when_the_pdf_has_one(tmp_path: Path) -> None:
    # Headings in body type: only the outline can tell them from the text.
    pdf = make.make_pdf(
        [
            Page([Text("Handbook"), Text("Opening words."), Text("Setup"), Text("How to set up.")]),
            Page([Text("Networking"), Text("Ports and hosts.")]),
        ],
        outline=[(1, "Handbook", 1), (2, "Setup", 1), (3, "Networking", 2)],
    )
    (tmp_path / "handbook.pdf").write_bytes(pdf)
    docs, _ = load(tmp_path / "handbook.pdf")
    found = {" > ".join(c.metadata["headers"]): c.metadata["page"] for c in chunks_of(docs["handbook.pdf"])}
    assert found == {"Handbook": 1, "Handbook > Setup": 1, "Handbook > Setup > Networking": 2}


def test_pdf_ruled_table_becomes_a_markdown_table(tmp_path: Path) -> None:
    table_ops = make.ruled_table([["Index", "Metric"], ["FLAT", "IP"], ["HNSW", "COSINE"]], top=500)
    page = Page([heading("Indexes", 16), Text("The index types:")], extra_ops=table_ops)
    (tmp_path / "indexes.pdf").write_bytes(make.make_pdf([page]))
    docs, _ = load(tmp_path / "indexes.pdf")
    (chunk,) = chunks_of(docs["indexes.pdf"])
    assert chunk.metadata["headers"] == ["Indexes"]
    assert "| Index | Metric |\n| --- | --- |\n| FLAT | IP |\n| HNSW | COSINE |" in chunk.page_content
    assert chunk.page_content.count("FLAT") == 1, "the cells are not repeated as text lines"


def test_encrypted_pdf_is_skipped_and_an_owner_only_one_is_read(tmp_path: Path) -> None:
    (tmp_path / "locked.pdf").write_bytes(make.encrypt_pdf(guide_pdf(), user_password="secret"))
    (tmp_path / "restricted.pdf").write_bytes(make.encrypt_pdf(guide_pdf(), user_password=""))
    docs, skipped = load(tmp_path)
    assert list(docs) == ["restricted.pdf"]  # opens without a password, like in any viewer
    assert skipped["locked.pdf"].reason == "encrypted PDF: it needs a password to open"


def test_scanned_pdf_without_a_text_layer_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "scan.pdf").write_bytes(make.make_pdf([Page(image=True), Page(image=True)]))
    docs, skipped = load(tmp_path / "scan.pdf")
    assert docs == {}
    assert skipped["scan.pdf"].reason == "no text layer; OCR is not supported"


def test_truncated_and_corrupt_pdfs_are_skipped_and_the_rest_is_read(tmp_path: Path) -> None:
    data = guide_pdf()
    (tmp_path / "half.pdf").write_bytes(data[: len(data) // 2])
    (tmp_path / "tail-cut.pdf").write_bytes(data[:-40])
    (tmp_path / "junk.pdf").write_bytes(b"%PDF-1.7\nnot really a pdf\n")
    (tmp_path / "good.pdf").write_bytes(data)
    docs, skipped = load(tmp_path)
    assert list(docs) == ["good.pdf"]
    assert set(skipped) == {"half.pdf", "tail-cut.pdf", "junk.pdf"}
    for name in ("half.pdf", "tail-cut.pdf", "junk.pdf"):
        assert skipped[name].reason.startswith("corrupt or truncated PDF ("), skipped[name].reason


def test_pdf_over_the_page_limit_is_skipped_without_reading_its_pages(tmp_path: Path) -> None:
    (tmp_path / "tome.pdf").write_bytes(make.make_pdf([Page([Text(f"page {n}")]) for n in range(2500)]))
    docs, skipped = load(tmp_path / "tome.pdf")
    assert docs == {}
    assert skipped["tome.pdf"].reason == "the PDF has 2500 pages, over the limit of 2000 (--max-pages)"


def test_pdf_over_the_time_limit_is_stopped_and_the_next_file_is_read(tmp_path: Path) -> None:
    # 30,000 text objects on one page: the reader needs several seconds for it.
    (tmp_path / "a-slow.pdf").write_bytes(make.make_pdf([make.slow_page(30_000)]))
    (tmp_path / "b-good.pdf").write_bytes(guide_pdf())
    docs, skipped = load(tmp_path, limits=Limits(seconds=1.0))
    assert list(docs) == ["b-good.pdf"]
    assert skipped["a-slow.pdf"].reason.startswith("took longer than 1 s to read, the limit per file")


def _bomb_pdf(unpacked_mb: int) -> bytes:
    """One page whose content stream inflates to `unpacked_mb` MB (about 1 MB on disk)."""
    packer = zlib.compressobj(9)
    block = b"0 0 m\n" * (MIB // 6)
    data = b"".join(packer.compress(block) for _ in range(unpacked_mb)) + packer.flush()
    return make.serialize_pdf(
        [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R >>",
            b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(data) + data + b"\nendstream",
        ]
    )


def test_pdf_bomb_over_the_memory_limit_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "bomb.pdf").write_bytes(_bomb_pdf(600))
    (tmp_path / "good.pdf").write_bytes(guide_pdf())
    docs, skipped = load(tmp_path, limits=Limits(memory_bytes=256 * MIB))
    assert list(docs) == ["good.pdf"]
    assert skipped["bomb.pdf"].reason == "ran out of memory while reading (the memory limit per file)"


# --- what is passed over --------------------------------------------------------------------


def test_a_folder_of_unsupported_files_lists_each_with_its_type(tmp_path: Path) -> None:
    for name in ("slides.pptx", "old.doc", "photo.JPG", "Makefile"):
        (tmp_path / name).write_bytes(b"data")
    docs, skipped = load(tmp_path)
    assert docs == {}
    assert {name: (s.reason, s.kind) for name, s in skipped.items()} == {
        "slides.pptx": ("unsupported file type .pptx (save it as PDF)", "unsupported"),
        "old.doc": ("unsupported file type .doc (legacy Word format; save it as .docx)", "unsupported"),
        "photo.JPG": ("unsupported file type .jpg", "unsupported"),
        "Makefile": ("unsupported file type (no extension)", "unsupported"),
    }


def test_all_formats_in_a_zip_archive(tmp_path: Path) -> None:
    archive = tmp_path / "mixed.zip"
    archive.write_bytes(
        _zip(
            {
                "kb/guide.pdf": guide_pdf(),
                "kb/page.html": b"<h1>Web</h1><p>From HTML.</p>",
                "kb/ops.docx": make.make_docx([paragraph("Ops", "Heading1"), paragraph("From DOCX.")]),
                "kb/notes.md": b"# Notes\n\nFrom markdown.\n",
                "kb/diagram.png": b"\x89PNG",
            }
        )
    )
    docs, skipped = load(archive)
    assert {s: d.metadata["format"] for s, d in docs.items()} == {
        "kb/guide.pdf": "pdf",
        "kb/page.html": "html",
        "kb/ops.docx": "docx",
        "kb/notes.md": "markdown",
    }
    assert skipped["kb/diagram.png"].kind == "unsupported"


def test_source_hash_is_of_the_bytes_read(tmp_path: Path) -> None:
    data = guide_pdf()
    (tmp_path / "guide.pdf").write_bytes(data)
    docs, _ = load(tmp_path / "guide.pdf")
    assert docs["guide.pdf"].metadata["source_hash"] == hashlib.sha256(data).hexdigest()
