"""What each knowledge base costs the server: start-up, routes, and the time a request spends
before its route runs.

    .venv/bin/python bench/knowledge_bases.py [--counts 0,10,50,100] [--requests 300] [--json]

For each count N, the app is built with RAG_KNOWLEDGE_BASES=kb0,...,kb{N-1} over a temporary
Milvus Lite file (nothing is opened: the store opens in the app's lifespan, which this bench
does not run), and GET .../rag/input_schema (a route that reads neither Milvus nor DeepSeek)
is sent through the whole ASGI app (every middleware, the key check included) for the default
knowledge base and for the last one, whose routes Starlette reaches last. It prints the
median and p95 per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


async def timed(app: Any, path: str, requests: int) -> list[float]:
    seconds = []
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
        for _ in range(20):  # warm up
            assert (await client.get(path, headers={"Authorization": "Bearer bench"})).status_code == 200
        for _ in range(requests):
            started = time.perf_counter()
            response = await client.get(path, headers={"Authorization": "Bearer bench"})
            seconds.append(time.perf_counter() - started)
            assert response.status_code == 200
    return seconds


def measure(count: int, requests: int, folder: Path) -> dict[str, Any]:
    from server import create_app
    from settings import Settings

    settings = Settings(
        _env_file=None,
        MILVUS_URI=str(folder / f"kb{count}.db"),
        RAG_KNOWLEDGE_BASES=",".join(f"kb{n}" for n in range(count)),
        RAG_API_KEYS="bench",
        DEEPSEEK_API_KEY=None,
    )
    started = time.perf_counter()
    app = create_app(settings)
    built = time.perf_counter() - started
    result: dict[str, Any] = {"knowledge_bases": count, "routes": len(app.routes), "build_s": round(built, 2)}
    paths = {"default": "/rag/input_schema"}
    if count:
        paths["last"] = f"/kb/kb{count - 1}/rag/input_schema"
    for name, path in paths.items():
        seconds = asyncio.run(timed(app, path, requests))
        result[f"{name}_p50_ms"] = round(statistics.median(seconds) * 1000, 2)
        result[f"{name}_p95_ms"] = round(statistics.quantiles(seconds, n=20)[18] * 1000, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="0,10,50,100")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from settings import import_pymilvus_safely

    import_pymilvus_safely()
    with tempfile.TemporaryDirectory() as folder:
        rows = [measure(int(c), args.requests, Path(folder)) for c in args.counts.split(",")]
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{date.today()} on {platform.node()} (python {platform.python_version()})")
    print("KBs  routes  build s  default p50/p95 ms  last KB p50/p95 ms")
    for r in rows:
        last = f"{r['last_p50_ms']:>6} / {r['last_p95_ms']}" if "last_p50_ms" in r else "     -"
        print(
            f"{r['knowledge_bases']:>3}  {r['routes']:>6}  {r['build_s']:>7}  "
            f"{r['default_p50_ms']:>8} / {r['default_p95_ms']:<8}  {last}"
        )


if __name__ == "__main__":
    main()
