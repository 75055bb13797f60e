"""One LangChain blob parser per document format; the mime type picks the parser.

Every parser yields markdown: the header splitter (loaders/markdown.py) then turns headings
into each chunk's heading path, whatever the format was.

- Markdown, text, reStructuredText: langchain-community's `TextParser`.
- HTML: the article (`<main>`/`<article>`) without navigation, sidebars, footers, scripts and
  forms, converted by langchain-community's `MarkdownifyTransformer` (h1-h6 become `#`
  headings, tables markdown tables, `<pre>` fenced code).
- DOCX: mammoth (heading styles to h1-h6, tables to tables), then the HTML path.
- PDF: `loaders.pdf.PdfParser` (pdfplumber), headings from the outline or from font sizes.

PDF and DOCX are read in a child process with a time and memory limit (loaders.isolation).
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from langchain_core.document_loaders import BaseBlobParser
from langchain_core.documents import Document
from langchain_core.documents.base import Blob

from errors import SourceError

MIB = 1024 * 1024
MARKDOWN = "text/markdown"
PLAIN_TEXT = "text/plain"
RST = "text/x-rst"
HTML = "text/html"
XHTML = "application/xhtml+xml"
PDF = "application/pdf"
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
ZIP = "application/zip"

MIME_TYPES = {
    ".md": MARKDOWN,
    ".markdown": MARKDOWN,
    ".mdx": MARKDOWN,
    ".txt": PLAIN_TEXT,
    ".text": PLAIN_TEXT,
    ".rst": RST,
    ".html": HTML,
    ".htm": HTML,
    ".xhtml": XHTML,
    ".pdf": PDF,
    ".docx": DOCX,
}
TEXT_TYPES = {MARKDOWN, PLAIN_TEXT, RST}
# What `format` metadata each mime type gets (the chunker reads it).
FORMATS = {
    MARKDOWN: "markdown",
    PLAIN_TEXT: "text",
    RST: "text",
    HTML: "html",
    XHTML: "html",
    PDF: "pdf",
    DOCX: "docx",
}
# Said of files that are passed over, so that users know what to do with them.
UNSUPPORTED_HINTS = {
    ".doc": "legacy Word format; save it as .docx",
    ".ppt": "save it as PDF",
    ".pptx": "save it as PDF",
    ".odt": "save it as .docx or PDF",
    ".rtf": "save it as .docx or PDF",
}


@dataclass(frozen=True)
class Limits:
    """What one file may cost. A file over a limit is skipped with the reason."""

    max_bytes: int = 20 * MIB
    max_pages: int = 2000
    # DOCX files are zip archives: their members' total unpacked size (zip bombs).
    max_unpacked_bytes: int = 200 * MIB
    # Per PDF or DOCX file, in the child process that reads it.
    seconds: float = 120.0
    memory_bytes: int = 2048 * MIB


def mime_type_of(name: str) -> str | None:
    """The mime type this project reads a file name as, or None."""
    return MIME_TYPES.get(PurePosixPath(name).suffix.lower())


def unsupported_reason(name: str) -> str:
    """Why a file of this name is passed over: its type, and a hint where one helps."""
    suffix = PurePosixPath(name).suffix.lower()
    if not suffix:
        return "unsupported file type (no extension)"
    hint = UNSUPPORTED_HINTS.get(suffix)
    return f"unsupported file type {suffix}" + (f" ({hint})" if hint else "")


# --- HTML -----------------------------------------------------------------------------

# Page furniture, not the article. Scripts and styles hold no prose; forms and buttons
# are controls. Nothing here is followed: links, `<base>`, frames and imports stay text.
BOILERPLATE_TAGS = [
    "nav",
    "aside",
    "footer",
    "script",
    "style",
    "noscript",
    "template",
    "form",
    "button",
    "iframe",
    "frame",
    "frameset",
    "object",
    "embed",
    "svg",
    "canvas",
    "dialog",
    "link",
    "meta",
    "base",
]
BOILERPLATE_ROLES = ["navigation", "banner", "contentinfo", "complementary", "search", "dialog"]


def _main_content(soup: Any) -> Any:
    """The page's article: `<main>`, `<article>`, `role=main`, or the whole body.

    LangChain's BeautifulSoupTransformer removes tags by name only; a page's `<header>` is
    furniture while an article's `<header>` holds its title, so the article is found first.
    """
    for found in (soup.find("main"), soup.find(attrs={"role": "main"}), soup.find("article")):
        if found is not None:
            return found
    content = soup.body or soup
    for header in content.find_all("header"):
        if header.find_parent("article") is None:
            header.decompose()
    return content


def html_to_markdown(html: str | bytes, encoding: str | None = None) -> tuple[str, str]:
    """(markdown of the page's article, the page title)."""
    from bs4 import BeautifulSoup
    from langchain_community.document_transformers import MarkdownifyTransformer

    soup = BeautifulSoup(html, "html.parser", from_encoding=encoding if isinstance(html, bytes) else None)
    title = " ".join(soup.title.get_text(" ").split()) if soup.title else ""
    content = _main_content(soup)
    for tag in content.find_all(BOILERPLATE_TAGS):
        tag.decompose()
    for tag in content.find_all(attrs={"role": BOILERPLATE_ROLES}):
        tag.decompose()
    transformer = MarkdownifyTransformer(
        heading_style="ATX",
        # The text is embedded and shown, never rendered: escapes would only add noise
        # (`member\_id`) and split words for BM25.
        escape_underscores=False,
        escape_asterisks=False,
        # A table without <th> still gets a header row, so it stays a markdown table.
        table_infer_header=True,
        bullets="-",
    )
    (converted,) = transformer.transform_documents([Document(page_content=str(content))])
    return converted.page_content, title


class HtmlParser(BaseBlobParser):
    """An HTML page as markdown: the article with its headings, without the site around it."""

    def lazy_parse(self, blob: Blob) -> Iterator[Document]:
        """One Document per page."""
        markdown, title = html_to_markdown(blob.as_bytes(), blob.encoding if blob.encoding else None)
        if not markdown.strip():
            raise SourceError("no text in the page's content")
        yield Document(page_content=markdown, metadata={"source": blob.source, "title": title})


# --- DOCX -----------------------------------------------------------------------------

# Besides mammoth's built-in map (Heading 1-6 to h1-h6): the title and code styles that
# pandoc and Word use.
DOCX_STYLE_MAP = """
p[style-name='Title'] => h1:fresh
p.Title => h1:fresh
p[style-name='Source Code'] => pre:separator('\\n')
r[style-name='Verbatim Char'] => code
"""


def check_zip_size(data: bytes, limit: int, kind: str = "DOCX") -> zipfile.ZipFile:
    """The archive, or SourceError if it is not one or unpacks to more than `limit` bytes.

    Python's zipfile reads no more than a member's declared size, so the sum of the
    declared sizes bounds what the reader can be made to unpack.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise SourceError(f"corrupt or truncated {kind} (not a readable zip archive)") from exc
    unpacked = sum(info.file_size for info in archive.infolist())
    if unpacked > limit:
        archive.close()
        raise SourceError(
            f"{kind} unpacks to {unpacked / MIB:.0f} MB, over the limit of {limit / MIB:g} MB (a zip bomb?)"
        )
    return archive


class DocxParser(BaseBlobParser):
    """A Word document as markdown: mammoth's HTML (heading styles as h1-h6), then markdownify.

    langchain-community's Docx2txtLoader and MsWordParser return plain text: heading
    styles and tables are lost, and with them the heading path.
    """

    def __init__(self, max_unpacked_bytes: int = Limits.max_unpacked_bytes):
        self.max_unpacked_bytes = max_unpacked_bytes

    def lazy_parse(self, blob: Blob) -> Iterator[Document]:
        """One Document per file."""
        import mammoth

        archive = check_zip_size(blob.as_bytes(), self.max_unpacked_bytes)
        with archive:
            if "word/document.xml" not in archive.namelist():
                raise SourceError("corrupt DOCX (no word/document.xml inside)")
            try:
                archive.testzip()
            except Exception as exc:
                raise SourceError(f"corrupt DOCX ({type(exc).__name__}: {exc})") from exc
        try:
            result = mammoth.convert_to_html(io.BytesIO(blob.as_bytes()), style_map=DOCX_STYLE_MAP)
        except SourceError:
            raise
        except Exception as exc:
            raise SourceError(f"corrupt DOCX ({type(exc).__name__}: {exc})") from exc
        markdown, _ = html_to_markdown(result.value)
        if not markdown.strip():
            raise SourceError("no text in the document")
        yield Document(page_content=markdown, metadata={"source": blob.source})


# --- all formats ----------------------------------------------------------------------


def make_parser(limits: Limits | None = None) -> BaseBlobParser:
    """LangChain's MimeTypeBasedParser over the parser of each supported format."""
    from langchain_community.document_loaders.parsers.generic import MimeTypeBasedParser
    from langchain_community.document_loaders.parsers.txt import TextParser

    from loaders.isolation import IsolatedParser
    from loaders.pdf import PdfParser

    limits = limits or Limits()
    text = TextParser()
    html = HtmlParser()
    handlers: dict[str, BaseBlobParser] = {
        MARKDOWN: text,
        PLAIN_TEXT: text,
        RST: text,
        HTML: html,
        XHTML: html,
        PDF: IsolatedParser(PdfParser(limits.max_pages), limits.seconds, limits.memory_bytes),
        DOCX: IsolatedParser(DocxParser(limits.max_unpacked_bytes), limits.seconds, limits.memory_bytes),
    }
    return MimeTypeBasedParser(handlers)


def close_parser(parser: BaseBlobParser) -> None:
    """Stop the worker processes of a parser from `make_parser` (they restart when needed)."""
    handlers = getattr(parser, "handlers", {})
    for handler in {id(h): h for h in handlers.values()}.values():
        close = getattr(handler, "close", None)
        if close is not None:
            close()


CHARSET = re.compile(r"charset=[\"']?([\w.:-]+)", re.IGNORECASE)


def content_type(header: str | None) -> tuple[str | None, str | None]:
    """(mime type, charset) of a Content-Type header."""
    if not header:
        return None, None
    mime = header.split(";", 1)[0].strip().lower() or None
    match = CHARSET.search(header)
    return mime, match.group(1) if match else None
