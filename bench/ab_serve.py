"""Two variants of the served app, answering in turn: the added latency of each at 1 client,
and the median of the paired differences.

    .venv/bin/python bench/ab_serve.py "RAG_QUERY_ENCODER=onnx" ""      # fp32 against the default
    .venv/bin/python bench/ab_serve.py --answers 300 "RAG_SEARCH=dense" "RAG_SEARCH=hybrid"

Each variant is a set of environment variables for its server process (bench/serve.py's
child, on its own copy of the ingested FAQ). Why in turn: this VM's speed drifts by several
ms over minutes, so two runs taken one after the other differ by more than most changes do;
answers interleaved in random order see the same drift.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve  # noqa: E402  (bench/serve.py: ingestion, the child server, the upstream, figures)


def parse_env(variant: str) -> dict[str, str]:
    """'A=1 B=2' as a dict; an empty string is the defaults."""
    pairs = [item.split("=", 1) for item in variant.split()]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"a variant is NAME=VALUE pairs separated by spaces, not {variant!r}")
    return dict(pairs)  # type: ignore[arg-type]


@contextmanager
def variant_server(
    db: Path, collection: str, llm: serve.Upstream, env: dict[str, str], log: Path
) -> Iterator[str]:
    """The base URL of bench/serve.py's child server with `env` added to its environment."""
    saved = {name: os.environ.get(name) for name in env}

    def restore() -> None:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    os.environ.update(env)  # the child inherits the environment when it starts
    try:
        with serve.child_server(db, collection, llm, log) as (base, _pid):
            restore()  # started: the next server must not inherit these
            yield base
    finally:
        restore()


async def added_latency(client: Any, base: str, llm: serve.Upstream, question: str) -> float:
    """One streamed answer's time minus the upstream's own, in ms (as bench/serve.py counts it)."""
    before = await llm.counts(client)
    answer = await serve.stream_over_http(client, base, question)
    if answer.error is not None:
        raise SystemExit(f"{base}: {answer.error}")
    seen = await llm.since(client, before)
    sent, requests = seen["sent"], seen["requests"]
    return (answer.seconds - (sent[-1][0] - requests[0]["received"])) * 1000


async def compare(
    bases: list[str], llm: serve.Upstream, questions: list[str], answers: int
) -> list[list[float]]:
    import httpx

    figures: list[list[float]] = [[] for _ in bases]
    async with httpx.AsyncClient(timeout=serve.REQUEST_TIMEOUT_S) as client:
        for base in bases:
            await serve.wait_healthy(client, base)
            for question in questions[:5]:  # warm up
                await added_latency(client, base, llm, question)
        for i in range(answers):
            order = list(range(len(bases)))
            random.shuffle(order)
            for j in order:
                figures[j].append(await added_latency(client, bases[j], llm, questions[i % len(questions)]))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("variant_a", help='environment of server A, e.g. "RAG_QUERY_ENCODER=onnx"')
    parser.add_argument("variant_b", help='environment of server B ("" for the defaults)')
    parser.add_argument("--answers", type=int, default=200, help="answers per server")
    args = parser.parse_args()
    envs = [parse_env(args.variant_a), parse_env(args.variant_b)]
    questions = serve.load_questions(serve.QUESTIONS)
    llm = serve.Upstream(serve.INSTANT_REPLY)
    try:
        with tempfile.TemporaryDirectory() as folder, ExitStack() as servers:
            db, collection = Path(folder) / "a.db", f"ab_{uuid.uuid4().hex[:8]}"
            serve.ingest_faq(db, collection)
            shutil.copytree(db, Path(folder) / "b.db")  # a Lite file opens in one process at a time
            bases = [
                servers.enter_context(
                    variant_server(
                        Path(folder) / f"{name}.db", collection, llm, env, Path(folder) / f"{name}.log"
                    )
                )
                for name, env in zip("ab", envs, strict=True)
            ]
            figures = asyncio.run(compare(bases, llm, questions, args.answers))
    finally:
        llm.close()
    print(f"{serve.machine()}; {args.answers} answers per server, in turn\n")
    print("| server | environment | added latency p50 / p95 |\n|---|---|---:|")
    for name, variant, values in zip("AB", (args.variant_a, args.variant_b), figures, strict=True):
        p50, p95 = serve.percentile(values, 50), serve.percentile(values, 95)
        print(f"| {name} | `{variant or '(defaults)'}` | {p50:.1f} / {p95:.1f} ms |")
    differences = [a - b for a, b in zip(*figures, strict=True)]
    faster = sum(d < 0 for d in differences)
    print(
        f"\nA − B, median of the paired differences: {statistics.median(differences):+.2f} ms "
        f"(A faster in {faster} of {len(differences)})"
    )


if __name__ == "__main__":
    main()
