"""Retrieval quality and latency on the shared corpora: the tutorial's naive pipeline against
this project's dense, sparse (BM25) and hybrid search. Prints markdown tables.

    .venv/bin/python bench/retrieval.py [--corpus faq|docs|both] [--eval FILE]
    .venv/bin/python bench/retrieval.py --corpus docs --skip-naive --modes dense hybrid \
        --query-encoders onnx-int8 onnx --pseudo 800      # question encoders compared

`--query-encoders` scores each mode once per question encoder (RAG_QUERY_ENCODER), over the
same ingested chunks. `--pseudo N` adds a larger, rougher sample than dev.jsonl's questions:
N spans of 12 words drawn at random (seeded) from the stored chunks, each scored by whether
its own section comes back (section hit@1/3/10).
"""

from __future__ import annotations

import argparse
import platform
import random
import re
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

CORPORA = {"faq": SHARED / "corpus" / "milvus-faq", "docs": SHARED / "corpus" / "milvus-docs"}


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def pseudo_questions(store: Any, count: int, seed: int = 1) -> list[tuple[str, tuple[str, tuple[str, ...]]]]:
    """`count` spans of 12 words from random stored chunks, each with its (source, headers)."""
    rows: list[dict[str, Any]] = []
    iterator = store.client.query_iterator(
        store.collection, batch_size=1000, filter="", output_fields=["text", "source", "headers"]
    )
    while batch := iterator.next():
        rows.extend(batch)
    iterator.close()
    generator = random.Random(seed)
    generator.shuffle(rows)
    questions = []
    for row in rows:
        words = re.sub(r"[#*`>|\[\]()]", " ", row["text"]).split()
        if len(words) >= 40:
            start = generator.randint(5, len(words) - 15)
            questions.append(
                (" ".join(words[start : start + 12]), (row["source"], tuple(row["headers"] or [])))
            )
        if len(questions) == count:
            break
    return questions


def section_hits(retrieve: Any, questions: list[tuple[str, Any]]) -> dict[str, float]:
    """Share of pseudo-questions whose own section is in the top 1, 3 and 10."""
    ranks = []
    for question, section in questions:
        found = [(d.metadata["source"], tuple(d.metadata["headers"])) for d in retrieve(question, 10)]
        ranks.append(found.index(section) if section in found else len(found) + 1)
    return {f"hit@{k}": round(sum(r < k for r in ranks) / len(ranks), 4) for k in (1, 3, 10)}


def run(
    corpus: str, eval_file: Path, modes: list[str], encoders: list[str], pseudo: int, skip_naive: bool
) -> str:
    from chains.evaluation import evaluate, format_table, load_rows
    from service import open_service
    from settings import Settings
    from store.baseline import NaivePipeline
    from store.embeddings import make_embeddings
    from store.indexing import ingest

    rows = load_rows(eval_file)
    path = CORPORA[corpus]
    assert path.is_dir(), f"corpus missing: {path}"
    pseudo_rows: list[str] = []
    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(_env_file=None, MILVUS_URI=str(Path(folder) / "bench.db"))
        service = open_service(settings, llm=None)
        store = service.get_store()
        started = time.perf_counter()
        report = ingest([str(path)], store, service.chunker(), progress=False)
        ingest_s = time.perf_counter() - started
        results = {}
        naive_s = None
        if not skip_naive:
            naive = NaivePipeline(service.embeddings, str(Path(folder) / "naive.db"))
            started = time.perf_counter()
            naive.build([str(path)])
            naive_s = time.perf_counter() - started
            results[f"naive ({naive.chunks} chunks)"] = evaluate(naive.retrieve, rows)
            naive.close()
        sample = pseudo_questions(store, pseudo) if pseudo else []
        default_encoder = store.embeddings
        for encoder in encoders or [settings.query_encoder]:
            # The same stored chunks, questions embedded another way.
            store.embeddings = make_embeddings(settings.model_copy(update={"query_encoder": encoder}))
            label = f", {encoder}" if encoders else ""
            for mode in modes:

                def retrieve(query: str, depth: int, mode: str = mode) -> list:
                    return service.retriever.retrieve(query, k=depth, search=mode)  # type: ignore[arg-type]

                evaluate(retrieve, rows[:3])  # warm the caches before timing
                results[f"{mode}{label} ({report.total_chunks} chunks)"] = evaluate(retrieve, rows)
                if sample:
                    hits = section_hits(retrieve, sample)
                    pseudo_rows.append(
                        f"| {mode}{label} | " + " | ".join(f"{v:.3f}" for v in hits.values()) + " |"
                    )
            store.embeddings.close()
        store.embeddings = default_encoder
        service.close()
    naive_note = f" (naive baseline: {naive_s:.1f} s)" if naive_s is not None else ""
    header = (
        f"### {path.name} ({report.files} files)\n\n"
        f"Ingest: {report.total_chunks} chunks in {ingest_s:.1f} s{naive_note}.\n\n"
    )
    table = header + format_table(results) + "\n"
    if pseudo_rows:
        table += (
            f"\n{len(sample)} pseudo-questions (12-word spans of stored chunks), their own section found:\n\n"
            "| pipeline | hit@1 | hit@3 | hit@10 |\n|---|---:|---:|---:|\n" + "\n".join(pseudo_rows) + "\n"
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", choices=["faq", "docs", "both"], default="both")
    parser.add_argument("--eval", type=Path, default=SHARED / "eval" / "dev.jsonl")
    parser.add_argument("--modes", nargs="+", default=["dense", "sparse", "hybrid"])
    parser.add_argument(
        "--query-encoders",
        nargs="+",
        default=[],
        choices=["onnx-int8", "onnx", "torch"],
        help="score each mode once per question encoder (default: RAG_QUERY_ENCODER only)",
    )
    parser.add_argument("--pseudo", type=int, default=0, help="pseudo-questions drawn from the chunks")
    parser.add_argument("--skip-naive", action="store_true", help="leave out the tutorial's pipeline")
    args = parser.parse_args()
    corpora = ["faq", "docs"] if args.corpus == "both" else [args.corpus]
    print(f"## Retrieval ({date.today()}, {machine()}, eval: {args.eval.name})\n")
    for corpus in corpora:
        print(
            run(corpus, args.eval, args.modes, args.query_encoders, args.pseudo, args.skip_naive), flush=True
        )


if __name__ == "__main__":
    main()
