"""Retrieval metrics: hits, ranks and the summary figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from langchain_core.documents import Document

from chains.evaluation import EvalRow, evaluate, first_hit_rank, format_table, is_hit, load_rows, percentile
from errors import InputError

ROW = EvalRow(
    id="q1", question="where is data?", source="product_faq.md", heading="Where does `Milvus` store data?"
)


def doc(source: str, *headers: str) -> Document:
    return Document(page_content="x", metadata={"source": source, "headers": list(headers)})


def test_hit_needs_the_file_name_and_the_heading() -> None:
    assert is_hit(doc("faq/product_faq.md", "Product FAQ", "Where does Milvus store data?"), ROW)
    assert not is_hit(doc("faq/other.md", "Product FAQ", "Where does Milvus store data?"), ROW)
    assert not is_hit(doc("faq/product_faq.md", "Product FAQ", "Why is there no vector data in etcd?"), ROW)
    assert not is_hit(doc("faq/product_faq.md"), EvalRow("q", "x", None, None))


def test_metrics_follow_the_rank_of_the_first_hit() -> None:
    good = doc("product_faq.md", "Where does Milvus store data?")
    bad = doc("product_faq.md", "Something else")
    rankings = {"a": [good, bad], "b": [bad, bad, good], "c": [bad] * 10}
    rows = [EvalRow(q, q, ROW.source, ROW.heading) for q in rankings]
    metrics = evaluate(lambda q, k: rankings[q][:k], rows)
    assert metrics["questions"] == 3
    assert metrics["hit@1"] == pytest.approx(1 / 3)
    assert metrics["hit@3"] == pytest.approx(2 / 3)
    assert metrics["mrr@10"] == pytest.approx((1 + 1 / 3) / 3)
    assert metrics["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4)) / 3)
    assert metrics["missed@3"] == ["c"]
    assert first_hit_rank(rankings["b"], rows[1]) == 3
    assert "| x | 0.333 |" in format_table({"x": metrics})


def test_rows_without_a_source_are_not_scored(tmp_path: Path) -> None:
    file = tmp_path / "e.jsonl"
    file.write_text(
        json.dumps({"id": "1", "question": "q", "source": None, "heading": None})
        + "\n\n"
        + json.dumps({"id": "2", "question": "q", "source": "a.md", "heading": "H"})
        + "\n"
    )
    rows = load_rows(file)
    assert [r.id for r in rows] == ["1", "2"]
    assert evaluate(lambda q, k: [doc("a.md", "H")], rows)["questions"] == 1
    with pytest.raises(InputError):
        evaluate(lambda q, k: [], rows[:1])


def test_bad_files_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such evaluation file"):
        load_rows(tmp_path / "missing.jsonl")
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"question": "q"}\nnot json\n')
    with pytest.raises(InputError, match=":2:"):
        load_rows(broken)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.95) == 95.0
    assert percentile([], 0.5) == 0.0
