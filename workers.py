"""`rag serve --workers N`: uvicorn worker processes that share one store.

Milvus Lite lets one process open a data directory, so with a Lite path in MILVUS_URI the
directory is served by a `milvus-lite server` child on a free loopback port, and the workers
connect to that. A server URI (Milvus, Zilliz Cloud, a `milvus-lite server` you run) is
shared as it is. Settings reach the workers through environment variables, because uvicorn
starts each worker from an import string (APP), not from our objects.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging.config
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from pydantic import SecretStr

from errors import StoreError
from settings import Settings, import_pymilvus_safely

LOOPBACK = "127.0.0.1"
# Opening a data directory replays its WAL; a large store can take a while.
START_TIMEOUT = 120.0
# How often a starting `milvus-lite server` is asked whether it answers yet.
READY_POLL = 0.2
# `milvus-lite server` drains requests for up to 5 s on SIGINT, then closes the store.
STOP_GRACE = 10.0
BIND_ATTEMPTS = 3
# The exception milvus-lite raises (milvus_lite.exceptions) when another process holds the
# data directory; its name ends the child's traceback.
LOCKED = "DataDirLockedError"
APP = "workers:create_app"  # server.create_app, see create_app below


def worker_count(text: str) -> int:
    """argparse type of --workers: an integer of at least 1."""
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {count}")
    return count


def free_port(host: str = LOOPBACK) -> int:
    """A port that nothing listens on now (the kernel's pick for port 0)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def lite_data_dir(settings: Settings) -> Path:
    """The directory behind a Milvus Lite MILVUS_URI, resolved as store.milvus does."""
    return Path(settings.milvus_uri).expanduser().resolve()


def die_with_parent() -> None:
    """On Linux, have the kernel send this process SIGTERM when its parent dies.

    If `rag serve` itself is killed (SIGKILL: no `finally` runs), its store and workers
    follow it instead of lingering, holding the data directory and the port.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))


def _store_child_setup() -> None:  # pragma: no cover - runs in the child, between fork and exec
    # Started in the background (`nohup`, `&`), we may inherit SIGINT ignored, and an ignored
    # signal stays ignored across exec: give it back its default so SIGINT stops the store
    # gracefully.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    die_with_parent()  # kept across exec


def port_taken(port: int, host: str = LOOPBACK) -> bool:
    """Whether something listens on the port now."""
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def milvus_answers(uri: str, timeout: float = 5.0) -> bool:
    """Whether a Milvus server answers at `uri`: a real call (its version) through pymilvus."""
    import_pymilvus_safely()
    from pymilvus import MilvusClient

    from store.milvus import GRPC_OPTIONS

    try:
        # pymilvus keeps the connection for later clients of this address: with the store's
        # keep-alive options, or the server's "too many pings" breaks them.
        client = MilvusClient(uri=uri, timeout=timeout, grpc_options=GRPC_OPTIONS)
        try:
            client.get_server_version()
        finally:
            client.close()
    except Exception:
        return False
    return True


class LiteServer:
    """A `milvus-lite server` child process serving one data directory on loopback."""

    def __init__(self, data_dir: Path, port: int, process: subprocess.Popen[str]) -> None:
        self.data_dir = data_dir
        self.port = port
        self.process = process
        self.tail: deque[str] = deque(maxlen=20)  # its last lines, for error messages
        self._done = threading.Event()  # its output ended (it exited)
        # Read its output for as long as it runs: a full pipe would block it.
        threading.Thread(target=self._read, name="milvus-lite-output", daemon=True).start()

    @property
    def uri(self) -> str:
        """The MILVUS_URI that reaches it."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        """Its process id."""
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.tail.append(line.rstrip())
        self._done.set()

    @classmethod
    def start(cls, data_dir: Path, timeout: float = START_TIMEOUT) -> LiteServer:
        """Start it and wait until it answers; StoreError if it exits or times out first."""
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, BIND_ATTEMPTS + 1):
            port = free_port()
            command = [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data_dir)]
            process = subprocess.Popen(
                [*command, "--host", LOOPBACK, "--port", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                # Unbuffered, its last lines are there to quote if it fails.
                # Importing pymilvus rejects a MILVUS_URI that is a path (here or in .env);
                # empty is skipped and keeps .env's from being loaded (see settings.py).
                env={**os.environ, "PYTHONUNBUFFERED": "1", "MILVUS_URI": ""},
                # Its own process group: Ctrl-C in the terminal reaches `rag serve` and its
                # workers, which stop first; the store is stopped after them.
                process_group=0 if os.name == "posix" else None,
                preexec_fn=_store_child_setup if os.name == "posix" else None,
            )
            server = cls(data_dir, port, process)
            try:
                server._wait_ready(timeout)
                return server
            except StoreError:
                server.stop()
                # The port was free a moment ago; another program may have taken it since.
                if port_taken(port) and attempt < BIND_ATTEMPTS:
                    continue
                raise
            except BaseException:  # Ctrl-C or SIGTERM while waiting
                server.stop()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait_ready(self, timeout: float) -> None:
        # It opens the data directory, then listens: a connection means it is about ready, and
        # a call that Milvus answers (not whatever else might hold the port) means it is.
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if port_taken(self.port) and milvus_answers(self.uri):
                return
            if time.monotonic() > deadline:
                raise StoreError(
                    f"milvus-lite server did not answer within {timeout:.0f} s on {self.data_dir}"
                    + (f"; it printed: {self.tail[-1]}" if self.tail else "")
                )
            self._done.wait(READY_POLL)  # returns at once if it exits meanwhile
        self._done.wait(5)  # its last lines
        last = self.tail[-1] if self.tail else f"exit code {self.process.returncode}"
        if LOCKED in last:
            raise StoreError(
                f"the Milvus Lite file {self.data_dir} is in use by another process (Milvus Lite "
                "allows one process per file): stop it, or set MILVUS_URI to the server that holds it"
            )
        raise StoreError(f"milvus-lite server could not serve {self.data_dir}: {last}")

    def stop(self) -> None:
        """Stop it: SIGINT (it closes the store cleanly), then SIGKILL after STOP_GRACE seconds."""
        if self.process.poll() is None:
            try:
                self.process.send_signal(signal.SIGINT)
                self.process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                pass
            finally:
                if self.process.poll() is None:
                    self.process.kill()
                    self.process.wait()
        self._done.wait(5)  # its last lines, if it still had any to give

    def __enter__(self) -> LiteServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def settings_environment(settings: Settings, milvus_uri: str) -> dict[str, str | None]:
    """Environment variables that make a worker's `Settings()` equal `settings`.

    None means unset. MILVUS_URI is replaced by the shared store's URI.
    """
    env: dict[str, str | None] = {}
    dumped = settings.model_dump(mode="json")  # JSON mode masks secrets: those are read below
    for name, field in type(settings).model_fields.items():
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif value is not None:
            value = dumped[name]
        # pydantic-settings reads lists and dicts from the environment as JSON.
        text = json.dumps(value) if isinstance(value, list | dict) else str(value)
        env[field.alias or name.upper()] = None if value is None else text
    env["MILVUS_URI"] = milvus_uri
    return env


@contextlib.contextmanager
def environment(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set (or, for None, unset) environment variables, and put the old values back after."""
    saved = {key: os.environ.get(key) for key in values}
    try:
        _set_environment(values)
        yield
    finally:
        _set_environment(saved)


def _set_environment(values: Mapping[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def threads_per_worker(workers: int) -> int:
    """PyTorch threads per worker so that N workers embedding at once don't oversubscribe."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // workers)


def create_app() -> Any:
    """uvicorn's app factory in each worker: `server.create_app()`, bound to `rag serve`'s life."""
    import multiprocessing

    die_with_parent()
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid != os.getppid():  # it died before we asked
        raise SystemExit("rag serve stopped while this worker started")
    from observability import log_config
    from server import create_app as create_server_app
    from settings import get_settings

    # pymilvus configures its own logger when it is first imported, which would undo the log
    # configuration uvicorn applied in this worker: import it, then apply ours again.
    settings = get_settings()
    import_pymilvus_safely()
    logging.config.dictConfig(log_config(settings))
    return create_server_app(settings)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def serve(settings: Settings, host: str, port: int, workers: int, out: TextIO) -> None:
    """Serve the app with `workers` uvicorn processes until SIGINT or SIGTERM."""
    import uvicorn

    from observability import log_config

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    # Until uvicorn installs its own handlers, SIGTERM unwinds like Ctrl-C, so the store
    # started below is stopped. uvicorn's handlers stay until we put these back, after the
    # store has stopped: a second signal cannot cut that short.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with contextlib.ExitStack() as stack:
            uri = settings.milvus_uri
            if not settings.milvus_is_server:
                store = stack.enter_context(LiteServer.start(lite_data_dir(settings)))
                uri = store.uri
                print(
                    f"store: milvus-lite server (pid {store.pid}) on {uri}, data in {store.data_dir}",
                    file=out,
                    flush=True,
                )
            env = settings_environment(settings, uri)
            env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS") or str(threads_per_worker(workers))
            # Each worker writes its metrics to files here, and any worker's /metrics sums them
            # (prometheus-client's multiprocess mode). A directory of our own starts empty and
            # goes when we stop; one the user set is theirs to empty.
            if not settings.prometheus_multiproc_dir:
                env["PROMETHEUS_MULTIPROC_DIR"] = stack.enter_context(
                    tempfile.TemporaryDirectory(prefix="rag-metrics-")
                )
            stack.enter_context(environment(env))
            uvicorn.run(
                APP,
                factory=True,
                workers=workers,
                host=host,
                port=port,
                log_level="info",
                log_config=log_config(settings),
            )
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
