"""Answer latency while documents are ingested over HTTP, against idle.

    .venv/bin/python bench/upload.py [--idle 60] [--clients 1] [--corpus DIR] [--json]

`rag serve` runs as a child process over a temporary Milvus Lite file, with DeepSeek pointed
at the tests' OpenAI-compatible server (tests/llm_server.py, started as a process of its own:
this bench imports nothing from tests/), which answers at once, so the figures are the
service's own time. The FAQ pages are uploaded first, so that questions find passages. Then:

1. idle: `--idle` questions from shared/eval/dev.jsonl, POST /rag/invoke, `--clients` at a time;
2. during: the same questions, in a loop, while the 224 pages of milvus-docs are uploaded in
   one POST /documents and ingested; only answers that started after the upload was accepted
   and ended before its job finished count;
3. after: `--idle` questions again, over the larger collection.

It prints p50/p95/max of the answer latency in both phases, and the job's report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FAQ = SHARED / "corpus" / "milvus-faq"
DOCS = SHARED / "corpus" / "milvus-docs"
QUESTIONS = SHARED / "eval" / "dev.jsonl"
START_TIMEOUT_S = 180.0

# The upstream, in a process of its own: the tests' server, which answers at once.
UPSTREAM = """
import sys, threading
sys.path.insert(0, sys.argv[1])
from tests.llm_server import LLMServer
server = LLMServer()
print(server.url, server.api_key, flush=True)
sys.stdin.read()  # until the bench closes our stdin
server.close()
"""


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(latencies: list[float]) -> dict[str, Any]:
    ms = [s * 1000 for s in latencies]
    return {
        "answers": len(ms),
        "p50_ms": round(percentile(ms, 50), 1),
        "p95_ms": round(percentile(ms, 95), 1),
        "max_ms": round(max(ms), 1) if ms else float("nan"),
        "mean_ms": round(statistics.fmean(ms), 1) if ms else float("nan"),
    }


def load_questions() -> list[str]:
    rows = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]
    return [row["question"] for row in rows if row.get("question")]


def start_upstream() -> tuple[subprocess.Popen[str], str, str]:
    process = subprocess.Popen(
        [sys.executable, "-c", UPSTREAM, str(REPO)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    url, key = process.stdout.readline().split()
    return process, url, key


def start_server(folder: Path, upstream: str, key: str) -> tuple[subprocess.Popen[str], str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("DEEPSEEK_", "MILVUS_", "RAG_"))},
        "MILVUS_URI": str(folder / "milvus.db"),
        "RAG_COLLECTION": "bench_upload",
        "DEEPSEEK_BASE_URL": upstream,
        "DEEPSEEK_API_KEY": key,
        "DEEPSEEK_MAX_RETRIES": "0",
        "RAG_MAX_UPLOAD_MB": "200",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "serve", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    for line in process.stderr:
        if "Application startup complete" in line:
            break
        if time.monotonic() > deadline:
            break
    else:
        raise SystemExit("rag serve did not start")
    # Keep reading its stderr, or a full pipe would stall it.
    threading.Thread(target=lambda: [None for _ in process.stderr or []], daemon=True).start()
    return process, f"http://127.0.0.1:{port}"


def upload(client: httpx.Client, folder: Path) -> str:
    files = [
        ("files", (path.relative_to(folder).as_posix(), path.read_bytes(), "text/markdown"))
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    ]
    response = client.post("/documents", files=files)
    response.raise_for_status()
    return str(response.json()["job_id"])


def wait_for(client: httpx.Client, job_id: str) -> dict[str, Any]:
    while True:
        job: dict[str, Any] = client.get(f"/jobs/{job_id}", params={"wait": 60}).json()
        if job["state"] not in ("queued", "running"):
            return job


def ask(client: httpx.Client, question: str) -> tuple[float, float]:
    """(start, end) perf_counter times of one answer."""
    started = time.perf_counter()
    response = client.post("/rag/invoke", json={"input": {"question": question}})
    response.raise_for_status()
    assert response.json()["output"]["answer"], response.text
    return started, time.perf_counter()


def run(idle: int, clients: int, corpus: Path) -> dict[str, Any]:
    questions = load_questions()
    upstream, upstream_url, key = start_upstream()
    with tempfile.TemporaryDirectory(prefix="bench-upload-") as tmp:
        server, url = start_server(Path(tmp), upstream_url, key)
        try:
            with httpx.Client(base_url=url, timeout=600) as client:
                faq = wait_for(client, upload(client, FAQ))
                assert faq["state"] == "done", faq
                for question in questions[:5]:  # warm up
                    ask(client, question)

                with ThreadPoolExecutor(clients) as pool:
                    idle_times = list(
                        pool.map(lambda n: ask(client, questions[n % len(questions)]), range(idle))
                    )

                accepted = time.perf_counter()
                job_id = upload(client, corpus)
                upload_s = time.perf_counter() - accepted
                finished: list[float] = []
                report: dict[str, Any] = {}

                def follow() -> None:
                    report.update(wait_for(client, job_id))
                    finished.append(time.perf_counter())

                follower = threading.Thread(target=follow)
                follower.start()
                during: list[tuple[float, float]] = []
                lock = threading.Lock()

                def keep_asking(offset: int) -> None:
                    n = offset
                    while not finished:
                        times = ask(client, questions[n % len(questions)])
                        with lock:
                            during.append(times)
                        n += clients

                with ThreadPoolExecutor(clients) as pool:
                    list(pool.map(keep_asking, range(clients)))
                follower.join()

                with ThreadPoolExecutor(clients) as pool:
                    after_times = list(
                        pool.map(lambda n: ask(client, questions[n % len(questions)]), range(idle))
                    )
        finally:
            server.terminate()
            server.wait(timeout=60)
    assert upstream.stdin is not None
    upstream.stdin.close()
    upstream.wait(timeout=30)
    done_at = finished[0]
    counted = [end - start for start, end in during if start >= accepted and end <= done_at]
    return {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.2f} at the end",
        "clients": clients,
        "idle": summary([end - start for start, end in idle_times]),
        "during_upload": summary(counted),
        "after": summary([end - start for start, end in after_times]),
        "upload_request_s": round(upload_s, 1),
        "ingest_s": round(done_at - accepted, 1),
        "job": {
            k: report.get(k)
            for k in ("state", "files_done", "files_total", "added", "updated", "unchanged", "total_chunks")
        }
        | {"skipped": len(report.get("skipped") or [])},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--idle", type=int, default=60, help="questions asked while idle")
    parser.add_argument("--clients", type=int, default=1, help="questions in flight at once")
    parser.add_argument("--corpus", type=Path, default=DOCS, help="the folder uploaded")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.idle, args.clients, args.corpus)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['date']}, {result['machine']}; {result['clients']} client(s)")
    print("| phase | answers | p50 ms | p95 ms | max ms |")
    print("|---|---:|---:|---:|---:|")
    for phase in ("idle", "during_upload", "after"):
        s = result[phase]
        print(f"| {phase} | {s['answers']} | {s['p50_ms']} | {s['p95_ms']} | {s['max_ms']} |")
    print(f"upload request {result['upload_request_s']} s; accepted to done {result['ingest_s']} s")
    print(f"job {result['job']}")


if __name__ == "__main__":
    main()
