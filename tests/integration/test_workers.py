"""`rag serve --workers N`: real processes sharing one Milvus Lite store, and nothing left behind."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from errors import StoreError
from settings import Settings
from workers import LiteServer, free_port, settings_environment

pytestmark = pytest.mark.integration

RAG = [sys.executable, "-m", "cli"]
REPO = Path(__file__).resolve().parents[2]
DOCS = {
    "zebras.md": "# Savanna\n\n## Zebras\n\nZebras are striped horses that live in herds in Africa.\n",
    "penguins.md": "# Antarctica\n\n## Penguins\n\nPenguins are flightless birds that swim in icy seas.\n",
}
QUERIES = {"Which animal has stripes?": "zebras.md", "Which birds cannot fly?": "penguins.md"}
STORE_LINE = re.compile(r"store: milvus-lite server \(pid (\d+)\) on http://127\.0\.0\.1:(\d+)")
# With RAG_LOG_FORMAT=json every log line is a JSON object; the server logs "ready" at start-up.
LOG_LINE = re.compile(r"^\{.*\}$")
STARTUP_TIMEOUT = 180  # two workers each load PyTorch and the model; CI machines may be small


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by whoever adopted it, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        return stat.read_text().rpartition(")")[2].split()[0] != "Z"
    return True


def gone_soon(pid: int, timeout: float = 20) -> bool:
    """Whether the process ends within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Output:
    """The lines a process prints, read on a thread so that tests can wait for one."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        assert process.stdout is not None
        stream = process.stdout

        def read() -> None:
            for line in stream:
                self._queue.put(line.rstrip())
            self._queue.put(None)

        threading.Thread(target=read, daemon=True).start()

    def wait_for(self, pattern: re.Pattern[str], count: int = 1, timeout: float = 30) -> list[re.Match[str]]:
        """The first `count` matches of `pattern` in everything printed so far and next."""
        deadline = time.monotonic() + timeout
        while True:
            matches = [m for line in self.lines if (m := pattern.search(line))]
            if len(matches) >= count:
                return matches[:count]
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no {count} x {pattern.pattern!r} in time:\n" + "\n".join(self.lines))
            if line is None:
                pytest.fail(f"the process ended before {pattern.pattern!r}:\n" + "\n".join(self.lines))
            self.lines.append(line)

    def until_end(self, timeout: float = 30) -> list[str]:
        """Everything printed, once the process has closed its output."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail("the process's output did not end in time:\n" + "\n".join(self.lines))
            if line is None:
                return self.lines
            self.lines.append(line)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A clean environment with a Milvus Lite path, no DeepSeek key and no buffering help."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("DEEPSEEK_", "MILVUS_", "RAG_"))}
    keep.pop("PYTHONUNBUFFERED", None)
    return {**keep, "MILVUS_URI": str(tmp_path / "store.db"), "HF_HUB_OFFLINE": "1"}


def retrieve(base: str, query: str, request_id: str) -> str:
    response = httpx.post(
        f"{base}/retriever/invoke", json={"input": query}, headers={"X-Request-ID": request_id}, timeout=60
    )
    assert response.status_code == 200, response.text
    assert response.headers["X-Request-ID"] == request_id
    return str(response.json()["output"][0]["metadata"]["source"])


def log_records(output: Output, count: int, where: Any, timeout: float = 30) -> list[dict[str, Any]]:
    """The first `count` JSON log records for which `where(record)` holds, waiting for them."""
    deadline = time.monotonic() + timeout
    while True:
        records = [json.loads(line) for line in output.lines if LOG_LINE.match(line)]
        chosen = [r for r in records if where(r)]
        if len(chosen) >= count:
            return chosen[:count]
        output.wait_for(LOG_LINE, count=len(records) + 1, timeout=max(0.1, deadline - time.monotonic()))


def is_ready(record: dict[str, Any]) -> bool:
    return bool(record["logger"] == "server" and record["message"] == "ready")


def scrape(
    base: str, headers: dict[str, str] | None = None
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """GET /metrics, as Prometheus would: {(sample name, labels): value}."""
    response = httpx.get(f"{base}/metrics", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def serve_two_workers(env: dict[str, str], port: int) -> tuple[subprocess.Popen[str], Output]:
    """`rag serve --workers 2` as a real process, its output read in the background."""
    serve = subprocess.Popen(
        [*RAG, "serve", "--workers", "2", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return serve, Output(serve)


def kill_leftovers(serve: subprocess.Popen[str], store_pid: int) -> None:
    """Whatever a failed test left running: `rag serve` and the milvus-lite server it started."""
    if serve.poll() is None:
        serve.kill()
        serve.wait()
    if store_pid and alive(store_pid):
        os.kill(store_pid, signal.SIGKILL)


def test_workers_share_the_ingested_lite_store_and_their_metrics_and_stop_it(
    tmp_path: Path, env: dict[str, str]
) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text)
    ingest = subprocess.run(
        [*RAG, "ingest", str(docs), "--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert ingest.returncode == 0, ingest.stderr
    assert json.loads(ingest.stdout)["total_chunks"] == 2

    temp = tmp_path / "tmp"  # where `rag serve` makes its metrics directory
    temp.mkdir()
    port = free_port()
    serve, output = serve_two_workers({**env, "RAG_LOG_FORMAT": "json", "TMPDIR": str(temp)}, port)
    store_pid = 0
    try:
        store = output.wait_for(STORE_LINE)[0]
        store_pid, store_port = int(store[1]), int(store[2])
        ready = log_records(output, 2, is_ready, STARTUP_TIMEOUT)
        workers = {r["process"] for r in ready}
        assert len(workers) == 2 and store_pid not in workers
        assert len(list(temp.glob("rag-metrics-*"))) == 1

        base = f"http://127.0.0.1:{port}"
        health = httpx.get(f"{base}/health", timeout=30)
        assert health.status_code == 200 and health.json()["chunks"] == 2, health.text
        assert health.json()["milvus_uri"] == f"http://127.0.0.1:{store_port}"

        # Both workers accept on one socket; which one answers is the kernel's choice, so
        # send rounds of concurrent requests (each on its own connection) until both have.
        # The access log line of each request carries its id and the worker's process id.
        sent: list[str] = []
        served_by: set[int] = set()
        with ThreadPoolExecutor(max_workers=8) as pool:
            for round_ in range(5):
                queries = list(QUERIES) * 4
                ids = [f"round{round_}-{n}" for n in range(len(queries))]
                sources = list(pool.map(lambda q, i: retrieve(base, q, i), queries, ids))
                assert sources == [QUERIES[q] for q in queries]
                sent += ids
                ours = set(sent)
                access = log_records(output, len(sent), lambda r, ours=ours: r["request_id"] in ours)
                assert {r["request_id"] for r in access} == set(sent)
                served_by = {r["process"] for r in access}
                if len(served_by) == 2:
                    break
        assert served_by == workers

        # Whichever worker answers the scrape, it reports both workers' requests.
        labels = {("method", "POST"), ("route", "/retriever/invoke"), ("status", "200"), ("kb", "default")}
        retrievals = ("rag_http_requests_total", frozenset(labels))
        for _ in range(4):
            metrics = scrape(base)
            assert metrics[retrievals] == len(sent)
            assert metrics[("rag_retrieval_duration_seconds_count", frozenset())] == len(sent)
            assert metrics[("rag_store_chunks", frozenset({("kb", "default")}))] == 2

        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0, "\n".join(output.lines)
        for pid in (store_pid, *workers):
            assert not alive(pid), f"process {pid} outlived `rag serve`"
        assert not port_open(store_port) and not port_open(port)
        assert not any("Traceback" in line for line in output.lines), "\n".join(output.lines)
        assert not list(temp.glob("rag-metrics-*")), "the metrics directory outlived `rag serve`"
        printed = [line for line in output.lines if not LOG_LINE.match(line)]
        assert len(printed) == 2 and STORE_LINE.match(printed[1]), printed  # "serving on ...", "store: ..."
        assert all(isinstance(json.loads(line), dict) for line in output.lines if LOG_LINE.match(line))
    finally:
        kill_leftovers(serve, store_pid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal")
def test_the_store_dies_with_a_killed_rag_serve(env: dict[str, str]) -> None:
    serve, output = serve_two_workers(env, free_port())
    store_pid = 0
    try:
        store_pid = int(output.wait_for(STORE_LINE)[0][1])
        serve.kill()  # SIGKILL: no cleanup code of ours runs
        serve.wait()
        assert gone_soon(store_pid), "the milvus-lite server outlived a killed `rag serve`"
    finally:
        kill_leftovers(serve, store_pid)


def test_a_locked_lite_file_is_one_line_error(tmp_path: Path, env: dict[str, str]) -> None:
    data_dir = Path(env["MILVUS_URI"])
    data_dir.mkdir()
    with open(data_dir / "LOCK", "w") as lock:  # Milvus Lite's own lock: as if `rag serve` held it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = subprocess.run(
            [*RAG, "serve", "--workers", "2", "--port", str(free_port())],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rag: error: the Milvus Lite file"), result.stderr
    assert "in use by another process" in lines[0]


@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_workers_must_be_a_positive_whole_number(env: dict[str, str], value: str) -> None:
    result = subprocess.run(
        [*RAG, "serve", "--workers", value], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("rag serve: error: argument --workers: "), result.stderr
    assert "Traceback" not in result.stderr


def test_settings_reach_the_workers_through_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(
        _env_file=None,
        MILVUS_URI="./somewhere.db",
        MILVUS_TOKEN="user:secret",
        DEEPSEEK_API_KEY="sk-test",
        RAG_TOP_K=7,
        DEEPSEEK_TIMEOUT=12.5,
        RAG_SEARCH="sparse",
    )
    env = settings_environment(settings, "http://127.0.0.1:1234")
    for key in env:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        if value is not None:
            monkeypatch.setenv(key, value)
    worker = Settings(_env_file=None)
    assert worker.milvus_uri == "http://127.0.0.1:1234"
    expected = settings.model_copy(update={"milvus_uri": "http://127.0.0.1:1234"})
    assert worker.model_dump() == expected.model_dump()
    assert worker.deepseek_api_key is not None and worker.deepseek_api_key.get_secret_value() == "sk-test"


def test_a_store_that_cannot_start_says_why(tmp_path: Path) -> None:
    data = tmp_path / "not-a-directory.db"
    data.write_text("")
    with pytest.raises(StoreError, match=r"could not serve .*not-a-directory\.db: FileExistsError"):
        LiteServer.start(data, timeout=60)


def running_with_argument(argument: str) -> list[int]:
    """Process ids whose command line has `argument` (Linux /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if argument in cmdline.read_bytes().decode(errors="replace").split("\0"):
                found.append(int(cmdline.parent.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_store_that_does_not_answer_in_time_is_stopped(tmp_path: Path) -> None:
    data = tmp_path / "store.db"
    with pytest.raises(StoreError, match=r"did not answer within 0 s"):
        LiteServer.start(data, timeout=0)
    assert not running_with_argument(str(data)), "the milvus-lite server was left running"
