"""Markdown → chunks: header split, heading path in the text, a token cap per chunk."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from langchain_core.documents import Document
from langchain_text_splitters import MarkdownHeaderTextSplitter, RecursiveCharacterTextSplitter

HEADERS_TO_SPLIT_ON = [("#" * n, f"h{n}") for n in range(1, 7)]
FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(?:\n|\Z)", re.DOTALL)
# MarkdownHeaderTextSplitter strips every line, which would flatten code and nested lists.
# Leading whitespace is swapped for this non-space character before the split and back after.
INDENT_MARK = "\u2800"
HEADING_SEPARATOR = " > "
# "Page N starts here", in the text of a paged document (PDF): printable characters (the
# header splitter drops unprintable ones) that no splitter treats as whitespace or markup.
# The chunker reads them into `page` and `last_page`, and removes them from the chunk text.
PAGE_MARK = re.compile("\u27e6\u27e6(\\d+)\u27e7\u27e7")
# Part of every chunk id: bump it when a change to the chunking here should re-embed every
# corpus. Library upgrades (langchain-text-splitters, the format readers) do not change ids.
CHUNKING_VERSION = "2"
# Separators tried in order when a section is too long: paragraphs, code fences, lines, words.
CAP_SEPARATORS = ["\n\n", "\n```", "\n", ". ", " ", ""]

TokenCounter = Callable[[str], int]


def split_front_matter(text: str) -> tuple[dict[str, str], str]:
    """YAML front matter (simple `key: value` lines) and the body after it."""
    match = FRONT_MATTER.match(text)
    if not match:
        return {}, text
    meta: dict[str, str] = {}
    for line in match.group(1).splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            meta[key.strip()] = value.strip().strip("'\"")
    return meta, text[match.end() :]


def _fence_state(stripped: str, fence: str) -> tuple[str, bool]:
    """MarkdownHeaderTextSplitter's own code-fence rule: (open fence after this line, is a fence).

    The indentation pass must agree with the splitter on what is code: a line such as
    "```rag ingest```" opens no block there, and only the opening fence closes one.
    """
    if not fence:
        if stripped.startswith("```") and stripped.count("```") == 1:
            return "```", True
        if stripped.startswith("~~~"):
            return "~~~", True
        return "", False
    if stripped.startswith(fence):
        return "", True
    return fence, False


def _protect_indentation(text: str) -> str:
    lines = []
    fence = ""
    for line in text.split("\n"):
        fence, is_fence = _fence_state(line.strip(), fence)
        if is_fence:
            lines.append(line.strip())
            continue
        stripped = line.lstrip(" \t")
        if not fence and stripped.startswith("#"):
            lines.append(line)  # a heading, possibly indented: let the splitter see it
        elif stripped and len(stripped) < len(line):
            indent = line[: len(line) - len(stripped)].replace("\t", "    ")
            lines.append(INDENT_MARK * len(indent) + stripped)
        else:
            lines.append(line)
    return "\n".join(lines)


LINK = re.compile(r"!?\[([^\]]*)\]\((?:[^()\s]|\([^()\s]*\))*(?:\s+\"[^\"]*\")?\)")
HTML_TAG = re.compile(
    r"</?(?:div|span|p|br|img|a|b|i|strong|em|sup|sub|table|thead|tbody|tr|td|th|ul|ol|li|code|pre"
    r"|h[1-6]|button|details|summary)\b[^>]*>",
    re.IGNORECASE,
)
HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)


def _clean_prose(text: str) -> str:
    text = HTML_COMMENT.sub("", text)
    text = LINK.sub(lambda m: m.group(1), text)
    text = HTML_TAG.sub("", text)
    return re.sub(r"\n{3,}", "\n\n", text)


def clean_markdown(text: str) -> str:
    """Text as a reader sees it: link targets, HTML tags and comments removed.

    URLs cost many model tokens and carry little meaning; dropping them keeps more of a
    section inside the embedding model's 256-token window. Fenced code is left verbatim:
    an HTML or Markdown example must keep its tags and brackets.
    """
    out: list[str] = []
    prose: list[str] = []
    fence = ""
    for line in text.split("\n"):
        next_fence, is_fence = _fence_state(line.strip(), fence)
        if fence or is_fence:
            if prose:
                out.append(_clean_prose("\n".join(prose)))
                prose = []
            out.append(line)
        else:
            prose.append(line)
        fence = next_fence
    if prose:
        out.append(_clean_prose("\n".join(prose)))
    return "\n".join(out)


def _restore(text: str) -> str:
    # The splitter joins the blocks of a section (paragraphs, lists, code) with "  \n":
    # they were separated by blank lines, so give the paragraph break back.
    text = text.replace("  \n", "\n\n")
    return re.sub(f"^{INDENT_MARK}+", lambda m: " " * len(m.group(0)), text, flags=re.MULTILINE).strip()


@dataclass
class Section:
    """One header section: its heading path (outermost first) and its body."""

    headers: list[str]
    body: str


def split_sections(text: str, title: str | None = None, front_matter: bool = True) -> list[Section]:
    """Split markdown on headings with LangChain's MarkdownHeaderTextSplitter.

    Text before the first heading gets the front matter's `title:`, else `title`, as its heading.
    """
    meta, body = split_front_matter(text) if front_matter else ({}, text)
    title = meta.get("title") or title
    body = clean_markdown(body)
    splitter = MarkdownHeaderTextSplitter(HEADERS_TO_SPLIT_ON, strip_headers=True)
    sections = []
    for doc in splitter.split_text(_protect_indentation(body)):
        headers = [
            _clean_heading(doc.metadata[key]) for _, key in HEADERS_TO_SPLIT_ON if doc.metadata.get(key)
        ]
        if not headers and title:
            headers = [title]
        content = _restore(doc.page_content)
        if content:
            sections.append(Section(headers=headers, body=content))
    return sections


CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# `*` and `_` that open or close emphasis; not the `_` inside IVF_FLAT or index_progress.
EMPHASIS = re.compile(r"(?<!\w)[*_]+|[*_]+(?!\w)")


def _clean_heading(heading: str) -> str:
    heading = heading.replace(INDENT_MARK, " ").strip()
    # Drop trailing anchors such as `{#boot_issues}` and an ATX closing sequence (`## A ##`),
    # but not the `#` of "C#".
    heading = re.sub(r"\s*\{#[^}]*\}\s*$", "", heading)
    heading = re.sub(r"(?:^|\s+)#+\s*$", "", heading)
    # Inline markup around the words: code spans keep their text verbatim.
    parts, pos = [], 0
    for match in CODE_SPAN.finditer(heading):
        parts.append(EMPHASIS.sub("", heading[pos : match.start()]))
        parts.append(match.group(2).strip())
        pos = match.end()
    parts.append(EMPHASIS.sub("", heading[pos:]).replace("`", ""))
    return re.sub(r"\s+", " ", "".join(parts)).strip()


def heading_path(headers: list[str]) -> str:
    """'Product FAQ > Where does Milvus store data?'"""
    return HEADING_SEPARATOR.join(headers)


def page_mark(page: int) -> str:
    """The line that starts page `page` in a paged document's text."""
    return f"\u27e6\u27e6{page}\u27e7\u27e7"


def page_label(page: int | None, last_page: int | None = None) -> str:
    """'p. 3', 'pp. 3-4', or '' for a chunk without pages."""
    if not page:
        return ""
    if last_page and last_page != page:
        return f"pp. {page}-{last_page}"
    return f"p. {page}"


def citation(source: str, headers: list[str], page: int | None = None, last_page: int | None = None) -> str:
    """Where a passage is: 'file.pdf p. 3 — Heading > Sub'."""
    where = " ".join(part for part in (source, page_label(page, last_page)) if part)
    section = heading_path(headers)
    return f"{where} — {section}" if section else where


def _paged_pieces(
    body: str, pieces: list[str], page: int
) -> tuple[list[tuple[str, int | None, int | None]], int]:
    """Each piece without page marks, with its first and last page; and the page at the end.

    `page` is the page the section starts on. Pieces are substrings of `body` (overlapping).
    """
    marks = [(m.end(), int(m.group(1))) for m in PAGE_MARK.finditer(body)]

    def page_at(offset: int) -> int:
        current = page
        for end, number in marks:
            if end > offset:
                break
            current = number
        return current

    located: list[tuple[str, int | None, int | None]] = []
    cursor = 0
    for piece in pieces:
        start = body.find(piece, cursor)
        if start < 0:
            start = cursor
        else:
            cursor = start + 1
        parts = PAGE_MARK.split(piece)  # text, page, text, page, text...
        current = page_at(start)
        pages = []
        for position, part in enumerate(parts):
            if position % 2:
                current = int(part)
            elif part.strip():
                pages.append(current)
        text = re.sub(r"\n{3,}", "\n\n", "".join(parts[0::2])).strip()
        if pages:
            located.append((text, pages[0], pages[-1]))
    return located, page_at(len(body))


@dataclass
class Chunker:
    """Turns one file's text into Documents no longer than `max_tokens` model tokens.

    The heading path is prepended to the chunk text: a section body alone often
    lacks the words of its question ("Where does Milvus store data?").
    """

    count_tokens: TokenCounter
    max_tokens: int = 240
    _splitters: dict[int, RecursiveCharacterTextSplitter] = field(default_factory=dict)

    def _splitter(self, budget: int) -> RecursiveCharacterTextSplitter:
        if budget not in self._splitters:
            self._splitters[budget] = RecursiveCharacterTextSplitter(
                chunk_size=budget,
                chunk_overlap=min(24, budget // 8),
                length_function=self.count_tokens,
                separators=CAP_SEPARATORS,
                keep_separator=True,
            )
        return self._splitters[budget]

    @property
    def version(self) -> str:
        """What, besides the source text, decides the chunks: this code's version and the size cap."""
        return f"{CHUNKING_VERSION}:{self.max_tokens}"

    def split_document(self, document: Document) -> list[Document]:
        """The chunks of one loaded file, each with its id (see `chunk_id`).

        `document.metadata` has `source`, `root`, and from the loaders `format`, `title` and
        `source_hash` (of the bytes read; the text's hash when absent).
        """
        meta = document.metadata
        kind = meta.get("format", "markdown")
        chunks = self.chunks(
            meta["source"],
            document.page_content,
            extra={"root": meta["root"]},
            title=meta.get("title") or None,
            front_matter=kind in ("markdown", "text"),
            paged=kind == "pdf",
        )
        digest = meta.get("source_hash") or text_hash(document.page_content)
        for chunk in chunks:
            chunk.id = chunk_id(
                meta["root"], meta["source"], digest, self.version, chunk.metadata["chunk_index"]
            )
        return chunks

    def chunks(
        self,
        source: str,
        text: str,
        extra: dict[str, Any] | None = None,
        *,
        title: str | None = None,
        front_matter: bool = True,
        paged: bool = False,
    ) -> list[Document]:
        """Documents with metadata {source, headers, chunk_index, page, last_page} (plus `extra`).

        `page` and `last_page` are None unless the text is `paged` (has page marks).
        """
        documents: list[Document] = []
        page = 1
        for section in split_sections(text, title=title, front_matter=front_matter):
            prefix = heading_path(section.headers)
            prefix_text = f"{prefix}\n\n" if prefix else ""
            budget = max(32, self.max_tokens - self.count_tokens(prefix_text))
            pieces = (
                [section.body]
                if self.count_tokens(section.body) <= budget
                else self._splitter(budget).split_text(section.body)
            )
            located: list[tuple[str, int | None, int | None]]
            if paged:
                located, page = _paged_pieces(section.body, pieces, page)
            else:
                located = [(piece.strip(), None, None) for piece in pieces]
            for piece, first_page, last_page in located:
                if not piece:
                    continue
                documents.append(
                    Document(
                        page_content=prefix_text + piece,
                        metadata={
                            "source": source,
                            "headers": list(section.headers),
                            "chunk_index": len(documents),
                            "page": first_page,
                            "last_page": last_page,
                            **(extra or {}),
                        },
                    )
                )
        return documents


def token_counter(tokenizer: Any) -> TokenCounter:
    """Counts model tokens (without [CLS]/[SEP]); falls back to a words-based estimate."""
    if tokenizer is None:
        return lambda text: int(len(text.split()) * 1.4) + 1

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    return count


def heading_text(doc: Document) -> str:
    """What the heading vector embeds: the deepest heading, or the chunk's first line."""
    headers = doc.metadata.get("headers") or []
    if headers:
        return str(headers[-1])
    return doc.page_content.strip().split("\n", 1)[0][:300]


def text_hash(text: str | bytes) -> str:
    """The hash of a file's bytes (or text) that chunk ids are keyed on."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()


def chunk_id(root: str, source: str, source_hash: str, version: str, chunk_index: int) -> str:
    """Deterministic id from the file the chunk comes from, its content, and the chunk's place.

    Keyed on the source, not on the chunk text that the splitter made: an upgrade of
    langchain-text-splitters that changes how text is split or joined leaves every id, so
    the next ingest embeds nothing that did not change. A changed file gets new ids for all
    its chunks. `version` (Chunker.version) changes ids on purpose.
    """
    digest = hashlib.sha256()
    for part in (root, source, source_hash, version, str(chunk_index)):
        digest.update(part.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()[:40]


def naive_chunks(source: str, text: str) -> Iterable[Document]:
    """The tutorial's pipeline: split on '# ', no cap. Kept as the evaluation baseline."""
    text = PAGE_MARK.sub("", text)
    for index, piece in enumerate(p for p in text.split("# ") if p.strip()):
        yield Document(page_content=piece, metadata={"source": source, "headers": [], "chunk_index": index})
