"""Serving under load, on loopback: the service's added latency, time to first token,
throughput at 32 streaming clients against the chain in-process, 100 streams held open
against a slow upstream (errors, server memory), and query embeddings of concurrent
requests with and without the micro-batcher.

    .venv/bin/python bench/serve.py [--requests 30] [--clients 32] [--per-client 3]
                                    [--streams 100] [--slow-tokens 60] [--embed-rounds 2]
                                    [--burners 1] [--json]

The upstream is the tests' OpenAI-compatible server (tests/llm_server.py), run as a process
of its own and driven over HTTP (its /control routes): the bench imports nothing from tests/.
Its send times and the clients' receipt times are both perf_counter, one clock for every
process on Linux. The app runs under uvicorn in a child process too, so its memory can be read
from /proc without the bench's own in the figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import date
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

LLM_SERVER = REPO / "tests" / "llm_server.py"  # run as a program, never imported
FAQ = SHARED / "corpus" / "milvus-faq"
QUESTIONS = SHARED / "eval" / "dev.jsonl"
# A reply of this many words streams in about 1 ms from the instant upstream.
INSTANT_REPLY = "Milvus keeps its data in object storage such as MinIO or S3 [1]."
START_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 120.0


# ---------------------------------------------------------------------------- figures


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


@dataclass
class Answer:
    """One streamed answer as a client saw it (perf_counter seconds)."""

    started: float
    first_token_at: float | None = None
    ended: float = 0.0
    tokens: int = 0
    error: str | None = None

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass
class Report:
    """Every figure of a run; printed as tables or as JSON."""

    machine: str
    settings: dict[str, Any]
    latency: dict[str, Any] = field(default_factory=dict)
    throughput: dict[str, Any] = field(default_factory=dict)
    slow_streams: dict[str, Any] = field(default_factory=dict)
    embeddings: list[dict[str, Any]] = field(default_factory=list)


def machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )


def load_questions(path: Path) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row["question"] for row in rows if row.get("question")]


# ---------------------------------------------------------------------------- the service


class Upstream:
    """tests/llm_server.py in a process of its own: an OpenAI-compatible server on loopback
    that answers with `reply`, told how to behave and asked what it saw over HTTP."""

    def __init__(self, reply: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(LLM_SERVER), "--reply", reply], stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        try:
            started = json.loads(line)
        except ValueError:
            self.close()
            raise SystemExit(f"{LLM_SERVER} did not start: {line!r}") from None
        self.url: str = started["url"]
        self.api_key: str = started["api_key"]
        self.control = self.url.removesuffix("/v1") + "/control"

    async def behave(self, client: Any, **behaviour: Any) -> None:
        """Start afresh (observations cleared) with this behaviour (tests.llm_server.Behaviour's fields)."""
        (await client.post(f"{self.control}/behaviour", json=behaviour)).raise_for_status()

    async def counts(self, client: Any) -> dict[str, int]:
        """Requests and tokens seen so far, streams open now and at most."""
        response = await client.get(f"{self.control}/counts")
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    async def since(self, client: Any, counts: dict[str, int]) -> dict[str, Any]:
        """What it saw after `counts`: {"requests": [{"received"}], "sent": [[time, token]]}."""
        positions = {"requests_from": counts["requests"], "sent_from": counts["sent"]}
        response = await client.get(f"{self.control}/observations", params=positions)
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def bench_settings(db: Path, collection: str, llm_url: str | None, llm_key: str | None = None) -> Any:
    """Settings for the temp Lite file, with DeepSeek pointed at the local upstream."""
    from settings import Settings

    values: dict[str, Any] = {"MILVUS_URI": str(db), "RAG_COLLECTION": collection, "DEEPSEEK_API_KEY": None}
    if llm_url is not None:
        values.update(DEEPSEEK_API_KEY=llm_key, DEEPSEEK_BASE_URL=llm_url, DEEPSEEK_MAX_RETRIES=0)
    return Settings(_env_file=None, **values)


def ingest_faq(db: Path, collection: str) -> tuple[int, Any]:
    """Ingest the FAQ pages with the project's own code: (chunks stored, the loaded model)."""
    from service import open_service
    from store.indexing import ingest

    service = open_service(bench_settings(db, collection, None), llm=None)
    try:
        report = ingest([str(FAQ)], service.get_store(), service.chunker(), progress=False)
    finally:
        close_service(service)
    if report.skipped or not report.total_chunks:
        raise SystemExit(f"ingesting {FAQ} failed: {report.skipped}")
    return int(report.total_chunks), service.embeddings.function


def close_service(service: Any) -> None:
    service.close()
    close_embeddings = getattr(service.embeddings, "close", None)
    if close_embeddings is not None:
        close_embeddings()


TIMELINE_ENV = "BENCH_TIMELINE"  # where the child writes one line of stage times per answer


def stamp_stages(path: Path) -> Callable[[Any], Any]:
    """Write per /rag/stream answer the perf_counter times of its stages to `path`; returns
    the wrapper for the app (which must be built after this call, so its chain is timed).

    perf_counter is CLOCK_MONOTONIC on Linux, shared by every process, so the parent can set
    these beside its own client and upstream times. Wraps public methods only; costs a few
    microseconds an answer.
    """
    from chains.rag import RagChain
    from chains.retrieval import MilvusRetriever

    current: dict[str, float] = {}
    retrieve, astream = MilvusRetriever.retrieve, RagChain.astream

    def timed_retrieve(self: Any, *args: Any, **kwargs: Any) -> Any:
        current["retrieval_start"] = time.perf_counter()
        try:
            return retrieve(self, *args, **kwargs)
        finally:
            current["retrieval_end"] = time.perf_counter()

    async def timed_astream(self: Any, inputs: Any, config: Any) -> Any:
        current["chain_start"] = time.perf_counter()
        async for chunk in astream(self, inputs, config):
            now = time.perf_counter()
            if "sources" in chunk:
                current["sources_sent"] = now
            elif chunk.get("answer"):
                current.setdefault("first_answer_sent", now)
                current["last_answer_sent"] = now
            yield chunk
        current["chain_end"] = time.perf_counter()
        with path.open("a") as log:
            log.write(json.dumps(current) + "\n")

    MilvusRetriever.retrieve = timed_retrieve  # type: ignore[method-assign]
    RagChain.astream = timed_astream  # type: ignore[method-assign]

    def wrap(app: Any) -> Any:
        async def stamped(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and scope["path"] == "/rag/stream":
                current.clear()
                current["request_in"] = time.perf_counter()
            await app(scope, receive, send)

        return stamped

    return wrap


def serve_child(db: str, collection: str, llm_url: str, llm_key: str) -> None:
    """The child process: the real app under uvicorn on a free loopback port (printed first)."""
    import uvicorn

    from server import create_app

    settings = bench_settings(Path(db), collection, llm_url, llm_key)
    timeline = os.environ.get(TIMELINE_ENV)
    wrap = stamp_stages(Path(timeline)) if timeline else None
    app: Any = create_app(settings)
    if wrap is not None:
        app = wrap(app)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)  # a burst of 100 connections must not overflow the accept queue
    print(f"port {sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


@contextmanager
def child_server(
    db: Path, collection: str, llm: Upstream, log: Path, timeline: Path | None = None
) -> Iterator[tuple[str, int]]:
    """(base URL, pid) of the app served by a child process, stopped on exit; with `timeline`,
    the child writes the stage times of each answer there (see stamp_stages)."""
    env = {**os.environ, TIMELINE_ENV: str(timeline)} if timeline else None
    with log.open("w") as errors:
        process = subprocess.Popen(
            [sys.executable, __file__, "--child", str(db), collection, llm.url, llm.api_key],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            if not line.startswith("port "):
                process.wait(timeout=30)
                raise SystemExit(f"the server did not start:\n{log.read_text()[-3000:]}")
            # Anything it prints later is drained, so a full pipe can never block it.
            threading.Thread(target=process.stdout.read, daemon=True).start()
            yield f"http://127.0.0.1:{int(line.split()[1])}", process.pid
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def proc_status(pid: int) -> dict[str, float]:
    """RSS (MiB) and thread count of a process, from /proc/<pid>/status."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key == "VmRSS":
            values["rss_mib"] = round(int(rest.split()[0]) / 1024, 1)
        elif key == "Threads":
            values["threads"] = int(rest)
    return values


# ---------------------------------------------------------------------------- clients


async def wait_healthy(client: Any, base: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            response = await client.get(f"{base}/health")
            if response.status_code == 200 and response.json().get("status") == "ok":
                return
        except Exception:  # not listening yet
            pass
        await asyncio.sleep(0.2)  # polling a starting server: there is nothing to wait on
    raise SystemExit(f"the server at {base} did not become healthy in {START_TIMEOUT_S:.0f} s")


async def stream_over_http(client: Any, base: str, question: str) -> Answer:
    """POST /rag/stream and read its server-sent events to the `end` event."""
    answer = Answer(started=time.perf_counter())
    event = ""
    try:
        async with client.stream("POST", f"{base}/rag/stream", json={"input": {"question": question}}) as r:
            if r.status_code != 200:
                answer.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            else:
                async for line in r.aiter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                        if event == "end":
                            break
                    elif line.startswith("data:") and event == "error":
                        answer.error = line[5:].strip()[:200]
                    elif line.startswith("data:") and event == "data":
                        note_chunk(answer, json.loads(line[5:]))
                else:
                    answer.error = answer.error or "the stream ended without an `end` event"
    except Exception as exc:
        answer.error = f"{type(exc).__name__}: {exc}"
    return finished(answer)


async def stream_in_process(chain: Any, question: str) -> Answer:
    """The same answer from `chain.astream`, without HTTP."""
    answer = Answer(started=time.perf_counter())
    try:
        async for chunk in chain.astream({"question": question}):
            note_chunk(answer, chunk)
    except Exception as exc:
        answer.error = f"{type(exc).__name__}: {exc}"
    return finished(answer)


def finished(answer: Answer) -> Answer:
    """Stamp the end; an answer without a single token counts as an error."""
    answer.ended = time.perf_counter()
    if answer.error is None and not answer.tokens:
        answer.error = "no answer tokens"
    return answer


def note_chunk(answer: Answer, chunk: Any) -> None:
    # The LLM's role delta arrives as an empty answer chunk: only text counts as a token.
    if isinstance(chunk, dict) and isinstance(chunk.get("answer"), str) and chunk["answer"]:
        if answer.first_token_at is None:
            answer.first_token_at = time.perf_counter()
        answer.tokens += 1


async def concurrently(
    ask: Callable[[str], Any], questions: list[str], clients: int, total: int
) -> tuple[list[Answer], float]:
    """`total` answers asked by `clients` concurrent clients; (answers, wall seconds)."""
    pending = iter(range(total))
    answers: list[Answer] = []

    async def client_loop() -> None:
        for i in pending:
            answers.append(await ask(questions[i % len(questions)]))

    started = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    return answers, time.perf_counter() - started


def summary(answers: list[Answer]) -> dict[str, Any]:
    ok = [a.seconds for a in answers if a.error is None]
    errors = [a.error for a in answers if a.error is not None]
    return {
        "answers": len(answers),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "p50_ms": ms(percentile(ok, 50)),
        "p95_ms": ms(percentile(ok, 95)),
    }


# ---------------------------------------------------------------------------- phases


# Stage marks of one answer, in time order: (name, where it is taken).
TIMELINE = [
    ("request reaches the app", "request_in"),
    ("the chain starts", "chain_start"),
    ("retrieval starts", "retrieval_start"),
    ("retrieval ends (question embedded, Milvus searched)", "retrieval_end"),
    ("sources chunk leaves the chain", "sources_sent"),
    ("upstream has the request", "upstream_received"),
    ("upstream sends the first token", "upstream_first_sent"),
    ("first answer chunk leaves the chain", "first_answer_sent"),
    ("client has the first token", "client_first_token"),
    ("upstream sends the last token", "upstream_last_sent"),
    ("last answer chunk leaves the chain", "last_answer_sent"),
    ("the chain ends (after the usage chunk)", "chain_end"),
    ("client has the `end` event", "client_end"),
]


def timeline_ms(marks: list[dict[str, float]]) -> dict[str, float]:
    """Median time of each stage mark after the client sent its request, in ms."""
    return {
        key: ms(statistics.median(m[key] - m["client_start"] for m in marks))
        for _, key in TIMELINE
        if marks and all(key in m for m in marks)
    }


async def one_client_over_http(
    client: Any, base: str, llm: Upstream, questions: list[str], count: int, timeline: Path | None = None
) -> dict[str, Any]:
    """Sequential answers: added latency (end to end minus the upstream's own time, from
    the arrival of its request to its last token) and time to first token (client receipt
    minus the upstream's send of that token)."""
    added, ttft, answers, marks = [], [], [], []
    logged = len(timeline.read_text().splitlines()) if timeline and timeline.exists() else 0
    for i in range(count):
        before = await llm.counts(client)
        answer = await stream_over_http(client, base, questions[i % len(questions)])
        answers.append(answer)
        seen = await llm.since(client, before)
        sent, requests = seen["sent"], seen["requests"]
        if answer.error is None and sent and requests and answer.first_token_at is not None:
            upstream = sent[-1][0] - requests[0]["received"]
            added.append(answer.seconds - upstream)
            ttft.append(answer.first_token_at - sent[0][0])
            marks.append(
                {
                    "client_start": answer.started,
                    "upstream_received": requests[0]["received"],
                    "upstream_first_sent": sent[0][0],
                    "client_first_token": answer.first_token_at,
                    "upstream_last_sent": sent[-1][0],
                    "client_end": answer.ended,
                }
            )
    if timeline is not None and len(marks) == count:
        stages = [json.loads(line) for line in timeline.read_text().splitlines()[logged:]]
        if len(stages) == count:  # one line per answer, in order
            marks = [{**m, **stage} for m, stage in zip(marks, stages, strict=True)]
    return {
        "timeline_ms": timeline_ms(marks),
        **summary(answers),
        "added_p50_ms": ms(percentile(added, 50)),
        "added_p95_ms": ms(percentile(added, 95)),
        "ttft_p50_ms": ms(percentile(ttft, 50)),
        "ttft_p95_ms": ms(percentile(ttft, 95)),
        "ttft_max_ms": ms(max(ttft, default=float("nan"))),
    }


async def slow_streams(
    client: Any,
    base: str,
    pid: int,
    llm: Upstream,
    questions: list[str],
    streams: int,
    waves: int,
    behaviour: dict[str, Any],
) -> dict[str, Any]:
    """`streams` answers at once, `waves` times, against the slow upstream (a token every
    200 ms by default); the server's RSS and threads before, after each wave, and at the peak."""
    samples: list[dict[str, float]] = []
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            samples.append({**proc_status(pid), "streams_open": (await llm.counts(client))["streams_open"]})
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)

    result: dict[str, Any] = {
        "streams": streams,
        "waves": waves,
        "token_delay_ms": round(behaviour["token_delay"] * 1000),
        "tokens_per_answer": len(behaviour["reply"].split(" ")),
        "before": proc_status(pid),
    }
    sampler = asyncio.create_task(sample())
    answers: list[Answer] = []
    max_open = 0
    started = time.perf_counter()
    for wave in range(1, waves + 1):
        await llm.behave(client, **behaviour)  # clears the upstream's counters too
        wave_answers, _ = await concurrently(
            lambda q: stream_over_http(client, base, q), questions, streams, streams
        )
        answers += wave_answers
        max_open = max(max_open, (await llm.counts(client))["max_streams_open"])
        result[f"after_wave_{wave}"] = proc_status(pid)
    stop.set()
    await sampler
    result.update(summary(answers))
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["max_upstream_streams_open"] = max_open
    busiest = max(samples, key=lambda s: s["streams_open"], default={"rss_mib": float("nan")})
    result["rss_at_most_open_mib"] = busiest["rss_mib"]
    result["peak_rss_mib"] = max((s["rss_mib"] for s in samples), default=float("nan"))
    result["peak_threads"] = max((s["threads"] for s in samples), default=float("nan"))
    result["rss_growth_last_wave_mib"] = round(
        result[f"after_wave_{waves}"]["rss_mib"] - result[f"after_wave_{max(1, waves - 1)}"]["rss_mib"], 1
    )
    return result


class CountingEncoder:
    """The loaded embedding function, recording how many queries each call embedded."""

    def __init__(self, function: Any):
        self.function = function
        self.batches: list[int] = []

    def encode_queries(self, texts: list[str]) -> Any:
        self.batches.append(len(texts))
        return self.function.encode_queries(texts)

    def encode_documents(self, texts: list[str]) -> Any:
        return self.function.encode_documents(texts)


def encode_one(encoder: CountingEncoder, question: str) -> Any:
    """One query, one torch call, on the calling thread (the way before the micro-batcher)."""
    return encoder.encode_queries([question])


def embed_concurrently(embed: Callable[[str], Any], questions: list[str], clients: int) -> list[float]:
    """Seconds each of `clients` threads waited for its query, all released at once."""
    barrier = threading.Barrier(clients)

    def one(question: str) -> float:
        barrier.wait()
        started = time.perf_counter()
        embed(question)
        return time.perf_counter() - started

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, [questions[i % len(questions)] for i in range(clients)]))


def embedding_rows(
    function: Any, questions: list[str], clients: int, rounds: int, burners: int
) -> list[dict[str, Any]]:
    """Query-embedding latency of `clients` concurrent queries: one torch call per query (the
    old way, at 2 and 1 threads) against the micro-batcher, quiet and beside CPU burners."""
    import torch

    from store.embeddings import PymilvusEmbeddings, default_torch_threads

    default_threads = default_torch_threads()
    rows = []
    for burning in sorted({0, burners}):
        burn = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(burning)]
        try:
            for mode, threads in (
                ("one call per query", default_threads),
                ("one call per query", 1),
                ("micro-batched", 1),
                ("micro-batched", default_threads),
            ):
                counter = CountingEncoder(function)
                if mode == "micro-batched":
                    model = PymilvusEmbeddings(function=counter, query_threads=threads)
                    embed: Callable[[str], Any] = model.embed_query
                else:
                    model = None
                    torch.set_num_threads(threads)
                    embed = partial(encode_one, counter)

                embed(questions[0])  # a new thread count rebuilds torch's pool: not timed
                counter.batches.clear()
                waits: list[float] = []
                started = time.perf_counter()
                for _ in range(rounds):
                    waits += embed_concurrently(embed, questions, clients)
                seconds = time.perf_counter() - started
                if model is not None:
                    model.close()
                rows.append(
                    {
                        "cpu_burners": burning,
                        "mode": mode,
                        "torch_threads": threads,
                        "queries": len(waits),
                        "p50_ms": ms(percentile(waits, 50)),
                        "p95_ms": ms(percentile(waits, 95)),
                        "max_ms": ms(max(waits)),
                        "queries_per_s": round(len(waits) / seconds, 1),
                        "mean_batch": round(statistics.fmean(counter.batches), 1),
                    }
                )
        finally:
            for process in burn:
                process.terminate()
                process.wait()
    torch.set_num_threads(default_threads)
    return rows


async def run(args: argparse.Namespace) -> Report:
    import httpx

    from service import open_service

    questions = load_questions(args.questions)
    report = Report(machine=machine(), settings={k: str(v) for k, v in vars(args).items()})
    llm = Upstream(INSTANT_REPLY)
    try:
        with tempfile.TemporaryDirectory() as folder:
            db, collection = Path(folder) / "bench.db", f"serve_{uuid.uuid4().hex[:8]}"
            started = time.perf_counter()
            chunks, function = ingest_faq(db, collection)
            report.settings["ingested"] = f"{chunks} chunks in {time.perf_counter() - started:.1f} s"

            # The chain in-process first: Milvus Lite files open in one process at a time.
            service = open_service(bench_settings(db, collection, llm.url, llm.api_key))
            service.embeddings._function = function  # loaded once, as the tests share it
            try:
                chain = service.chain
                await concurrently(lambda q: stream_in_process(chain, q), questions, 1, 3)  # warm up
                local_one, _ = await concurrently(
                    lambda q: stream_in_process(chain, q), questions, 1, args.requests
                )
                total = args.clients * args.per_client
                local_many, local_s = await concurrently(
                    lambda q: stream_in_process(chain, q), questions, args.clients, total
                )
            finally:
                close_service(service)
            report.latency["in_process"] = summary(local_one)

            limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
            timeout = httpx.Timeout(REQUEST_TIMEOUT_S)
            timeline = Path(folder) / "timeline.jsonl"
            with child_server(db, collection, llm, Path(folder) / "server.log", timeline) as (base, pid):
                async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
                    await wait_healthy(client, base)
                    await concurrently(lambda q: stream_over_http(client, base, q), questions, 1, 3)
                    report.latency["http"] = await one_client_over_http(
                        client, base, llm, questions, args.requests, timeline
                    )
                    served, served_s = await concurrently(
                        lambda q: stream_over_http(client, base, q), questions, args.clients, total
                    )
                    report.throughput = {
                        "clients": args.clients,
                        "answers": total,
                        "http": {**summary(served), "answers_per_s": round(total / served_s, 1)},
                        "in_process": {**summary(local_many), "answers_per_s": round(total / local_s, 1)},
                    }
                    report.throughput["http_vs_in_process"] = round(
                        report.throughput["http"]["answers_per_s"]
                        / report.throughput["in_process"]["answers_per_s"],
                        2,
                    )
                    if args.streams:
                        words = " ".join(f"w{i}" for i in range(args.slow_tokens))
                        slow = await slow_streams(
                            client,
                            base,
                            pid,
                            llm,
                            questions,
                            args.streams,
                            args.waves,
                            {"reply": words, "token_delay": args.token_delay},
                        )
                        report.slow_streams = slow
    finally:
        llm.close()
    if args.embed_rounds:
        report.embeddings = await asyncio.to_thread(
            embedding_rows, function, questions, args.clients, args.embed_rounds, args.burners
        )
    return report


# ---------------------------------------------------------------------------- output


def tables(report: Report) -> str:
    """The report as markdown tables."""
    lat, thr, slow = report.latency, report.throughput, report.slow_streams
    http = lat["http"]
    lines = [
        f"## Serving under load ({date.today()}, {report.machine})",
        "",
        f"FAQ corpus: {report.settings.get('ingested')}. Upstream: tests/llm_server.py on loopback.",
        "",
        "| measure | value | target |",
        "|---|---:|---:|",
        f"| added latency per answer, 1 client, p50 / p95 | {http['added_p50_ms']} / "
        f"{http['added_p95_ms']} ms | ≤ 40 / ≤ 80 ms |",
        f"| same answers in-process (`chain.astream`), p50 / p95 | {lat['in_process']['p50_ms']} / "
        f"{lat['in_process']['p95_ms']} ms | |",
        f"| first token, client receipt − upstream send, p50 / p95 / max | {http['ttft_p50_ms']} / "
        f"{http['ttft_p95_ms']} / {http['ttft_max_ms']} ms | ≤ 10 ms |",
        f"| errors, 1 client | {http['errors']} of {http['answers']} | 0 |",
    ]
    if thr:
        lines += [
            f"| {thr['clients']} streaming clients over HTTP: answers/s, p50 / p95 | "
            f"{thr['http']['answers_per_s']}, {thr['http']['p50_ms']} / {thr['http']['p95_ms']} ms | |",
            f"| {thr['clients']} concurrent `chain.astream` in-process: answers/s, p50 / p95 | "
            f"{thr['in_process']['answers_per_s']}, {thr['in_process']['p50_ms']} / "
            f"{thr['in_process']['p95_ms']} ms | |",
            f"| HTTP / in-process throughput | {thr['http_vs_in_process']} | ≥ 0.5 |",
            f"| errors, {thr['clients']} clients (HTTP / in-process) | {thr['http']['errors']} / "
            f"{thr['in_process']['errors']} of {thr['answers']} | 0 |",
        ]
    if slow:
        waves = slow["waves"]
        rss = " → ".join(
            [str(slow["before"]["rss_mib"])]
            + [str(slow[f"after_wave_{w}"]["rss_mib"]) for w in range(1, waves + 1)]
        )
        lines += [
            f"| {slow['streams']} streams at once × {waves} waves, {slow['token_delay_ms']:g} ms/token, "
            f"errors | "
            f"{slow['errors']} of {slow['answers']} | 0 |",
            f"| most streams open at the upstream at once | {slow['max_upstream_streams_open']} | "
            f"{slow['streams']} |",
            f"| server RSS before → after each wave | {rss} MiB | flat |",
            f"| server RSS with the most streams open / peak | {slow['rss_at_most_open_mib']} / "
            f"{slow['peak_rss_mib']} MiB | |",
            f"| server RSS growth over the last wave | {slow['rss_growth_last_wave_mib']} MiB | ≈ 0 |",
            f"| server threads before / peak | {slow['before']['threads']} / {slow['peak_threads']} | |",
        ]
    stages = http.get("timeline_ms") or {}
    if stages:
        lines += [
            "",
            "Where one answer's time goes (1 client; median ms after the client sent its request):",
            "",
            "| stage | ms |",
            "|---|---:|",
        ]
        lines += [f"| {name} | {stages[key]} |" for name, key in TIMELINE if key in stages]
    for key, value in (("1 client", http), ("HTTP clients", thr.get("http", {})), ("slow", slow)):
        if value.get("first_error"):
            lines.append(f"\nFirst error ({key}): {value['first_error']}")
    if report.embeddings:
        lines += [
            "",
            "Query embeddings, concurrent queries released at once (latency per query):",
            "",
            "| CPU burners | mode | torch threads | queries | p50 ms | p95 ms | max ms | queries/s "
            "| mean batch |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['cpu_burners']} | {r['mode']} | {r['torch_threads']} | {r['queries']} | {r['p50_ms']} | "
            f"{r['p95_ms']} | {r['max_ms']} | {r['queries_per_s']} | {r['mean_batch']} |"
            for r in report.embeddings
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=30, help="sequential answers at 1 client")
    parser.add_argument("--clients", type=int, default=32, help="concurrent streaming clients")
    parser.add_argument("--per-client", type=int, default=3, help="answers per concurrent client")
    parser.add_argument("--streams", type=int, default=100, help="slow streams held open at once (0: skip)")
    parser.add_argument("--waves", type=int, default=2, help="times the slow streams are opened")
    parser.add_argument("--slow-tokens", type=int, default=60, help="tokens per slow answer")
    parser.add_argument("--token-delay", type=float, default=0.2, help="seconds between slow tokens")
    parser.add_argument("--embed-rounds", type=int, default=2, help="rounds of concurrent queries (0: skip)")
    parser.add_argument("--burners", type=int, default=1, help="CPU-bound processes beside the queries")
    parser.add_argument("--questions", type=Path, default=QUESTIONS)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--child", nargs=4, metavar=("DB", "COLLECTION", "LLM_URL", "LLM_KEY"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        serve_child(*args.child)
        return
    assert FAQ.is_dir(), f"corpus missing: {FAQ}"
    report = asyncio.run(run(args))
    print(json.dumps(asdict(report), indent=2) if args.json else tables(report), flush=True)


if __name__ == "__main__":
    main()
