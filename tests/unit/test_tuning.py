"""Pair mining for `rag tune`, and the questions doc2query parses: no model, no Milvus."""

from __future__ import annotations

from langchain_core.documents import Document

from chains.doc2query import parse_questions
from loaders.markdown import Chunker, token_counter
from store.tuning import TuneConfig, chunk_body, mine_pairs

PAGE = """# Page {n}

## Where does Milvus store data {n}?

Milvus deals with two types of data, inserted data and metadata. Inserted data are stored in
object storage such as MinIO. Metadata are kept in etcd by every deployment.

## Range search {n}

A range search finds every vector within a radius of the query vector. It returns them all.

- **Can a range search return more than the limit?**

  No, the limit still applies to the number of results that come back.

## Overview

A generic heading that many pages share. It appears on several pages of this corpus.
"""
EVERYTHING = ("heading", "question", "inline", "subheading", "title", "span")


def corpus(pages: int = 4) -> list[Document]:
    chunker = Chunker(token_counter(None), 240)
    documents = []
    for n in range(pages):
        for chunk in chunker.chunks(f"page{n}.md", PAGE.format(n=n), extra={"root": "/docs"}):
            chunk.id = f"page{n}-{chunk.metadata['chunk_index']}"
            documents.append(chunk)
    return documents


def mined(**config: object) -> list:
    return mine_pairs(corpus(), TuneConfig(min_holdout=0, holdout_share=0.0, **config)).train  # type: ignore[arg-type]


def test_the_body_is_the_chunk_without_its_heading_path() -> None:
    chunk = corpus()[0]
    assert chunk.page_content.startswith("Page 0 > Where does Milvus store data 0?\n\n")
    assert chunk_body(chunk).startswith("Milvus deals with two types of data")


def test_each_kind_pairs_a_query_like_text_with_its_own_section() -> None:
    pairs = mined(kinds=EVERYTHING)
    assert {p.kind for p in pairs} == set(EVERYTHING)
    heading = next(p for p in pairs if p.kind == "heading" and p.anchor == "Page 2 > Range search 2")
    assert heading.positive.startswith("A range search finds every vector")
    assert "Range search 2" not in heading.positive, "the passage must not contain the query"
    assert {p.anchor for p in pairs if p.kind == "subheading" and p.source == "page2.md"} == {
        "Range search 2"
    }
    (title,) = [p for p in pairs if p.kind == "title" and p.source == "page1.md"]
    assert title.anchor == "Page 1" and title.positive.startswith("Milvus deals with two types of data")
    span = next(p for p in pairs if p.kind == "span")
    assert len(span.anchor.split()) >= 6 and span.anchor not in span.positive, "the sentence is cut out"


def test_a_long_section_pairs_its_heading_path_with_every_chunk() -> None:
    paragraphs = [
        f"Paragraph {n} says something about range search number {n}, at some length." for n in range(12)
    ]
    text = "# Guide\n\n## Range search\n\n" + "\n\n".join(paragraphs) + "\n"
    chunks = Chunker(token_counter(None), 60).chunks("guide.md", text, extra={"root": "/docs"})
    for chunk in chunks:
        chunk.id = f"guide-{chunk.metadata['chunk_index']}"
    assert len(chunks) >= 3, "the section must span several chunks for this test"
    pairs = mine_pairs(chunks, TuneConfig(min_holdout=0, holdout_share=0.0)).train  # the defaults
    assert {p.anchor for p in pairs} == {"Guide > Range search"}
    assert sorted(p.positive for p in pairs) == sorted(chunk_body(c) for c in chunks)
    assert [p.kind for p in pairs].count("heading") == 1
    without = mine_pairs(chunks, TuneConfig(min_holdout=0, holdout_share=0.0, kinds=("heading",))).train
    assert len(without) == 1, "without the kind only the section's first chunk is asked for"


def test_questions_count_three_times() -> None:
    pairs = mined()
    assert {p.kind for p in pairs} == {"heading", "question", "inline"}
    questions = [p for p in pairs if p.kind == "question" and p.source == "page2.md"]
    assert [p.anchor for p in questions] == ["Where does Milvus store data 2?"] * 3
    assert questions[0].positive.startswith("Milvus deals with two types of data")
    inline = [p for p in pairs if p.kind == "inline" and p.source == "page3.md"]
    assert [p.anchor for p in inline] == ["Can a range search return more than the limit?"] * 3
    assert "No, the limit still applies" in inline[0].positive
    assert len([p for p in mined(question_repeats=1) if p.kind == "question"]) == 4


def test_a_heading_that_many_pages_share_is_not_a_query_on_its_own() -> None:
    pairs = mined(kinds=EVERYTHING)
    assert not [p for p in pairs if p.kind == "subheading" and p.anchor == "Overview"]
    assert [p for p in pairs if p.kind == "heading" and p.anchor.endswith("> Overview")]


def test_held_out_sentences_are_never_training_queries() -> None:
    config = TuneConfig(kinds=EVERYTHING, min_holdout=3, seed=3)
    result = mine_pairs(corpus(), config)
    assert len(result.holdout) == 3
    for pair in result.holdout:
        assert pair.anchor in pair.positive and pair.headers
        assert not [p for p in result.train if p.anchor == pair.anchor]
    again = mine_pairs(corpus(), config)
    assert [p.anchor for p in again.holdout] == [p.anchor for p in result.holdout], "seeded"
    summary = result.summary()
    assert summary["holdout_pairs"] == 3 and sum(summary["pairs_by_kind"].values()) == len(result.train)


def test_generated_questions_pair_with_their_chunk() -> None:
    chunks = corpus()
    target = chunks[0]
    result = mine_pairs(
        chunks, TuneConfig(min_holdout=0, holdout_share=0.0), {str(target.id): ["where is my data?"]}
    )
    generated = [p for p in result.train if p.kind == "generated"]
    assert [(p.anchor, p.positive) for p in generated] == [("where is my data?", chunk_body(target))]


def test_epochs_fill_the_target_passes_within_bounds() -> None:
    config = TuneConfig(target_passes=4000, min_epochs=1, max_epochs=6)
    assert config.epochs_for(2000) == 2.0
    assert config.epochs_for(100) == 6.0
    assert config.epochs_for(10000) == 1.0
    assert TuneConfig(epochs=0.5).epochs_for(100) == 0.5


def test_max_pairs_caps_the_training_pairs() -> None:
    assert len(mine_pairs(corpus(), TuneConfig(max_pairs=5)).train) == 5


def test_questions_are_parsed_one_per_line_without_numbers() -> None:
    reply = (
        "1. Where is data stored?\n- How much does it cost per month?\n\nok\n"
        "3) Can I run it on ARM servers?\n4. extra one here"
    )
    assert parse_questions(reply, limit=3) == [
        "Where is data stored?",
        "How much does it cost per month?",
        "Can I run it on ARM servers?",
    ]
