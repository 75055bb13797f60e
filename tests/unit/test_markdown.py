"""Markdown → sections → token-capped chunks, with the real MiniLM tokenizer (no torch)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from langchain_core.documents import Document
from langchain_text_splitters import MarkdownHeaderTextSplitter

from loaders.markdown import (
    Chunker,
    chunk_id,
    citation,
    heading_path,
    naive_chunks,
    page_mark,
    split_front_matter,
    split_sections,
    token_counter,
)
from store.embeddings import load_tokenizer, packaged_minilm_path

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus"
FAQ_FILES = ["operational_faq.md", "performance_faq.md", "product_faq.md", "troubleshooting.md"]
MODEL_WINDOW = 256  # all-MiniLM-L6-v2's max_seq_length, [CLS] and [SEP] included


@pytest.fixture(scope="module")
def faq_dir() -> Path:
    path = CORPUS / "milvus-faq"
    assert path.is_dir(), f"corpus missing at {path}"
    assert sorted(p.name for p in path.glob("*.md")) == FAQ_FILES
    return path


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    tok = load_tokenizer(packaged_minilm_path())
    assert tok is not None
    return tok


@pytest.fixture(scope="module")
def faq_chunks(faq_dir: Path, tokenizer: Any) -> dict[str, list[Document]]:
    chunker = Chunker(token_counter(tokenizer), max_tokens=240)
    return {name: chunker.chunks(name, (faq_dir / name).read_text(encoding="utf-8")) for name in FAQ_FILES}


# --- front matter ---------------------------------------------------------------------


def test_split_front_matter_reads_simple_keys() -> None:
    text = (
        "---\nid: product_faq.md\ntitle: 'Product FAQ: basics'\nsummary: \"short\"\n---\n# Heading\n\nbody\n"
    )
    meta, body = split_front_matter(text)
    assert meta == {"id": "product_faq.md", "title": "Product FAQ: basics", "summary": "short"}
    assert body == "# Heading\n\nbody\n"


@pytest.mark.parametrize(
    "text",
    ["# No front matter\n\n---\nnot: meta\n---\n", "---\nunterminated: yes\n# Heading\n", ""],
)
def test_split_front_matter_without_a_block_returns_the_text(text: str) -> None:
    assert split_front_matter(text) == ({}, text)


# --- sections -------------------------------------------------------------------------


def test_split_sections_nests_headers_outermost_first() -> None:
    text = "# A\n\nintro\n\n## B\n\nb body\n\n### C\n\nc body\n\n## D\n\nd body\n\n# E\n\ne body\n"
    sections = split_sections(text)
    assert [(s.headers, s.body) for s in sections] == [
        (["A"], "intro"),
        (["A", "B"], "b body"),
        (["A", "B", "C"], "c body"),
        (["A", "D"], "d body"),
        (["E"], "e body"),
    ]


def test_text_before_the_first_heading_gets_the_title() -> None:
    text = "---\ntitle: Quickstart\n---\nPreamble text.\n\n## Install\n\npip install x\n"
    sections = split_sections(text)
    assert sections[0].headers == ["Quickstart"]
    assert sections[0].body == "Preamble text."
    assert sections[1].headers == ["Install"]


def test_troubleshooting_indented_headings_are_split(faq_dir: Path) -> None:
    sections = split_sections((faq_dir / "troubleshooting.md").read_text(encoding="utf-8"))
    headers = [s.headers for s in sections]
    assert ["Troubleshooting", "Boot issues"] in headers
    assert ["Troubleshooting", "Runtime issues"] in headers
    assert ["Troubleshooting", "etcd crash issues", "2. etcd pod crash"] in headers
    assert ["Troubleshooting", "etcd crash issues", "4. All pods crash"] in headers
    for section in sections:
        assert all(not h.startswith("#") and h == h.strip() for h in section.headers)
        assert not re.search(r"^\s*#{2,} ", section.body, re.MULTILINE), section.body
    boot = next(s for s in sections if s.headers[-1] == "Boot issues")
    assert "docker logs" in boot.body
    # "# delete the pvc ..." lines are shell comments inside code, not headings.
    crash = next(s for s in sections if s.headers[-1].startswith("3. Multiple pods"))
    assert "# delete the pvc for etcd-1 and etcd-2" in crash.body


def test_code_block_comment_is_not_a_heading_and_keeps_indentation() -> None:
    text = (
        "# Guide\n\nSome text.\n\n"
        "```python\n"
        "def connect(uri):\n"
        "    # comment about the uri\n"
        "    if uri:\n"
        "        return uri\n"
        "# not a heading either\n"
        "```\n\n"
        "## Next\n\nafter\n"
    )
    sections = split_sections(text)
    assert [s.headers for s in sections] == [["Guide"], ["Guide", "Next"]]
    body = sections[0].body
    assert "def connect(uri):\n    # comment about the uri\n    if uri:\n        return uri\n" in body
    assert "# not a heading either" in body


def test_nested_list_indentation_survives() -> None:
    text = "# L\n\n- item\n  - nested item\n    continued\n"
    (section,) = split_sections(text)
    assert section.body == "- item\n  - nested item\n    continued"


def test_paragraph_breaks_survive_the_split() -> None:
    text = "# P\n\nFirst paragraph.\n\nSecond paragraph.\n\n```\ncode\n```\n"
    (section,) = split_sections(text)
    assert section.body == "First paragraph.\n\nSecond paragraph.\n\n```\ncode\n```"


def test_one_line_code_span_does_not_hide_later_indented_headings() -> None:
    text = "# Top\n\n```rag ingest docs/```\n\n  ## Indented\n\n  text\n"
    sections = split_sections(text)
    assert [s.headers for s in sections] == [["Top"], ["Top", "Indented"]]


@pytest.mark.parametrize(
    ("heading", "expected"),
    [
        ("### IVF_FLAT", "IVF_FLAT"),
        ("## show index_progress", "show index_progress"),
        ("### `Guarantee_timestamp`", "Guarantee_timestamp"),
        ("## Using **bold** and _emphasis_", "Using bold and emphasis"),
        ("## Clients in C#", "Clients in C#"),
        ("## Closed heading ##", "Closed heading"),
        ("## Boot issues {#boot_issues}", "Boot issues"),
    ],
)
def test_heading_text_keeps_identifiers_and_drops_markup(heading: str, expected: str) -> None:
    (section,) = split_sections(f"{heading}\n\nbody\n")
    assert section.headers == [expected]


# --- chunker on the FAQ ---------------------------------------------------------------


def test_faq_chunks_fit_the_model_window(faq_chunks: dict[str, list[Document]], tokenizer: Any) -> None:
    total = 0
    for name, chunks in faq_chunks.items():
        assert chunks, name
        for chunk in chunks:
            n_tokens = len(tokenizer.encode(chunk.page_content, add_special_tokens=True).ids)
            assert n_tokens <= MODEL_WINDOW, (name, chunk.metadata["headers"], n_tokens)
            total += 1
    assert total >= 60


def test_faq_chunks_start_with_their_heading_path(faq_chunks: dict[str, list[Document]]) -> None:
    for name, chunks in faq_chunks.items():
        for chunk in chunks:
            headers = chunk.metadata["headers"]
            assert headers, (name, chunk.page_content[:80])
            assert chunk.page_content.startswith(heading_path(headers) + "\n\n")
            assert chunk.page_content.strip() != heading_path(headers)


def test_faq_chunk_metadata(faq_chunks: dict[str, list[Document]]) -> None:
    for name, chunks in faq_chunks.items():
        assert [c.metadata["chunk_index"] for c in chunks] == list(range(len(chunks)))
        for chunk in chunks:
            assert chunk.metadata["source"] == name
            assert isinstance(chunk.metadata["headers"], list)
            assert all(isinstance(h, str) and h for h in chunk.metadata["headers"])


def test_where_does_milvus_store_data_is_a_chunk(
    faq_dir: Path, faq_chunks: dict[str, list[Document]]
) -> None:
    raw = (faq_dir / "product_faq.md").read_text(encoding="utf-8")
    answer = raw.split("Where does Milvus store data?", 1)[1].strip().splitlines()[0].strip()
    matching = [
        c
        for c in faq_chunks["product_faq.md"]
        if c.metadata["headers"][-1] == "Where does Milvus store data?"
    ]
    assert matching
    assert matching[0].page_content.startswith("Product FAQ > Where does Milvus store data?\n\n")
    assert answer in matching[0].page_content


def test_every_faq_question_heading_becomes_a_chunk(
    faq_dir: Path, faq_chunks: dict[str, list[Document]]
) -> None:
    for name in FAQ_FILES:
        raw = (faq_dir / name).read_text(encoding="utf-8")
        questions = [q.strip() for q in re.findall(r"^#### (.+\?)\s*$", raw, re.MULTILINE)]
        chunk_headers = {c.metadata["headers"][-1] for c in faq_chunks[name]}
        for question in questions:
            plain = re.sub(r"[`*]", "", question)
            assert plain in chunk_headers, (name, question)


def test_long_sections_are_capped_and_nothing_is_lost(tokenizer: Any) -> None:
    words = [f"term{i}" for i in range(600)]
    paragraphs = [" ".join(words[i : i + 40]) + "." for i in range(0, len(words), 40)]
    text = "# Big\n\n## Section\n\n" + "\n\n".join(paragraphs) + "\n"
    count = token_counter(tokenizer)
    chunks = Chunker(count, max_tokens=64).chunks("big.md", text, extra={"root": "/kb"})

    assert len(chunks) > 5
    for chunk in chunks:
        assert count(chunk.page_content) <= 64
        assert chunk.page_content.startswith("Big > Section\n\n")
        assert chunk.metadata["root"] == "/kb"
        assert chunk.metadata["headers"] == ["Big", "Section"]
    seen = set(" ".join(c.page_content for c in chunks).replace(".", " ").split())
    assert set(words) <= seen


def test_word_estimate_without_tokenizer() -> None:
    count = token_counter(None)
    assert count("") >= 1
    assert count("one two three four") > count("one two")
    chunks = Chunker(count, max_tokens=40).chunks("x.md", "# T\n\n" + " ".join(["word"] * 200))
    assert len(chunks) > 3
    assert all(count(c.page_content) <= 40 for c in chunks)


# --- ids ------------------------------------------------------------------------------


def test_chunk_id_is_deterministic_and_keyed_on_the_source() -> None:
    base = chunk_id("/kb", "a.md", "hash-1", "2:240", 0)
    assert base == chunk_id("/kb", "a.md", "hash-1", "2:240", 0)
    assert re.fullmatch(r"[0-9a-f]{40}", base)
    variants = {
        chunk_id("/kb", "a.md", "hash-2", "2:240", 0),  # the file changed
        chunk_id("/kb", "b.md", "hash-1", "2:240", 0),
        chunk_id("/other", "a.md", "hash-1", "2:240", 0),
        chunk_id("/kb", "a.md", "hash-1", "3:240", 0),  # the chunking changed on purpose
        chunk_id("/kb", "a.md", "hash-1", "2:120", 0),  # another size cap
        chunk_id("/kb", "a.md", "hash-1", "2:240", 1),
    }
    assert base not in variants
    assert len(variants) == 6


def test_chunk_id_parts_cannot_run_into_each_other() -> None:
    assert chunk_id("/kb", "ab.md", "h", "v", 0) != chunk_id("/kba", "b.md", "h", "v", 0)
    assert chunk_id("/kb", "a.md", "h1", "v", 0) != chunk_id("/kb", "a.md", "h", "1v", 0)


def _loaded(text: str, source: str = "p.md") -> Document:
    return Document(page_content=text, metadata={"source": source, "root": "/r", "format": "markdown"})


def test_chunk_ids_of_a_file_are_stable_across_runs(faq_dir: Path, tokenizer: Any) -> None:
    document = _loaded((faq_dir / "performance_faq.md").read_text(encoding="utf-8"))
    first = [c.id for c in Chunker(token_counter(tokenizer)).split_document(document)]
    second = [c.id for c in Chunker(token_counter(tokenizer)).split_document(document)]
    assert first == second
    assert len(set(first)) == len(first)


class UpgradedSplitter(MarkdownHeaderTextSplitter):
    """A langchain-text-splitters release that joins a section's blocks differently."""

    def split_text(self, text: str) -> list[Document]:
        return [
            Document(page_content=d.page_content.replace("  \n", "\n"), metadata=d.metadata)
            for d in super().split_text(text)
        ]


def test_a_splitter_upgrade_changes_chunk_text_but_not_chunk_ids(
    faq_dir: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    document = _loaded((faq_dir / "product_faq.md").read_text(encoding="utf-8"))
    chunker = Chunker(token_counter(tokenizer))
    before = chunker.split_document(document)
    monkeypatch.setattr("loaders.markdown.MarkdownHeaderTextSplitter", UpgradedSplitter)
    after = chunker.split_document(document)
    assert [c.page_content for c in after] != [c.page_content for c in before], "the upgrade shows"
    assert [c.id for c in after] == [c.id for c in before]


def test_a_changed_file_gets_new_ids_for_its_chunks(tokenizer: Any) -> None:
    chunker = Chunker(token_counter(tokenizer))
    old = chunker.split_document(_loaded("# A\n\nalpha\n\n# B\n\nbeta\n"))
    new = chunker.split_document(_loaded("# A\n\nalpha\n\n# B\n\nbeta, edited\n"))
    assert not {c.id for c in old} & {c.id for c in new}


# --- the tutorial's baseline ----------------------------------------------------------


def test_naive_chunks_reproduce_the_tutorials_72(faq_dir: Path) -> None:
    chunks = [
        c for name in FAQ_FILES for c in naive_chunks(name, (faq_dir / name).read_text(encoding="utf-8"))
    ]
    assert len(chunks) == 72
    for name in FAQ_FILES:
        per_file = [c for c in chunks if c.metadata["source"] == name]
        assert [c.metadata["chunk_index"] for c in per_file] == list(range(len(per_file)))


def test_link_targets_and_html_are_dropped_from_prose_but_not_from_code() -> None:
    text = (
        "# Links\n\n"
        "Store data in [MinIO](https://min.io/) or <b>S3</b>.<br/> <!-- editor note -->\n\n"
        "```html\n"
        '<div class="note"><a href="https://example.com">[x](y)</a></div>\n'
        "<!-- kept in code -->\n"
        "```\n"
    )
    (section,) = split_sections(text)
    assert section.body.startswith("Store data in MinIO or S3.")
    assert "https://min.io" not in section.body and "editor note" not in section.body
    assert (
        '<div class="note"><a href="https://example.com">[x](y)</a></div>\n<!-- kept in code -->'
        in section.body
    )


# --- pages and citations ----------------------------------------------------------------


def test_paged_text_gives_each_chunk_its_first_and_last_page() -> None:
    text = (
        "# Guide\n\nIntro on page one.\n\n## Spans\n\nStarts on page one\n"
        + page_mark(2)
        + "\nand ends on page two.\n"
        + page_mark(3)
        + "\n## Later\n\nAll on page three.\n"
    )
    chunks = Chunker(token_counter(None)).chunks("g.pdf", text, paged=True)
    found = {tuple(c.metadata["headers"]): (c.metadata["page"], c.metadata["last_page"]) for c in chunks}
    assert found == {("Guide",): (1, 1), ("Guide", "Spans"): (1, 2), ("Guide", "Later"): (3, 3)}
    assert not any("\u27e6" in c.page_content for c in chunks), "page marks never reach the text"
    assert "Starts on page one\n\nand ends on page two." in chunks[1].page_content


def test_long_paged_sections_split_with_pages_per_piece() -> None:
    pages = [f"Paragraph {n} " + "word " * 60 for n in range(1, 5)]
    text = "# Long\n\n" + "\n\n".join(
        (f"{page_mark(n)}\n" if n > 1 else "") + body for n, body in enumerate(pages, start=1)
    )
    chunks = Chunker(token_counter(None), max_tokens=100).chunks("l.pdf", text, paged=True)
    assert len(chunks) >= 4
    assert chunks[0].metadata["page"] == 1 and chunks[-1].metadata["last_page"] == 4
    for chunk in chunks:
        numbers = [int(n) for n in re.findall(r"Paragraph (\d)", chunk.page_content)]
        assert chunk.metadata["page"] <= chunk.metadata["last_page"]
        for number in numbers:  # each paragraph is on its own page
            assert chunk.metadata["page"] <= number <= chunk.metadata["last_page"]


def test_unpaged_chunks_have_no_pages() -> None:
    (chunk,) = Chunker(token_counter(None)).chunks("a.md", "# A\n\ntext\n")
    assert chunk.metadata["page"] is None and chunk.metadata["last_page"] is None


@pytest.mark.parametrize(
    ("page", "last_page", "expected"),
    [
        (3, 3, "file.pdf p. 3 — Heading > Sub"),
        (3, None, "file.pdf p. 3 — Heading > Sub"),
        (3, 4, "file.pdf pp. 3-4 — Heading > Sub"),
        (None, None, "file.pdf — Heading > Sub"),
    ],
)
def test_citation_names_file_pages_and_section(page: Any, last_page: Any, expected: str) -> None:
    assert citation("file.pdf", ["Heading", "Sub"], page, last_page) == expected


def test_citation_without_headings_is_the_file_and_page() -> None:
    assert citation("notes.pdf", [], 2, 2) == "notes.pdf p. 2"
    assert citation("notes.md", []) == "notes.md"
