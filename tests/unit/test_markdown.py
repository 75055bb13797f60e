"""Markdown → sections → token-capped chunks, with the real MiniLM tokenizer (no torch)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from langchain_core.documents import Document

from loaders.markdown import (
    Chunker,
    chunk_id,
    heading_path,
    naive_chunks,
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


def _doc(text: str = "A > B\n\nbody", source: str = "a.md", index: int = 0) -> Document:
    return Document(
        page_content=text, metadata={"source": source, "headers": ["A", "B"], "chunk_index": index}
    )


def test_chunk_id_is_deterministic_and_content_addressed() -> None:
    base = chunk_id("/kb", _doc())
    assert base == chunk_id("/kb", _doc())
    assert re.fullmatch(r"[0-9a-f]{40}", base)
    variants = {
        chunk_id("/kb", _doc(text="A > B\n\nbody changed")),
        chunk_id("/kb", _doc(source="b.md")),
        chunk_id("/other", _doc()),
        chunk_id("/kb", _doc(index=1)),
    }
    assert base not in variants
    assert len(variants) == 4


def test_chunk_id_parts_cannot_run_into_each_other() -> None:
    assert chunk_id("/kb", _doc(source="ab.md")) != chunk_id("/kba", _doc(source="b.md"))


def test_chunk_ids_of_a_file_are_stable_across_runs(faq_dir: Path, tokenizer: Any) -> None:
    text = (faq_dir / "performance_faq.md").read_text(encoding="utf-8")
    first = [chunk_id("/r", c) for c in Chunker(token_counter(tokenizer)).chunks("p.md", text)]
    second = [chunk_id("/r", c) for c in Chunker(token_counter(tokenizer)).chunks("p.md", text)]
    assert first == second
    assert len(set(first)) == len(first)


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
