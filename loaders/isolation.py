"""Run a blob parser in a worker process, under a time and a memory limit.

PDF and DOCX readers are pure Python over untrusted input: a PDF bomb (a huge content or
object stream, a page tree of millions of pages) can keep one busy for hours or fill the
memory, and nothing inside the reader can be interrupted from the ingest thread. A process
can be killed. One worker interpreter (`python -m loaders.isolation`) is started on the
first such file and reused for the next ones; a worker killed for going over the time
limit is replaced on the next file. Requests and answers are pickles over its pipes.

A plain child interpreter rather than multiprocessing: multiprocessing's `spawn` and
`forkserver` re-run the parent's `__main__` in each child, and `fork` would copy the
ingest's threads (gRPC, the reader thread) in whatever state they are in.
"""

from __future__ import annotations

import logging
import os
import pickle
import resource
import select
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from typing import IO, Any

from langchain_core.document_loaders import BaseBlobParser
from langchain_core.documents import Document
from langchain_core.documents.base import Blob

from errors import SourceError

HEADER = struct.Struct("!Q")
READY = b"ready\n"
STARTUP_SECONDS = 120.0


def describe(exc: BaseException) -> str:
    """The skip reason for an error raised while parsing."""
    if isinstance(exc, SourceError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "ran out of memory while reading (the memory limit per file)"
    if isinstance(exc, RecursionError):
        return "nested too deeply to read"
    return f"unreadable ({type(exc).__name__}: {exc})"


class _Worker:
    """One worker process and its pipes."""

    def __init__(self, memory_bytes: int):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "loaders.isolation", str(memory_bytes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        # Stopped when the parser is collected, or at exit, whichever comes first.
        self._finalizer = weakref.finalize(self, _stop, self.process)
        # The time limit is for reading a file, not for starting Python and importing the
        # readers: wait for the worker to say it is ready.
        assert self.process.stdout is not None
        try:
            if _read(self.process.stdout, len(READY), time.monotonic() + STARTUP_SECONDS) != READY:
                raise EOFError
        except (TimeoutError, EOFError) as exc:
            self.stop()
            raise SourceError("the document reader process did not start") from exc

    def ask(self, request: Any, seconds: float) -> Any:
        """Send a request and wait up to `seconds` for the answer; TimeoutError, EOFError."""
        assert self.process.stdin is not None and self.process.stdout is not None
        payload = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self.process.stdin.write(HEADER.pack(len(payload)) + payload)
            self.process.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise EOFError("the worker is gone") from exc
        deadline = time.monotonic() + seconds
        size = HEADER.unpack(_read(self.process.stdout, HEADER.size, deadline))[0]
        return pickle.loads(_read(self.process.stdout, size, deadline))

    def stop(self) -> None:
        self._finalizer()


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            stream.close()


def _read(stream: IO[bytes], size: int, deadline: float) -> bytes:
    """Exactly `size` bytes from a pipe by the deadline (TimeoutError) or EOFError."""
    fd = stream.fileno()
    chunks = []
    while size:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


class IsolatedParser(BaseBlobParser):
    """`parser`, run in a worker process that is killed after `seconds` on one file.

    Every failure, including a crash or a kill of the worker, becomes a SourceError with a
    reason for the ingest report. `close()` stops the worker (so does garbage collection).
    """

    def __init__(self, parser: BaseBlobParser, seconds: float, memory_bytes: int = 0):
        self.parser = parser
        self.seconds = seconds
        self.memory_bytes = memory_bytes
        self._worker: _Worker | None = None
        self._lock = threading.Lock()

    def lazy_parse(self, blob: Blob) -> Iterator[Document]:
        """Documents of `blob`, parsed in the worker."""
        # The data travels with the request: the path may be an archive member or a download.
        request = (self.parser, Blob(data=blob.as_bytes(), mimetype=blob.mimetype, path=blob.path))
        with self._lock:
            if self._worker is None:
                self._worker = _Worker(self.memory_bytes)
            worker = self._worker
            try:
                status, payload = worker.ask(request, self.seconds)
            except TimeoutError:
                self._discard()
                raise SourceError(
                    f"took longer than {self.seconds:g} s to read, the limit per file "
                    "(--file-timeout); a very large or malformed document"
                ) from None
            except EOFError:
                code = worker.process.wait()
                self._discard()
                raise SourceError(
                    f"the reader stopped without an answer (exit code {code}); a malformed "
                    "document, or one that needs more memory than allowed"
                ) from None
        if status != "ok":
            raise SourceError(payload)
        for document in payload:
            document.metadata["source"] = blob.source
            yield document

    def _discard(self) -> None:
        if self._worker is not None:
            self._worker.stop()
            self._worker = None

    def close(self) -> None:
        """Stop the worker process, if one was started."""
        with self._lock:
            self._discard()


def serve(memory_bytes: int) -> None:
    """The worker's loop: read (parser, blob), answer ("ok", documents) or ("error", reason)."""
    # Warm up: the formats' readers are imported once, before the first file.
    import loaders.formats
    import loaders.pdf  # noqa: F401

    logging.disable(logging.WARNING)  # readers' warnings about odd files would go nowhere
    requests = sys.stdin.buffer
    # Answers go on the original stdout; anything a library prints goes to stderr instead.
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    if memory_bytes:
        with open("/proc/self/statm") as statm:
            mapped = int(statm.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (mapped + memory_bytes, mapped + memory_bytes))
    answers.write(READY)
    answers.flush()
    while header := requests.read(HEADER.size):
        parser, blob = pickle.loads(requests.read(HEADER.unpack(header)[0]))
        try:
            answer: tuple[str, Any] = ("ok", list(parser.lazy_parse(blob)))
        except BaseException as exc:
            answer = ("error", describe(exc))
        try:
            payload = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
        except MemoryError:
            payload = pickle.dumps(("error", describe(MemoryError())))
        answers.write(HEADER.pack(len(payload)) + payload)
        answers.flush()


if __name__ == "__main__":
    serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
