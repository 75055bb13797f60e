"""Retrieval evaluation on files shaped like shared/eval/dev.jsonl: hit@k, MRR, nDCG and latency."""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from langchain_core.documents import Document

from errors import InputError

Retrieve = Callable[[str, int], list[Document]]
EVAL_DEPTH = 10


@dataclass
class EvalRow:
    """One question and the FAQ section that answers it (None: nothing answers it)."""

    id: str
    question: str
    source: str | None
    heading: str | None


def load_rows(path: str | Path) -> list[EvalRow]:
    """Rows of a JSONL evaluation file; InputError says which line is wrong."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"no such evaluation file: {path}")
    rows = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            rows.append(
                EvalRow(
                    id=str(data.get("id", number)),
                    question=data["question"],
                    source=data.get("source"),
                    heading=data.get("heading"),
                )
            )
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputError(f"{path}:{number}: not an evaluation row ({exc})") from exc
    return rows


# Typographic quotes that converters put in (pandoc's smart quotes): "What’s" is "What's".
QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201b": "'", "\u201c": '"', "\u201d": '"'})


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[`*]", "", text.translate(QUOTES)).split()).casefold()


def same_document(source: str, wanted: str) -> bool:
    """Whether a chunk's source is the row's file, in any format: `faq.pdf` is `faq.md`."""
    return PurePosixPath(source).stem == PurePosixPath(wanted).stem


def is_hit(document: Document, row: EvalRow) -> bool:
    """The chunk comes from the row's file (by stem) and its headings include the row's heading."""
    if row.source is None or row.heading is None:
        return False
    if not same_document(str(document.metadata.get("source", "")), row.source):
        return False
    wanted = _norm(row.heading)
    return any(_norm(h) == wanted for h in document.metadata.get("headers") or [])


def first_hit_rank(documents: list[Document], row: EvalRow) -> int | None:
    """1-based rank of the first matching chunk, or None."""
    for rank, document in enumerate(documents, start=1):
        if is_hit(document, row):
            return rank
    return None


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of values, nearest-rank."""
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


def evaluate(retrieve: Retrieve, rows: Iterable[EvalRow], depth: int = EVAL_DEPTH) -> dict[str, Any]:
    """hit@1/3/5, MRR@10, nDCG@10 (one relevant section per question) and latency."""
    scored = [r for r in rows if r.source is not None and r.heading is not None]
    if not scored:
        raise InputError("the evaluation file has no rows with a source and a heading")
    ranks: list[int | None] = []
    latencies: list[float] = []
    misses: list[str] = []
    for row in scored:
        started = time.perf_counter()
        documents = retrieve(row.question, depth)
        latencies.append((time.perf_counter() - started) * 1000)
        rank = first_hit_rank(documents, row)
        ranks.append(rank)
        if rank is None or rank > 3:
            misses.append(row.id)
    n = len(scored)

    def hit_at(k: int) -> float:
        return sum(1 for r in ranks if r is not None and r <= k) / n

    return {
        "questions": n,
        "hit@1": hit_at(1),
        "hit@3": hit_at(3),
        "hit@5": hit_at(5),
        "mrr@10": sum(1 / r for r in ranks if r is not None and r <= depth) / n,
        "ndcg@10": sum(1 / math.log2(r + 1) for r in ranks if r is not None and r <= depth) / n,
        "p50_ms": statistics.median(latencies),
        "p95_ms": percentile(latencies, 0.95),
        "missed@3": misses,
    }


METRICS = ["hit@1", "hit@3", "hit@5", "mrr@10", "ndcg@10", "p50_ms", "p95_ms"]


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table, one row per pipeline."""
    lines = [
        "| pipeline | " + " | ".join(METRICS) + " |",
        "|---|" + "---:|" * len(METRICS),
    ]
    for name, metrics in results.items():
        cells = [f"{metrics[m]:.1f}" if m.endswith("_ms") else f"{metrics[m]:.3f}" for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
