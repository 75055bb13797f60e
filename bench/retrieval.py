"""Retrieval quality and latency on the shared corpora: the tutorial's naive pipeline against
this project's dense, sparse (BM25) and hybrid search. Prints markdown tables.

    .venv/bin/python bench/retrieval.py [--corpus faq|docs|both] [--eval FILE]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

CORPORA = {"faq": SHARED / "corpus" / "milvus-faq", "docs": SHARED / "corpus" / "milvus-docs"}


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def run(corpus: str, eval_file: Path, modes: list[str]) -> str:
    from chains.evaluation import NaivePipeline, evaluate, format_table, load_rows
    from chains.service import open_service
    from loaders.ingest import ingest
    from settings import Settings

    rows = load_rows(eval_file)
    path = CORPORA[corpus]
    assert path.is_dir(), f"corpus missing: {path}"
    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(_env_file=None, MILVUS_URI=str(Path(folder) / "bench.db"))
        service = open_service(settings, llm=None)
        started = time.perf_counter()
        report = ingest([str(path)], service.get_store(), service.chunker(), progress=False)
        ingest_s = time.perf_counter() - started
        results = {}
        naive = NaivePipeline(service.embeddings, str(Path(folder) / "naive.db"))
        started = time.perf_counter()
        naive.build([str(path)])
        naive_s = time.perf_counter() - started
        results[f"naive ({naive.chunks} chunks)"] = evaluate(naive.retrieve, rows)
        naive.close()
        for mode in modes:

            def retrieve(query: str, depth: int, mode: str = mode) -> list:
                return service.retriever.retrieve(query, k=depth, search=mode)  # type: ignore[arg-type]

            evaluate(retrieve, rows[:3])  # warm the caches before timing
            results[f"{mode} ({report.total_chunks} chunks)"] = evaluate(retrieve, rows)
        service.close()
    header = (
        f"### {path.name} ({report.files} files)\n\n"
        f"Ingest: {report.total_chunks} chunks in {ingest_s:.1f} s (naive baseline: {naive_s:.1f} s).\n\n"
    )
    return header + format_table(results) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", choices=["faq", "docs", "both"], default="both")
    parser.add_argument("--eval", type=Path, default=SHARED / "eval" / "dev.jsonl")
    parser.add_argument("--modes", nargs="+", default=["dense", "sparse", "hybrid"])
    args = parser.parse_args()
    corpora = ["faq", "docs"] if args.corpus == "both" else [args.corpus]
    print(f"## Retrieval ({date.today()}, {machine()}, eval: {args.eval.name})\n")
    for corpus in corpora:
        print(run(corpus, args.eval, args.modes), flush=True)


if __name__ == "__main__":
    main()
