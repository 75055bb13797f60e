"""The FAQ in each format: read speed per page, ingest time, and retrieval quality against markdown.

    .venv/bin/python bench/formats.py [--repeat 3]

For markdown (`shared/corpus/milvus-faq`) and each rendering in `shared/corpus/milvus-faq-formats`:

- read + split: DocumentSourceLoader and the chunker in this process, median of `--repeat`
  runs, per printed page (the PDF rendering's page count stands for every format: the
  content is the same). PDF and DOCX are read in the worker process; its start is timed apart.
- ingest: `rag ingest DIR --json` in a child process, into a collection of its own.
- quality: `rag eval shared/eval/dev.jsonl --json` on that collection (hit@k, MRR; the
  eval matches sources by file stem, so `product_faq.pdf` answers for `product_faq.md`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

FORMATS = {
    "markdown": SHARED / "corpus" / "milvus-faq",
    "html": SHARED / "corpus" / "milvus-faq-formats" / "html",
    "docx": SHARED / "corpus" / "milvus-faq-formats" / "docx",
    "pdf": SHARED / "corpus" / "milvus-faq-formats" / "pdf",
}


def rag(args: list[str], env: dict[str, str]) -> tuple[dict, float]:
    """(the JSON output, wall seconds) of one `rag` process."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "cli", *args, "--json"], cwd=REPO, env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(f"rag {' '.join(args)} failed: {result.stderr}")
    return json.loads(result.stdout), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--eval", type=Path, default=SHARED / "eval" / "dev.jsonl")
    args = parser.parse_args()

    from loaders.formats import Limits
    from loaders.isolation import _Worker
    from loaders.markdown import Chunker, token_counter
    from loaders.sources import DocumentSourceLoader
    from store.embeddings import load_tokenizer, packaged_minilm_path

    chunker = Chunker(token_counter(load_tokenizer(packaged_minilm_path())))
    pdf_loader = DocumentSourceLoader([str(FORMATS["pdf"])])
    pages = sum(int(d.metadata["pages"]) for d in pdf_loader.load())

    started = time.perf_counter()
    _Worker(Limits().memory_bytes).stop()
    worker_start = time.perf_counter() - started

    read: dict[str, float] = {}
    chunks: dict[str, int] = {}
    for kind, folder in FORMATS.items():
        timings = []
        for _ in range(args.repeat):
            loader = DocumentSourceLoader([str(folder)])
            started = time.perf_counter()
            documents = loader.load()  # the worker starts at the first PDF or DOCX file
            split = [c for d in documents for c in chunker.split_document(d)]
            timings.append(time.perf_counter() - started)
            assert not loader.skipped, loader.skipped
        read[kind] = statistics.median(timings)
        chunks[kind] = len(split)

    ingest: dict[str, dict] = {}
    wall: dict[str, float] = {}
    quality: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MILVUS_", "RAG_", "DEEPSEEK_"))}
        for kind, folder in FORMATS.items():
            env = {**base, "MILVUS_URI": str(Path(scratch) / f"{kind}.db"), "RAG_COLLECTION": f"faq_{kind}"}
            ingest[kind], wall[kind] = rag(["ingest", str(folder)], env)
            quality[kind] = rag(["eval", str(args.eval), "--mode", "hybrid"], env)[0]["hybrid"]

    print(f"## Formats: the FAQ (4 pages, {pages} printed pages)\n")
    print(f"Worker process start (once per ingest with PDF or DOCX files): {worker_start:.2f} s\n")
    print(
        "| format | chunks | read + split, all 4 files | per printed page | "
        "`rag ingest` in-process | whole process |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for kind in FORMATS:
        print(
            f"| {kind} | {chunks[kind]} | {read[kind] * 1000:.0f} ms | {read[kind] / pages * 1000:.0f} ms "
            f"| {ingest[kind]['seconds']:.1f} s | {wall[kind]:.1f} s |"
        )
    print()
    print("| format | hit@1 | hit@3 | hit@5 | mrr@10 | hit@3 vs markdown |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, metrics in quality.items():
        delta = metrics["hit@3"] - quality["markdown"]["hit@3"]
        print(
            f"| {kind} | {metrics['hit@1']:.3f} | {metrics['hit@3']:.3f} | {metrics['hit@5']:.3f} "
            f"| {metrics['mrr@10']:.3f} | {delta:+.3f} |"
        )
    for kind, metrics in quality.items():
        if metrics["missed@3"]:
            print(f"\n{kind}: not in top 3: {', '.join(metrics['missed@3'])}", end="")
    print()


if __name__ == "__main__":
    main()
