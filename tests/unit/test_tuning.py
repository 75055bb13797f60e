"""Pair mining for `rag tune`, and the questions doc2query parses: no model, no Milvus."""

from __future__ import annotations

from langchain_core.documents import Document

from chains.doc2query import parse_questions
from loaders.markdown import Chunker, token_counter
from store.tuning import TuneConfig, chunk_body, mine_pairs

PAGE = """# Page {n}

## Where does Milvus store data {n}?

Milvus deals with two types of data, inserted data and metadata. Inserted data are stored in
object storage such as MinIO. Metadata are kept in etcd.

## How much does Milvus cost {n}?

Milvus is a 100% free open-source project. Zilliz Cloud is the fully managed version.

## Overview

A generic heading that many pages share. It appears on several pages of this corpus.
"""


def chunks_of(pages: dict[str, str]) -> list[Document]:
    chunker = Chunker(token_counter(None), 240)
    documents = []
    for source, text in pages.items():
        for chunk in chunker.chunks(source, text, extra={"root": "/docs"}):
            chunk.id = f"{source}-{chunk.metadata['chunk_index']}"
            documents.append(chunk)
    return documents


def corpus() -> list[Document]:
    pages = {f"page{n}.md": PAGE.format(n=n) for n in range(4)}
    return chunks_of(pages)


def test_the_body_is_the_chunk_without_its_heading_path() -> None:
    chunk = corpus()[0]
    assert chunk.page_content.startswith("Page 0 > Where does Milvus store data 0?\n\n")
    assert chunk_body(chunk).startswith("Milvus deals with two types of data")


def test_each_kind_pairs_a_query_like_text_with_its_own_section() -> None:
    mined = mine_pairs(corpus(), TuneConfig(holdout_share=0.0))
    pairs = mined.train
    assert {p.kind for p in pairs} == {"heading", "question", "title", "span"}
    heading = next(
        p for p in pairs if p.kind == "heading" and p.anchor == "Page 2 > How much does Milvus cost 2?"
    )
    assert heading.positive.startswith("Milvus is a 100% free open-source project")
    assert "cost" not in heading.positive, "the passage must not contain the query"
    questions = {p.anchor for p in pairs if p.kind == "question" and p.source == "page2.md"}
    assert questions == {"Where does Milvus store data 2?", "How much does Milvus cost 2?"}
    (title,) = [p for p in pairs if p.kind == "title" and p.source == "page1.md"]
    assert title.anchor == "Page 1" and title.positive.startswith("Milvus deals with two types of data")
    span = next(p for p in pairs if p.kind == "span")
    assert span.anchor in span.positive and len(span.anchor.split()) >= 6


def test_a_heading_that_many_pages_share_is_not_a_question_on_its_own() -> None:
    pairs = mine_pairs(corpus(), TuneConfig(holdout_share=0.0)).train
    assert not [p for p in pairs if p.kind == "question" and p.anchor == "Overview"]
    assert [p for p in pairs if p.kind == "heading" and p.anchor.endswith("> Overview")]


def test_held_out_sections_give_no_training_pair() -> None:
    mined = mine_pairs(corpus(), TuneConfig(holdout_share=0.25, seed=3))
    held = {(p.source, p.headers) for p in mined.holdout}
    assert mined.holdout and len(held) == mined.holdout_sections
    assert not [p for p in mined.train if (p.source, p.headers) in held]
    again = mine_pairs(corpus(), TuneConfig(holdout_share=0.25, seed=3))
    assert [p.anchor for p in again.holdout] == [p.anchor for p in mined.holdout], "seeded"
    summary = mined.summary()
    assert summary["train_pairs"] == len(mined.train) and sum(summary["pairs_by_kind"].values()) == len(
        mined.train
    )


def test_generated_questions_pair_with_their_chunk() -> None:
    chunks = corpus()
    target = chunks[0]
    mined = mine_pairs(chunks, TuneConfig(holdout_share=0.0), {str(target.id): ["where is my data kept?"]})
    generated = [p for p in mined.train if p.kind == "generated"]
    assert [(p.anchor, p.positive) for p in generated] == [("where is my data kept?", target.page_content)]


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
