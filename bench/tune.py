"""`rag tune` before and after, per corpus: retrieval quality (dev.jsonl, the questions written
for this benchmark, pseudo-questions drawn from the reference pages), search latency per mode,
and the tune's own time, peak memory and re-embedding speed. Prints markdown tables.

    .venv/bin/python bench/tune.py [--corpus faq|docs|both] [--pseudo 800]

Each corpus is ingested into a fresh Milvus Lite file; `rag tune --json` then runs as a child
process (its peak RSS is the child's), and the same questions are asked again.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))  # the project; bench/ itself is sys.path[0]

from retrieval import CORPORA, machine, pseudo_questions, section_hits  # noqa: E402

WRITTEN = REPO / "bench" / "questions-written.jsonl"
MODES = ["dense", "hybrid"]


def measure(settings: Any, question_sets: dict[str, Any], pseudo: int) -> dict[str, dict[str, Any]]:
    """Quality and latency per search mode over the collection serving settings.collection."""
    from chains.evaluation import evaluate
    from service import open_service

    service = open_service(settings, llm=None)
    results: dict[str, dict[str, Any]] = {}
    try:
        store = service.get_store()
        sample = pseudo_questions(store, pseudo) if pseudo else []
        # Pseudo-questions from pages without question-style headings only: the reference pages.
        sample = [q for q in sample if not any(h.rstrip().endswith("?") for h in q[1][1])]
        for mode in MODES:

            def retrieve(query: str, depth: int, mode: str = mode) -> list:
                return service.retriever.retrieve(query, k=depth, search=mode)  # type: ignore[arg-type]

            evaluate(retrieve, next(iter(question_sets.values()))[:3])  # warm up
            row: dict[str, Any] = {"model": store.embeddings.name, "collection": store.collection}
            latencies: list[float] = []
            for name, rows in question_sets.items():
                metrics = evaluate(retrieve, rows)
                row[name] = metrics
                latencies.append(metrics["p50_ms"])
            if sample:
                row["pseudo"] = section_hits(retrieve, sample)
                row["pseudo_n"] = len(sample)
            row["p50_ms"] = statistics.median(latencies)
            results[mode] = row
    finally:
        service.close()
    return results


def run_tune(env: dict[str, str], eval_file: Path) -> tuple[dict[str, Any], float, float]:
    """`rag tune --json` as a child process: its report, wall seconds and peak RSS (MiB)."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "cli", "tune", "--json", "--eval", str(eval_file)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"rag tune failed: {result.stderr[-2000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return json.loads(result.stdout), wall, peak


def run(corpus: str, eval_file: Path, pseudo: int) -> str:
    from chains.evaluation import load_rows
    from service import open_service
    from settings import Settings
    from store.indexing import ingest

    path = CORPORA[corpus]
    # The written questions about pages this corpus lacks can't be answered from it.
    files = {p.name for p in path.rglob("*") if p.is_file()}
    sets = {"dev": load_rows(eval_file), "written": [r for r in load_rows(WRITTEN) if r.source in files]}
    with tempfile.TemporaryDirectory() as folder:
        values: dict[str, Any] = {
            "MILVUS_URI": str(Path(folder) / "bench.db"),
            "RAG_CACHE_DIR": str(Path(folder) / "cache"),
        }
        settings = Settings(_env_file=None, **values)
        service = open_service(settings, llm=None)
        started = time.perf_counter()
        report = ingest([str(path)], service.get_store(), service.chunker(), progress=False)
        ingest_s = time.perf_counter() - started
        service.close()
        before = measure(settings, sets, pseudo)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DEEPSEEK_", "MILVUS_", "RAG_"))}
        tuned, wall, peak = run_tune({**env, **values}, eval_file)
        after = measure(settings, sets, pseudo)
    load = os.getloadavg()
    lines = [
        f"### {path.name} ({report.files} files, {report.total_chunks} chunks)",
        "",
        f"`rag tune`: {wall:.0f} s in all ({_seconds(tuned['seconds'])}), peak RSS {peak:.0f} MiB; "
        f"{tuned['data']['train_pairs']} training pairs ({_kinds(tuned['data'])}), "
        f"{tuned['data']['holdout_pairs']} held out; "
        f"switched: {tuned['switched']} ({tuned['reason']}). Load average after: {load[0]:.1f}.",
        f"Re-embedding {report.total_chunks} chunks: {tuned['seconds']['re-embedding']:.0f} s "
        f"({report.total_chunks / tuned['seconds']['re-embedding']:.1f} chunks/s) against the first "
        f"ingest's {ingest_s:.0f} s ({report.total_chunks / ingest_s:.1f} chunks/s).",
        "",
        f"| mode, model | dev ({_scored(sets['dev'])}) hit@1 / hit@3 / MRR "
        f"| written ({_scored(sets['written'])}) hit@1 / hit@3 / MRR "
        "| pseudo hit@1 / hit@3 / hit@10 | p50 |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, results in (("base", before), ("tuned", after)):
        for mode, row in results.items():
            pseudo_cell = "/".join(f"{v:.3f}" for v in row["pseudo"].values()) if "pseudo" in row else "–"
            lines.append(
                f"| {mode}, {label} | {_triple(row['dev'])} | {_triple(row['written'])} | {pseudo_cell} "
                f"| {row['p50_ms']:.1f} ms |"
            )
    if "pseudo_n" in after.get("dense", {}):
        count = after["dense"]["pseudo_n"]
        lines += ["", f"Pseudo-questions: {count} spans from sections without question headings."]
    lines += ["", "As `rag tune` measured it (default search mode):", "", _held_out(tuned)]
    return "\n".join(lines) + "\n"


def _scored(rows: list[Any]) -> int:
    return sum(1 for r in rows if r.source and r.heading)


def _triple(metrics: dict[str, Any]) -> str:
    return f"{metrics['hit@1']:.3f} / {metrics['hit@3']:.3f} / {metrics['mrr@10']:.3f}"


def _seconds(seconds: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items() if k != "total")


def _kinds(data: dict[str, Any]) -> str:
    return ", ".join(f"{n} {k}" for k, n in data["pairs_by_kind"].items())


def _held_out(tuned: dict[str, Any]) -> str:
    lines = ["| questions | hit@1 | hit@3 | mrr@10 |", "|---|---:|---:|---:|"]
    for name, before in tuned["before"].items():
        after = tuned["after"][name]
        cells = [f"{before[m]:.3f} → {after[m]:.3f}" for m in ("hit@1", "hit@3", "mrr@10")]
        lines.append(f"| {name} ({before['questions']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", choices=["faq", "docs", "both"], default="both")
    parser.add_argument("--eval", type=Path, default=SHARED / "eval" / "dev.jsonl")
    parser.add_argument("--pseudo", type=int, default=800, help="pseudo-questions drawn from the chunks")
    args = parser.parse_args()
    print(f"## rag tune ({date.today()}, {machine()}, load average {os.getloadavg()[0]:.1f} at the start)\n")
    for corpus in ["faq", "docs"] if args.corpus == "both" else [args.corpus]:
        print(run(corpus, args.eval, args.pseudo if corpus == "docs" else 0), flush=True)


if __name__ == "__main__":
    main()
