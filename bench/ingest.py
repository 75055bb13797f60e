"""Ingest speed, re-ingest speed, search latency and memory on the shared corpus.

    .venv/bin/python bench/ingest.py [--corpus PATH] [--queries FILE]

Each measured ingest runs in a child process (`rag ingest --json`) so that its peak RSS and
whether it loaded the embedding model can be read; the model's own throughput is measured
here on the same chunks.
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))


def child_ingest(corpus: Path, env: dict[str, str]) -> tuple[dict, float, float]:
    """(report, wall seconds, peak RSS MiB) of one `rag ingest` process."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "cli", "ingest", str(corpus), "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - started
    report = json.loads(result.stdout)
    return report, wall, report["peak_rss_mb"]


def compare_indexes(store: object, queries: list[list[float]], path: Path) -> list[str]:
    """FLAT against HNSW and IVF_FLAT on the stored chunk vectors: recall@10 and latency."""
    from pymilvus import DataType, MilvusClient

    from store.milvus import DENSE_FIELD, PRIMARY_FIELD

    source = store.client  # type: ignore[attr-defined]
    rows: list[dict[str, Any]] = []
    iterator = source.query_iterator(
        store.collection,  # type: ignore[attr-defined]
        batch_size=1000,
        filter="",
        output_fields=[PRIMARY_FIELD, DENSE_FIELD],
    )
    while batch := iterator.next():
        rows.extend({"pk": r[PRIMARY_FIELD], "v": r[DENSE_FIELD]} for r in batch)
    iterator.close()
    client = MilvusClient(str(path))
    results: dict[str, list[list[str]]] = {}
    report = []
    for index, params, search in (
        ("FLAT", {}, {}),
        ("HNSW", {"M": 16, "efConstruction": 200}, {"ef": 128}),
        ("IVF_FLAT", {"nlist": 64}, {"nprobe": 16}),
    ):
        name = f"bench_{index.lower()}"
        schema = client.create_schema(auto_id=False)
        schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("v", DataType.FLOAT_VECTOR, dim=len(rows[0]["v"]))
        index_params = client.prepare_index_params()
        index_params.add_index("v", index_type=index, metric_type="IP", params=params)
        client.create_collection(name, schema=schema, index_params=index_params, consistency_level="Strong")
        started = time.perf_counter()
        for i in range(0, len(rows), 1000):
            client.insert(name, rows[i : i + 1000])
        client.flush(name)
        build_s = time.perf_counter() - started
        timings, found = [], []
        for q in queries:
            t = time.perf_counter()
            hits = client.search(
                name,
                data=[q],
                anns_field="v",
                limit=10,
                search_params={"metric_type": "IP", "params": search},
            )[0]
            timings.append((time.perf_counter() - t) * 1000)
            found.append([h["pk"] for h in hits])
        results[index] = found
        exact = results["FLAT"]
        recall = statistics.mean(len(set(a) & set(b)) / 10 for a, b in zip(found, exact, strict=True))
        report.append(
            f"| {index} on {len(rows)} vectors: build {build_s:.1f} s, search p50 "
            f"{statistics.median(timings):.1f} ms, recall@10 vs FLAT | {recall:.3f} |"
        )
    client.close()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", type=Path, default=SHARED / "corpus" / "milvus-docs")
    parser.add_argument("--queries", type=Path, default=SHARED / "eval" / "dev.jsonl")
    args = parser.parse_args()
    assert args.corpus.is_dir(), f"corpus missing: {args.corpus}"

    from chains.evaluation import load_rows, percentile
    from loaders.sources import DocumentSourceLoader
    from service import open_service
    from settings import Settings

    with tempfile.TemporaryDirectory() as folder:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("MILVUS_", "RAG_"))},
            "MILVUS_URI": str(Path(folder) / "bench.db"),
        }
        settings = Settings(_env_file=None, MILVUS_URI=env["MILVUS_URI"])

        # 1. First ingest, end to end, in a child process.
        first, first_wall, first_rss = child_ingest(args.corpus, env)
        # 2. The same corpus again: nothing changed.
        again, again_wall, again_rss = child_ingest(args.corpus, env)

        # 3. The model alone on the same chunks (loading excluded).
        service = open_service(settings, llm=None)
        chunker = service.chunker()
        started = time.perf_counter()
        texts = [
            chunk.page_content
            for doc in DocumentSourceLoader([str(args.corpus)]).lazy_load()
            for chunk in chunker.split_document(doc)
        ]
        split_s = time.perf_counter() - started
        service.embeddings.embed_query("load the model")
        started = time.perf_counter()
        batch = settings.embedding_batch_size
        for i in range(0, len(texts), batch):
            service.embeddings.embed_documents(texts[i : i + batch])
        model_s = time.perf_counter() - started

        # 4. Search latency over the whole corpus, including the query embedding.
        questions = [r.question for r in load_rows(args.queries)]
        latencies: dict[str, list[float]] = {}
        for mode in ("dense", "sparse", "hybrid"):
            service.retriever.retrieve(questions[0], search=mode)  # type: ignore[arg-type]
            timings = []
            for q in questions:
                t = time.perf_counter()
                service.retriever.retrieve(q, k=10, search=mode)  # type: ignore[arg-type]
                timings.append((time.perf_counter() - t) * 1000)
            latencies[mode] = timings
        started = time.perf_counter()
        query_vectors = [service.embeddings.embed_query(q) for q in questions]
        embed_ms = (time.perf_counter() - started) * 1000 / len(questions)
        index_rows = compare_indexes(service.get_store(), query_vectors, Path(folder) / "index.db")
        service.close()

    chunks = first["added"]
    model_rate = len(texts) / model_s
    e2e_rate = chunks / first["seconds"]
    print(f"## Ingest ({args.corpus.name}: {first['files']} files, {chunks} chunks)\n")
    print("| measure | value |\n|---|---:|")
    print(f"| read + split (no embedding) | {split_s:.1f} s |")
    print(f"| model alone on the same chunks | {model_s:.1f} s = {model_rate:.1f} chunks/s |")
    print(f"| first ingest (in-process time) | {first['seconds']:.1f} s = {e2e_rate:.1f} chunks/s |")
    print(f"| end to end / model throughput | {e2e_rate / model_rate:.2f} |")
    print(f"| first ingest, whole process (imports, model load) | {first_wall:.1f} s |")
    print(
        "| re-ingest unchanged (in-process / whole process) | "
        f"{again['seconds']:.2f} s / {again_wall:.1f} s |"
    )
    print(f"| re-ingest speed-up (in-process) | {first['seconds'] / max(again['seconds'], 1e-3):.0f}x |")
    print(f"| re-ingest added / unchanged | {again['added']} / {again['unchanged']} |")
    print(f"| peak RSS first ingest / re-ingest | {first_rss:.0f} MiB / {again_rss:.0f} MiB |")
    print(f"| query embedding alone (mean) | {embed_ms:.1f} ms |")
    for row in index_rows:
        print(row)
    for mode, timings in latencies.items():
        print(
            f"| search {mode}, k=10, p50 / p95 | "
            f"{statistics.median(timings):.1f} / {percentile(timings, 0.95):.1f} ms |"
        )


if __name__ == "__main__":
    main()
