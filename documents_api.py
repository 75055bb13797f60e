"""Documents over HTTP: upload files, zip archives or URLs, follow the ingest job, list, read
and delete documents. See docs/http-api.md.

    POST   /documents            multipart `files` (repeatable), or JSON {"urls": [...]} → 202 {"job_id"}
    GET    /jobs/{job_id}        state, files done of total, chunks added/updated/unchanged, skipped,
                                 errors; ?wait=S answers when the job finishes (at most S seconds)
    GET    /jobs                 the latest jobs
    GET    /documents            {"documents": [{"source", "root", "chunks", "ingested_at"}]}
    GET    /documents/{source}   its chunks (the source URL-encoded)
    DELETE /documents/{source}   removes its chunks

Each knowledge base has these routes under its prefix (/kb/{name}/documents, ...); a job is
seen only under the prefix of the knowledge base it was sent to.

An upload is checked while the request is answered (names, types, sizes, archives: a 4xx
and nothing stored when one is wrong), written to a folder of its own under RAG_JOBS_DIR,
and ingested by a worker thread with the CLI's own `ingest`, off the request path: questions
keep being answered meanwhile. One ingest or delete at a time per collection (a lock that
also holds across `rag serve --workers` processes), so two uploads of one file end with the
later version whole, never a mix. Jobs are kept in a SQLite file beside the uploads; a job
whose process stopped before it finished reads `interrupted`, never vanishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import sqlite3
import threading
import time
import uuid
import zipfile
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from queue import Queue
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from errors import RagError, SourceError
from loaders.archive_safety import archive_problem
from loaders.formats import MIME_TYPES
from loaders.url_safety import check_url
from settings import Settings

if TYPE_CHECKING:
    from loaders.markdown import Chunker
    from service import RagService
    from store.indexing import IngestReport

log = logging.getLogger(__name__)

# Uploaded documents are stored under this root, whatever temporary folder they were read
# from, so that uploading a file again finds its chunks (ids come from root and source).
UPLOAD_ROOT = "upload:"
MAX_FILES = 1000
MAX_URLS = 100
MAX_NAME_BYTES = 1024  # the `source` field holds 2048
ARCHIVE_SUFFIX = ".zip"
# Progress is written to the jobs database at most this often (and at every state change).
PROGRESS_EVERY_S = 0.5
# How long a delete waits for an ingest into the same collection before answering 409.
LOCK_WAIT_S = 10.0
# Characters no file name of a real upload holds (Windows forbids them), and that would make
# a name into a path, a drive, or markup in the prompt's passage attributes.
FORBIDDEN_NAME_CHARS = set('\\:<>"|?*')
INTERRUPTED = (
    "the server stopped before this job finished; send the documents again "
    "(chunks already stored are not embedded again)"
)

JobState = Literal["queued", "running", "done", "failed", "interrupted"]
FINISHED = ("done", "failed", "interrupted")
# The longest a GET /jobs/{id}?wait=S holds the request.
MAX_WAIT_S = 60.0


def supported_suffixes() -> list[str]:
    """What an upload may be: the documents the loaders read, and zip archives of them."""
    return sorted(set(MIME_TYPES) | {ARCHIVE_SUFFIX})


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------------- jobs


@dataclass
class Job:
    """An ingest job as it is stored and reported."""

    id: str
    collection: str
    kind: Literal["upload", "urls"]
    inputs: list[str]
    owner: str
    state: JobState = "queued"
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    files_done: int = 0
    files_total: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    total_chunks: int | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def public(self) -> dict[str, Any]:
        """The job as GET /jobs/{id} answers it."""
        data = asdict(self)
        del data["owner"]
        job_id = data.pop("id")
        for key in ("created_at", "started_at", "finished_at"):
            data[key] = _iso(data[key])
        return {"job_id": job_id, **data}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JobStore:
    """Jobs in a SQLite file: readable by every worker process, and after a restart."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # Who runs jobs here: this host, this process, and this app instance (an app stopped
        # and started again in one process, as tests do, must not pass for the old one).
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, collection TEXT NOT NULL, "
                "state TEXT NOT NULL, owner TEXT NOT NULL, created_at REAL NOT NULL, record TEXT NOT NULL)"
            )

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30.0)
        try:
            with db:  # one transaction, committed on success
                yield db
        finally:
            db.close()

    def save(self, job: Job) -> None:
        record = json.dumps(asdict(job))
        with self._connect() as db:
            db.execute(
                "INSERT INTO jobs (id, collection, state, owner, created_at, record) "
                "VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET state = excluded.state, owner = excluded.owner, "
                "record = excluded.record",
                (job.id, job.collection, job.state, job.owner, job.created_at, record),
            )

    def get(self, job_id: str) -> Job | None:
        with self._connect() as db:
            row = db.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        job = Job(**json.loads(row[0]))
        if job.state in ("queued", "running") and not self.owner_alive(job.owner):
            self.interrupt(job)
        return job

    def latest(self, limit: int, collection: str) -> list[Job]:
        """The latest jobs into one collection, newest first."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT id FROM jobs WHERE collection = ? ORDER BY created_at DESC LIMIT ?",
                (collection, limit),
            ).fetchall()
        return [job for (job_id,) in rows if (job := self.get(job_id)) is not None]

    def owner_alive(self, owner: str) -> bool:
        """Whether the process (and app instance) that owns a job may still finish it."""
        host, pid, instance = owner.rsplit(":", 2)
        if owner == self.owner:
            return True
        if host != socket.gethostname():
            return True  # another machine's worker: nothing here can tell
        if int(pid) == os.getpid():
            return False  # an earlier app in this process, stopped
        return _pid_alive(int(pid))

    def interrupt(self, job: Job) -> None:
        job.state = "interrupted"
        job.finished_at = job.finished_at or time.time()
        if INTERRUPTED not in job.errors:
            job.errors.append(INTERRUPTED)
        self.save(job)

    def interrupt_orphans(self) -> list[str]:
        """Mark the unfinished jobs of stopped processes interrupted; their ids."""
        with self._connect() as db:
            rows = db.execute("SELECT id FROM jobs WHERE state IN ('queued', 'running')").fetchall()
        return [
            job.id
            for (job_id,) in rows
            if (job := self.get(job_id)) is not None and job.state == "interrupted"
        ]

    def unfinished_ids(self) -> set[str]:
        with self._connect() as db:
            rows = db.execute("SELECT id FROM jobs WHERE state IN ('queued', 'running')").fetchall()
        return {job_id for (job_id,) in rows}


class JobStopped(Exception):
    """Raised between two files when the server stops during a job."""


@contextlib.contextmanager
def collection_lock(
    thread_lock: threading.Lock, lock_file: Path, timeout: float | None = None
) -> Iterator[None]:
    """Hold a collection for one ingest or delete: a thread lock in this process and an
    advisory file lock for other processes on this machine (released if the process dies).

    `timeout` None waits as long as it takes; otherwise TimeoutError after about that long.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    if not thread_lock.acquire(timeout=-1 if timeout is None else timeout):
        raise TimeoutError
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_file, "a+b") as handle:
            if deadline is None:
                fcntl.flock(handle, fcntl.LOCK_EX)
            else:
                # flock has no timeout: try, and try again briefly until the deadline.
                while True:
                    try:
                        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except OSError as exc:
                        if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                            raise TimeoutError from exc
                        time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        thread_lock.release()


# ---------------------------------------------------------------------------- uploads


def upload_name(raw: str | None) -> str:
    """The `source` of an uploaded file: its name, a relative POSIX path; HTTP 400 otherwise."""
    if not raw:
        raise HTTPException(400, "a file has no name: send every file with its file name")
    problem = None
    parts = raw.split("/")
    if any(ord(c) < 32 or ord(c) == 127 for c in raw):
        problem = "it holds control characters"
    elif raw.startswith("/"):
        problem = "it is an absolute path"
    elif FORBIDDEN_NAME_CHARS & set(raw):
        problem = f"it holds one of {''.join(sorted(FORBIDDEN_NAME_CHARS))}"
    elif any(part in ("", ".", "..") for part in parts):
        problem = "it has an empty, '.' or '..' part"
    elif any(part.startswith(".") for part in parts):
        problem = "hidden files are not ingested"
    elif len(raw.encode()) > MAX_NAME_BYTES:
        problem = f"it is longer than {MAX_NAME_BYTES} bytes"
    if problem:
        shown = raw if len(raw) <= 200 else raw[:200] + "…"
        raise HTTPException(
            400,
            f"file name {shown!r} refused: {problem}; send a relative name such as guide.md or docs/guide.md",
        )
    return raw


@dataclass
class Upload:
    """A checked upload, ready to be written into the job's folder."""

    name: str
    file: UploadFile
    archive: bool


def _suffix(name: str) -> str:
    return PurePosixPath(name).suffix.lower()


def check_uploads(uploads: list[UploadFile], settings: Settings) -> list[Upload]:
    """Every refusal an upload can get before it is stored: HTTP 4xx, nothing written.

    Blocking (archives are opened to read their directory): run it in a thread.
    """
    if not uploads:
        raise HTTPException(
            422, "no files: send documents or zip archives in the multipart form field `files`"
        )
    if len(uploads) > MAX_FILES:
        raise HTTPException(422, f"{len(uploads)} files in one request; at most {MAX_FILES}")
    checked: list[Upload] = []
    max_file = int(settings.max_file_mb * 1024 * 1024)
    for upload in uploads:
        name = upload_name(upload.filename)
        suffix = _suffix(name)
        if suffix not in supported_suffixes():
            raise HTTPException(
                415,
                f"{name}: unsupported type {suffix or '(no extension)'!r}; "
                f"send one of {', '.join(supported_suffixes())}",
            )
        size = upload.size if upload.size is not None else 0
        if size == 0:
            raise HTTPException(422, f"{name} is empty")
        archive = suffix == ARCHIVE_SUFFIX
        if not archive and size > max_file:
            raise HTTPException(413, f"{name} is larger than {settings.max_file_mb:g} MB (RAG_MAX_FILE_MB)")
        checked.append(Upload(name, upload, archive))
    _check_names([c.name for c in checked] + _archive_members(checked, settings))
    return checked


def _archive_members(uploads: list[Upload], settings: Settings) -> list[str]:
    """The member names of the archives, after refusing bombs and broken archives."""
    names: list[str] = []
    for upload in uploads:
        if not upload.archive:
            continue
        upload.file.file.seek(0)
        try:
            with zipfile.ZipFile(upload.file.file) as archive:
                if problem := archive_problem(archive, int(settings.max_unzipped_mb * 1024 * 1024)):
                    raise HTTPException(413, f"{upload.name}: {problem} (RAG_MAX_UNZIPPED_MB)")
                names += [info.filename for info in archive.infolist() if not info.is_dir()]
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise HTTPException(422, f"{upload.name}: not a readable zip archive") from exc
        finally:
            upload.file.file.seek(0)
    return names


def _check_names(names: list[str]) -> None:
    """One document per name in a job: two files of one name would both be stored."""
    seen: set[str] = set()
    folders: set[str] = set()
    for name in names:
        if name in seen or name in folders:
            raise HTTPException(400, f"{name} is sent twice in one upload (as a file or in an archive)")
        seen.add(name)
        folders.update(str(parent) for parent in PurePosixPath(name).parents if str(parent) != ".")
    if clash := seen & folders:
        raise HTTPException(400, f"{sorted(clash)[0]} is sent both as a file and as a folder")


def write_uploads(uploads: list[Upload], folder: Path) -> tuple[list[str], dict[str, str]]:
    """Write the uploads under `folder`: the paths to ingest, and the client's name of each
    path (to report skipped files by the names the client sent)."""
    files = folder / "files"
    paths: list[str] = []
    names: dict[str, str] = {}
    for n, upload in enumerate(uploads):
        target = folder / "archives" / str(n) / upload.name if upload.archive else files / upload.name
        # upload_name allows no '..', but the path decides: it must stay inside the job's folder.
        if not target.resolve().is_relative_to(folder.resolve()):
            raise HTTPException(400, f"file name {upload.name!r} refused: it leaves the upload folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        upload.file.file.seek(0)
        with open(target, "wb") as out:
            shutil.copyfileobj(upload.file.file, out, 1024 * 1024)
        if upload.archive:
            paths.append(str(target.resolve()))
            names[str(target.resolve())] = upload.name
    if files.is_dir():
        paths.insert(0, str(files.resolve()))
        names[str(files.resolve())] = ""
    return paths, names


def client_path(path: str, names: dict[str, str]) -> str:
    """A skipped file's path as the client named it (never the server's folders)."""
    for server_path, name in names.items():
        if path == server_path:
            return name
        for separator in ("/", "!"):  # a file in the folder, a member of an archive
            if path.startswith(server_path + separator):
                rest = path[len(server_path) + 1 :]
                return f"{name}{separator}{rest}" if name else rest
    return path


class UrlsRequest(BaseModel):
    """POST /documents with a JSON body."""

    urls: list[str] = Field(min_length=1, max_length=MAX_URLS)


# ---------------------------------------------------------------------------- the service


class DocumentsAPI:
    """The job runner of every knowledge base of an app: one jobs database and one worker
    thread (started and stopped with the app), so jobs run one at a time, in the order sent.
    Each job records its collection, which is that of the knowledge base it was sent to."""

    def __init__(self, services: Iterable[RagService], settings: Settings) -> None:
        self.services = {service.settings.collection: service for service in services}
        self.settings = settings
        self.folder = settings.jobs_path
        self.jobs: JobStore | None = None
        self._queue: Queue[tuple[Job, list[str], str | None, dict[str, str]] | None] = Queue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._locks: dict[str, threading.Lock] = {}
        self._chunkers: dict[str, Chunker] = {}
        self._running: str | None = None  # the job the worker is on
        self._submit_lock = threading.Lock()
        # Requests waiting for a job of this process to finish (GET /jobs/{id}?wait=S).
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._waiters_lock = threading.Lock()

    # Lifecycle

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The worker, for the life of the app (its lifespan runs this)."""
        await run_in_threadpool(self.start)
        try:
            yield
        finally:
            await run_in_threadpool(self.stop)

    def start(self) -> None:
        """Open the jobs database, mark jobs of stopped servers interrupted, start the worker."""
        self.jobs = JobStore(self.folder / "jobs.sqlite")
        for job_id in self.jobs.interrupt_orphans():
            log.warning("job %s was interrupted by a server stop", job_id)
        self._remove_leftovers()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._work, name="ingest-jobs", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop after the file being ingested; unfinished jobs read `interrupted`."""
        self._stopping.set()
        self._queue.put(None)
        if self._running is not None:
            log.warning("stopping: ingest job %s stops after its current file", self._running)
        if self._thread is not None:
            self._thread.join(timeout)
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None and self.jobs is not None:
                self.jobs.interrupt(item[0])
                self._discard(item[0])
                self._announce(item[0].id)

    def lock(self, collection: str, timeout: float | None = None) -> contextlib.AbstractContextManager[None]:
        """The lock of one collection (see collection_lock)."""
        thread_lock = self._locks.setdefault(collection, threading.Lock())
        return collection_lock(thread_lock, self.folder / "locks" / f"{collection}.lock", timeout)

    # Submitting

    def submit(
        self,
        kind: Literal["upload", "urls"],
        inputs: list[str],
        paths: list[str],
        root: str | None,
        names: dict[str, str],
        job_id: str,
        collection: str,
    ) -> Job:
        assert self.jobs is not None, "the documents API is not started"
        # Jobs are created, saved and queued in one step: they run in the order of their
        # `created_at`, the order GET /jobs lists them in.
        with self._submit_lock:
            job = Job(
                id=job_id,
                collection=collection,
                kind=kind,
                inputs=inputs,
                owner=self.jobs.owner,
                files_total=len(inputs),
            )
            self.jobs.save(job)
            self._queue.put((job, paths, root, names))
        return job

    def _remove_leftovers(self) -> None:
        """Remove the uploads of finished jobs, and of requests that failed before their job
        was saved (after an hour: another worker process may be saving one right now)."""
        assert self.jobs is not None
        uploads = self.folder / "uploads"
        if not uploads.is_dir():
            return
        unfinished = self.jobs.unfinished_ids()
        for leftover in uploads.iterdir():
            if leftover.name in unfinished:
                continue
            known = self.jobs.get(leftover.name) is not None
            if known or time.time() - leftover.stat().st_mtime > 3600:
                shutil.rmtree(leftover, ignore_errors=True)

    def job_folder(self, job_id: str) -> Path:
        return self.folder / "uploads" / job_id

    def _discard(self, job: Job) -> None:
        shutil.rmtree(self.job_folder(job.id), ignore_errors=True)

    # The worker

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            job, paths, root, names = item
            self._running = job.id
            try:
                if self._stopping.is_set():
                    raise JobStopped
                self._run(job, paths, root, names)
            except JobStopped:
                assert self.jobs is not None
                self.jobs.interrupt(job)
            finally:
                self._running = None
                self._discard(job)
                self._announce(job.id)

    def _announce(self, job_id: str) -> None:
        """Wake the requests waiting for this job."""
        with self._waiters_lock:
            waiters = self._waiters.pop(job_id, [])
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    async def wait(self, job_id: str, seconds: float, collection: str) -> Job:
        """The job once it is finished, or as it is after `seconds`.

        Woken by this process's worker; a job run by another worker process is read again
        every second.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            event = asyncio.Event()
            with self._waiters_lock:
                self._waiters.setdefault(job_id, []).append((loop, event))
            try:
                job = await run_in_threadpool(self.job, job_id, collection)
                remaining = deadline - loop.time()
                if job.state in FINISHED or remaining <= 0:
                    return job
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(remaining, 1.0))
            finally:
                with self._waiters_lock:
                    waiting = self._waiters.get(job_id, [])
                    if (loop, event) in waiting:
                        waiting.remove((loop, event))
                    if not waiting:
                        self._waiters.pop(job_id, None)

    def _run(self, job: Job, paths: list[str], root: str | None, names: dict[str, str]) -> None:
        from store.indexing import ingest

        assert self.jobs is not None
        jobs = self.jobs
        settings = self.settings
        last_saved = 0.0

        def progress(done: int, total: int, report: IngestReport) -> None:
            nonlocal last_saved
            job.files_done, job.files_total = done, total
            job.added, job.updated = report.added, report.updated
            job.unchanged, job.deleted = report.unchanged, report.deleted
            if time.monotonic() - last_saved >= PROGRESS_EVERY_S:
                jobs.save(job)
                last_saved = time.monotonic()
            if self._stopping.is_set():
                raise JobStopped

        with self.lock(job.collection):
            job.state, job.started_at = "running", time.time()
            jobs.save(job)
            try:
                service = self.services[job.collection]
                store = service.get_store()
                if job.collection not in self._chunkers:
                    self._chunkers[job.collection] = service.chunker()
                report = ingest(
                    paths,
                    store,
                    self._chunkers[job.collection],
                    root=root,
                    on_file=progress,
                    max_bytes=int(settings.max_file_mb * 1024 * 1024),
                    batch_size=settings.embedding_batch_size,
                    progress=False,
                    allow_private_urls=settings.allow_private_urls,
                    max_unzipped_bytes=int(settings.max_unzipped_mb * 1024 * 1024),
                    # Seal each written batch: Milvus Lite searches scan unsealed rows one by
                    # one, so questions asked during a long ingest slowed down as it went on
                    # (docs/benchmarks.md, "Answers during an upload").
                    seal_every=settings.embedding_batch_size,
                )
            except JobStopped:
                raise
            except RagError as exc:
                job.state, job.errors = "failed", [str(exc)]
            except Exception as exc:
                log.exception("ingest job %s failed", job.id)
                job.state, job.errors = (
                    "failed",
                    [f"internal error: {type(exc).__name__} (see the server log)"],
                )
            else:
                job.state = "done"
                job.files_done = job.files_total = report.files + len(report.skipped)
                job.added, job.updated, job.unchanged = report.added, report.updated, report.unchanged
                job.deleted, job.total_chunks = report.deleted, report.total_chunks
                job.skipped = [
                    {"path": client_path(s.path, names), "reason": s.reason} for s in report.skipped
                ]
            job.finished_at = time.time()
            jobs.save(job)

    # Requests

    async def accept_upload(self, request: Request, collection: str) -> Job:
        form = await request.form(max_files=MAX_FILES, max_fields=MAX_FILES)
        try:
            values = form.getlist("files")
            if any(not isinstance(v, UploadFile) for v in values):
                raise HTTPException(422, "the form field `files` must hold files, not text")
            uploads = await run_in_threadpool(
                check_uploads, [v for v in values if isinstance(v, UploadFile)], self.settings
            )
            job_id = uuid.uuid4().hex
            folder = self.job_folder(job_id)
            try:
                paths, names = await run_in_threadpool(write_uploads, uploads, folder)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
        finally:
            await form.close()
        return await run_in_threadpool(
            self.submit, "upload", [u.name for u in uploads], paths, UPLOAD_ROOT, names, job_id, collection
        )

    async def accept_urls(self, request: Request, collection: str) -> Job:
        try:
            body = UrlsRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            reasons = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" if e["loc"] else e["msg"]
                for e in exc.errors()
            )
            raise HTTPException(422, f'expected {{"urls": ["https://...", ...]}}: {reasons}') from None
        urls = list(dict.fromkeys(url.strip() for url in body.urls))
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise HTTPException(422, f"{url[:200]!r}: only http and https URLs can be ingested")
            if not self.settings.allow_private_urls:
                try:
                    await run_in_threadpool(check_url, url)
                except SourceError as exc:
                    raise HTTPException(400, str(exc)) from None
        return await run_in_threadpool(
            self.submit, "urls", urls, urls, None, {}, uuid.uuid4().hex, collection
        )

    def job(self, job_id: str, collection: str) -> Job:
        """A job into `collection`; 404 for any other, as for one that does not exist."""
        assert self.jobs is not None
        job = self.jobs.get(job_id)
        if job is None or job.collection != collection:
            raise HTTPException(404, f"no job {job_id[:64]!r}")
        return job

    def delete(self, source: str, root: str | None, service: RagService) -> int:
        from store.catalog import delete_document

        collection = service.settings.collection
        try:
            with self.lock(collection, timeout=LOCK_WAIT_S):
                return delete_document(service.get_store(), source, root)
        except TimeoutError:
            raise HTTPException(
                409,
                "an ingest into this collection is running; delete when it is done (GET /jobs)",
                headers={"Retry-After": "10"},
            ) from None


def make_documents_router(documents: DocumentsAPI, service: RagService, prefix: str = "") -> APIRouter:
    """The documents and jobs routes of one knowledge base (`service`), to be included at
    `prefix`; `documents` runs the jobs (its `running()` belongs in the app's lifespan)."""
    collection = service.settings.collection
    router = APIRouter(tags=["Documents"])

    @router.post(
        "/documents",
        status_code=202,
        # The body is read by hand (two content types, checked as it streams): described here.
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
                            },
                            "required": ["files"],
                        }
                    },
                    "application/json": {"schema": UrlsRequest.model_json_schema()},
                },
            }
        },
        responses={
            202: {"description": 'Accepted: `{"job_id"}`; follow it at GET /jobs/{job_id}.'},
            400: {
                "description": "A file name that is a path, two files of one name, a URL on a private network"
            },
            413: {"description": "Over RAG_MAX_UPLOAD_MB, RAG_MAX_FILE_MB or RAG_MAX_UNZIPPED_MB"},
            415: {"description": "A file type the loaders don't read, or neither multipart nor JSON"},
            422: {"description": "No files, an empty file, a broken archive, or no `urls`"},
        },
    )
    async def add_documents(request: Request) -> JSONResponse:
        """Ingest uploaded files and zip archives (multipart, field `files`) or `{"urls": [...]}`."""
        content_type = request.headers.get("content-type", "").lower()
        if content_type.startswith("multipart/form-data"):
            job = await documents.accept_upload(request, collection)
        elif content_type.startswith("application/json"):
            job = await documents.accept_urls(request, collection)
        else:
            raise HTTPException(
                415, 'send multipart/form-data with files in the field `files`, or JSON {"urls": [...]}'
            )
        return JSONResponse(
            status_code=202,
            content={"job_id": job.id, "state": job.state, "status_url": f"{prefix}/jobs/{job.id}"},
            headers={"Location": f"{prefix}/jobs/{job.id}"},
        )

    @router.get("/jobs/{job_id}")
    async def get_job(
        job_id: str,
        wait: float = Query(
            default=0, ge=0, le=MAX_WAIT_S, description="Seconds to wait for the job to finish."
        ),
    ) -> dict[str, Any]:
        """An ingest job: state, files done of total, chunks added/updated/unchanged, skipped, errors."""
        if wait:
            return (await documents.wait(job_id, wait, collection)).public()
        return (await run_in_threadpool(documents.job, job_id, collection)).public()

    @router.get("/jobs")
    def list_jobs(limit: int = Query(default=20, ge=1, le=100)) -> dict[str, Any]:
        """The latest jobs, newest first."""
        assert documents.jobs is not None
        return {"jobs": [job.public() for job in documents.jobs.latest(limit, collection)]}

    @router.get("/documents")
    def list_documents() -> dict[str, Any]:
        """Every stored document: its source, root, number of chunks and when it was last written."""
        from store.catalog import list_documents as listed

        entries = listed(service.get_store())
        return {
            "documents": [
                {"source": e.source, "root": e.root, "chunks": e.chunks, "ingested_at": _iso(e.ingested_at)}
                for e in entries
            ]
        }

    @router.get("/documents/{source:path}")
    def get_document(source: str, root: str | None = None) -> dict[str, Any]:
        """The chunks of one source (URL-encoded: guides%2Fintro.md), in order; `root` narrows it."""
        from store.catalog import document_chunks

        chunks = document_chunks(service.get_store(), source, root)
        if not chunks:
            raise HTTPException(404, f"no document {source!r}" + (f" under {root!r}" if root else ""))
        for chunk in chunks:
            chunk["ingested_at"] = _iso(chunk["ingested_at"])
        return {"source": source, "chunks": chunks}

    @router.delete("/documents/{source:path}")
    def delete_document(source: str, root: str | None = None) -> dict[str, Any]:
        """Delete the chunks of one source (every root that has it, unless `root` names one)."""
        deleted = documents.delete(source, root, service)
        if not deleted:
            raise HTTPException(404, f"no document {source!r}" + (f" under {root!r}" if root else ""))
        return {"source": source, "deleted": deleted}

    return router
