"""PDF → markdown with headings and page marks, read with pdfplumber.

langchain-community's PDF parsers (PyPDFParser, PDFPlumberParser, PDFMinerParser) return
each page's plain text: a heading is then just a line, and the heading path is lost. This
parser keeps LangChain's blob-parser interface and reads the same pdfplumber lines, with the
font of each character, to mark headings:

- from the PDF's outline (bookmarks) when it has one that names lines of the text;
- otherwise from font size and weight: a whole line larger than the body text, or bold at
  the body's size, is a heading; larger fonts are higher levels.

Lines in a monospaced font become fenced code, ruled tables markdown tables, and each new
page starts with a page mark (see PAGE_MARK) that the chunker turns into page numbers.
"""

from __future__ import annotations

import io
import statistics
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from langchain_core.document_loaders import BaseBlobParser
from langchain_core.documents import Document
from langchain_core.documents.base import Blob

from errors import SourceError
from loaders.markdown import page_mark

# A heading is at least this much larger than the body text, or bold at its size.
LARGER = 1.15
MAX_HEADING_CHARS = 250
BOLD_WORDS = ("bold", "black", "heavy", "semibold", "demibold")
MONO_WORDS = ("mono", "courier", "consola", "menlo", "code")


@dataclass
class Line:
    """One text line of a page, with the style of its characters."""

    page: int
    text: str
    top: float
    bottom: float
    x0: float
    size: float
    bold: bool
    mono: bool
    glyphs: int
    level: int = 0  # heading level, 0 for body text
    table: str | None = None  # a whole markdown table standing in for this line


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _line(page: int, raw: dict[str, Any]) -> Line | None:
    glyphs = [c for c in raw.get("chars", []) if str(c.get("text", "")).strip()]
    if not glyphs:
        return None
    fonts = [str(c.get("fontname", "")).lower() for c in glyphs]
    return Line(
        page=page,
        text=str(raw["text"]),
        top=float(raw["top"]),
        bottom=float(raw["bottom"]),
        x0=float(raw["x0"]),
        size=round(statistics.median(float(c["size"]) for c in glyphs) * 2) / 2,
        bold=all(any(w in f for w in BOLD_WORDS) for f in fonts),
        mono=all(any(w in f for w in MONO_WORDS) for f in fonts),
        glyphs=len(glyphs),
    )


def _table_markdown(rows: list[list[Any]]) -> str | None:
    cells = [[" ".join(str(c or "").split()).replace("|", "\\|") for c in row] for row in rows if row]
    if len(cells) < 2 or max(len(r) for r in cells) < 2:
        return None
    width = max(len(r) for r in cells)
    cells = [r + [""] * (width - len(r)) for r in cells]
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + " --- |" * width]
    lines += ["| " + " | ".join(r) + " |" for r in cells[1:]]
    return "\n".join(lines)


def _page_lines(page: Any, number: int) -> list[Line]:
    """The page's lines top to bottom; each ruled table as one line holding its markdown."""
    tables = []
    for table in page.find_tables():
        markdown = _table_markdown(table.extract())
        if markdown:
            tables.append((table.bbox, markdown))
    text_page = page
    for bbox, _ in tables:
        text_page = text_page.outside_bbox(bbox)
    lines = [line for raw in text_page.extract_text_lines() if (line := _line(number, raw))]
    for (x0, top, _, bottom), markdown in tables:
        lines.append(Line(number, "", top, bottom, x0, 0.0, False, False, glyphs=0, table=markdown))
    return sorted(lines, key=lambda line: (line.top, line.x0))


def _outline(pdf: Any) -> dict[str, int]:
    """The outline's titles (normalised) and their levels; empty without an outline."""
    from pdfminer.pdfdocument import PDFNoOutlines

    levels: dict[str, int] = {}
    try:
        for level, title, *_ in pdf.doc.get_outlines():
            if title and isinstance(title, str) and _norm(title):
                levels.setdefault(_norm(title), min(int(level), 6))
    except PDFNoOutlines:
        pass
    except Exception:  # a broken outline is no reason to lose the text
        return {}
    return levels


def _mark_outline_headings(lines: list[Line], outline: dict[str, int]) -> bool:
    """Headings where one to three consecutive lines spell an outline title; True if any."""
    found = False
    index = 0
    while index < len(lines):
        for span in (1, 2, 3):
            group = lines[index : index + span]
            if len(group) < span or any(line.table or line.page != group[0].page for line in group):
                break
            level = outline.get(_norm(" ".join(line.text for line in group)))
            if level:
                _merge(lines, index, span, level)
                found = True
                break
        index += 1
    return found


def _merge(lines: list[Line], index: int, span: int, level: int) -> None:
    first = lines[index]
    first.text = " ".join(line.text for line in lines[index : index + span])
    first.bottom = lines[index + span - 1].bottom
    first.level = level
    del lines[index + 1 : index + span]


def _mark_font_headings(lines: list[Line]) -> None:
    """Headings by style: larger than the body text, or bold at the body's size."""
    sizes: Counter[float] = Counter()
    for line in lines:
        if not line.mono and not line.table:
            sizes[line.size] += line.glyphs
    if not sizes:
        return
    body = sizes.most_common(1)[0][0]

    def heading_style(line: Line) -> tuple[float, bool] | None:
        if line.mono or line.table or len(line.text) > MAX_HEADING_CHARS:
            return None
        if not any(ch.isalpha() for ch in line.text):
            return None
        if line.size >= body * LARGER or (line.bold and line.size >= body * 0.95):
            return (line.size, line.bold)
        return None

    styles = [heading_style(line) for line in lines]
    ranked = sorted({s for s in styles if s}, key=lambda s: (-s[0], not s[1]))
    levels = {style: min(rank + 1, 6) for rank, style in enumerate(ranked)}
    index = 0
    while index < len(lines):
        style = styles[index]
        if style is None:
            index += 1
            continue
        # A heading that wraps: the next lines in the same style, close below it.
        span = 1
        while (
            index + span < len(lines)
            and styles[index + span] == style
            and lines[index + span].page == lines[index].page
            and lines[index + span].top - lines[index + span - 1].bottom < style[0] * 0.8
            and len(" ".join(line.text for line in lines[index : index + span + 1])) <= MAX_HEADING_CHARS
        ):
            span += 1
        _merge(lines, index, span, levels[style])
        del styles[index + 1 : index + span]
        index += 1


def _code_block(lines: list[Line]) -> list[str]:
    left = min(line.x0 for line in lines)
    # Monospaced glyphs are about 0.6 em wide: indentation in characters from the x offset.
    char_width = max(statistics.median(line.size for line in lines) * 0.6, 1.0)
    out = ["```"]
    for line in lines:
        indent = max(0, round((line.x0 - left) / char_width))
        out.append(" " * indent + line.text)
    out.append("```")
    return out


def to_markdown(lines: list[Line]) -> str:
    """Markdown of marked lines: headings, paragraphs, code fences, tables, page marks."""
    out: list[str] = []
    page = 1
    index = 0
    previous: Line | None = None
    while index < len(lines):
        line = lines[index]
        if line.page != page:
            page = line.page
            out.append(page_mark(page))
        if line.table:
            out += ["", line.table, ""]
        elif line.level:
            out += ["", "#" * line.level + " " + line.text, ""]
        elif line.mono:
            block = [line]
            while (
                index + 1 < len(lines)
                and lines[index + 1].mono
                and not lines[index + 1].level
                and lines[index + 1].page == page
            ):
                index += 1
                block.append(lines[index])
            out += ["", *_code_block(block), ""]
            line = block[-1]
        else:
            gap = line.top - previous.bottom if previous is not None and previous.page == page else 0.0
            if previous is None or previous.level or previous.mono or gap > 0.5 * line.size:
                out.append("")
            # A line that looks like markdown syntax is text here.
            text = "\\" + line.text if line.text.startswith(("#", "```", "~~~")) else line.text
            out.append(text)
        previous = line
        index += 1
    return "\n".join(out).strip() + "\n"


class PdfParser(BaseBlobParser):
    """A PDF as one markdown Document; metadata `pages` and `title`.

    Skipped, with the reason: encrypted (a password is needed), corrupt or truncated,
    more pages than `max_pages`, and no text layer (a scan: OCR is not supported).
    """

    def __init__(self, max_pages: int = 2000):
        self.max_pages = max_pages

    def lazy_parse(self, blob: Blob) -> Iterator[Document]:
        """One Document per file, pages marked in the text."""
        import pdfplumber
        from pdfminer.pdfdocument import PDFEncryptionError, PDFPasswordIncorrect
        from pdfplumber.utils.exceptions import PdfminerException

        try:
            pdf = pdfplumber.open(io.BytesIO(blob.as_bytes()))
        except PdfminerException as exc:
            cause = exc.args[0] if exc.args else exc
            if isinstance(cause, PDFPasswordIncorrect | PDFEncryptionError):
                raise SourceError("encrypted PDF: it needs a password to open") from exc
            raise SourceError(f"corrupt or truncated PDF ({type(cause).__name__}: {cause})") from exc
        with pdf:
            pages = self._page_count(pdf)
            if pages > self.max_pages:
                raise SourceError(
                    f"the PDF has {pages} pages, over the limit of {self.max_pages} (--max-pages)"
                )
            try:
                lines = [line for page in pdf.pages for line in _page_lines(page, page.page_number)]
                outline = _outline(pdf)
            except SourceError:
                raise
            except PdfminerException as exc:
                cause = exc.args[0] if exc.args else exc
                if isinstance(cause, MemoryError):
                    raise cause from exc  # reported as over the memory limit
                raise SourceError(f"corrupt PDF ({type(cause).__name__}: {cause})") from exc
            title = str(pdf.metadata.get("Title") or "")
        if not any(line.glyphs or line.table for line in lines):
            raise SourceError("no text layer; OCR is not supported")
        if not (outline and _mark_outline_headings(lines, outline)):
            _mark_font_headings(lines)
        yield Document(
            page_content=to_markdown(lines),
            metadata={"source": blob.source, "pages": pages, "title": title},
        )

    def _page_count(self, pdf: Any) -> int:
        # The page tree's /Count, read without walking the tree (a bomb may hold millions).
        from pdfminer.pdftypes import resolve1

        try:
            return int(resolve1(resolve1(pdf.doc.catalog["Pages"])["Count"]))
        except Exception:
            return len(pdf.pages)
