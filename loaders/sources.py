"""Paths, folders, zip archives and URLs → one Document per file, with a reason for each one skipped.

Files become LangChain `Blob`s with a mime type (from the name, or a URL's Content-Type),
and LangChain's `MimeTypeBasedParser` hands each to its format's parser (loaders.formats).
`DirectoryLoader` and `GenericLoader` would not read zip archives or URLs, and report
failures only as log lines, while users need a per-file summary: what was read, what was
skipped and why, and which files were passed over for their type.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from langchain_core.document_loaders import BaseBlobParser, BaseLoader
from langchain_core.documents import Document
from langchain_core.documents.base import Blob

from errors import SourceError
from loaders.archive_safety import DEFAULT_MAX_UNZIPPED_BYTES, archive_problem
from loaders.formats import (
    DOCX,
    FORMATS,
    MIME_TYPES,
    PLAIN_TEXT,
    TEXT_TYPES,
    ZIP,
    Limits,
    close_parser,
    content_type,
    make_parser,
    mime_type_of,
    unsupported_reason,
)
from loaders.markdown import text_hash

DEFAULT_MAX_BYTES = Limits.max_bytes
INCLUDE = re.compile(r"\{\{\s*(fragments/[^{}\s]+?\.md)\s*\}\}")
# A URL answered with one of these says nothing about its format: the name decides.
GENERIC_TYPES = {None, "application/octet-stream", "binary/octet-stream", "application/x-download"}
UNSUPPORTED = "unsupported"
FAILED = "failed"


@dataclass
class Skipped:
    """A file that was not ingested, and why.

    `kind` is "failed" for a file of a supported type that could not be read, and
    "unsupported" for one passed over for its type.
    """

    path: str
    reason: str
    root: str | None = None
    source: str | None = None
    kind: str = FAILED


def is_url(path: str) -> bool:
    """True for http(s) URLs."""
    return path.startswith(("http://", "https://"))


def too_large(max_bytes: int) -> str:
    """The reason given for a file over the size limit ("larger than 20 MB, ...")."""
    # Below 1 MB (`--max-mb 0.5`) the limit is given in bytes, not as "0 MB".
    mib = 1024 * 1024
    limit = f"{max_bytes / mib:g} MB" if max_bytes >= mib else f"{max_bytes} bytes"
    return f"larger than {limit}, not a document"


def decode_text(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """UTF-8 text of a file, or SourceError saying why it is not a text document."""
    if len(data) > max_bytes:
        raise SourceError(too_large(max_bytes))
    if b"\x00" in data[:8192]:
        raise SourceError("binary file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SourceError(f"not UTF-8 text (byte {exc.start})") from exc
    if not text.strip():
        raise SourceError("empty file")
    return text.replace("\r\n", "\n")


class DocumentSourceLoader(BaseLoader):
    """Yields one Document per file read; `skipped` lists the files that were not, and why.

    Metadata: `source` (path relative to the ingested folder, the archive member path, or
    the file name of a single file or URL), `root` (the absolute folder, archive or URL
    given), `format` (markdown, text, html, pdf, docx), `source_hash` (of the bytes read:
    chunk ids are keyed on it) and, where the format has one, `title`.
    """

    def __init__(
        self,
        paths: list[str],
        max_bytes: int = DEFAULT_MAX_BYTES,
        limits: Limits | None = None,
        parser: BaseBlobParser | None = None,
        *,
        allow_private_urls: bool = True,
        max_unzipped_bytes: int = DEFAULT_MAX_UNZIPPED_BYTES,
    ):
        self.paths = paths
        self.limits = limits or Limits(max_bytes=max_bytes)
        self.max_bytes = self.limits.max_bytes
        self.parser = parser or make_parser(self.limits)
        # False when the server fetches URLs for a client (loaders/url_safety.py).
        self.allow_private_urls = allow_private_urls
        self.max_unzipped_bytes = max_unzipped_bytes
        self.skipped: list[Skipped] = []

    # --- Documents ------------------------------------------------------------------------

    def lazy_load(self) -> Iterator[Document]:
        """Read each path in turn; never raises for a single bad file."""
        try:
            for blob in self.yield_blobs():
                document = self._parse(blob)
                if document is not None:
                    yield document
        finally:
            close_parser(self.parser)

    def _parse(self, blob: Blob) -> Document | None:
        meta = blob.metadata
        try:
            documents = list(self.parser.lazy_parse(blob))
            if not documents or not any(d.page_content.strip() for d in documents):
                raise SourceError("no text in the file")
        except SourceError as exc:
            self._skip(str(blob.path), str(exc), meta["root"], meta["source"])
            return None
        except UnicodeDecodeError as exc:
            self._skip(str(blob.path), f"not UTF-8 text (byte {exc.start})", meta["root"], meta["source"])
            return None
        except Exception as exc:  # a reader's own error: this file fails, the ingest goes on
            kind = FORMATS.get(blob.mimetype or "", "file")
            reason = f"unreadable {kind} ({type(exc).__name__}: {exc})"
            self._skip(str(blob.path), reason, meta["root"], meta["source"])
            return None
        first = documents[0]
        text = "\n\n".join(d.page_content for d in documents) if len(documents) > 1 else first.page_content
        metadata = {
            "source": meta["source"],
            "root": meta["root"],
            "format": FORMATS.get(blob.mimetype or "", "text"),
            "source_hash": meta["source_hash"],
        }
        for key in ("title", "pages"):
            if first.metadata.get(key):
                metadata[key] = first.metadata[key]
        return Document(page_content=text, metadata=metadata)

    def _skip(self, path: str, reason: str, root: str | None = None, source: str | None = None) -> None:
        self.skipped.append(Skipped(path, reason, root, source))

    def _unsupported(self, path: str, name: str, root: str, source: str) -> None:
        self.skipped.append(Skipped(path, unsupported_reason(name), root, source, kind=UNSUPPORTED))

    # --- Blobs ----------------------------------------------------------------------------

    def yield_blobs(self) -> Iterator[Blob]:
        """One Blob per supported file under the paths (metadata: source, root, source_hash)."""
        for path in self.paths:
            try:
                if is_url(path):
                    yield from self._url_blobs(path)
                    continue
                local = Path(path).expanduser()
                if not local.exists():
                    self._skip(path, "no such file or folder")
                elif local.is_dir():
                    yield from self._folder_blobs(local.resolve())
                elif zipfile.is_zipfile(local) and mime_type_of(local.name) != DOCX:
                    yield from self._zip_blobs(local.read_bytes(), str(local.resolve()))
                elif local.suffix.lower() == ".zip":
                    self._skip(path, "broken zip archive")
                else:
                    yield from self._file_blobs(local, local.name, str(local.resolve()))
            except OSError as exc:
                self._skip(path, exc.strerror or str(exc))

    def count_candidates(self) -> int:
        """How many files `lazy_load` will try to read (cheap: names only)."""
        total = 0
        for path in self.paths:
            local = Path(path).expanduser()
            if is_url(path) or not local.exists():
                total += 1
            elif local.is_dir():
                total += sum(1 for f in self._walk(local.resolve(), record=False) if mime_type_of(f.name))
            elif zipfile.is_zipfile(local) and mime_type_of(local.name) != DOCX:
                try:
                    with zipfile.ZipFile(local) as archive:
                        total += sum(
                            1
                            for info in archive.infolist()
                            if _is_visible_member(info) and mime_type_of(info.filename)
                        )
                except (zipfile.BadZipFile, OSError, ValueError, EOFError):
                    total += 1
            else:
                total += 1
        return total

    def _walk(self, root: Path, record: bool = True) -> Iterator[Path]:
        seen: set[tuple[int, int]] = set()
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            stat = os.stat(dirpath)
            if (stat.st_dev, stat.st_ino) in seen:
                if record:
                    self._skip(dirpath, "symlink loop, not followed")
                dirnames[:] = []
                continue
            seen.add((stat.st_dev, stat.st_ino))
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if not name.startswith("."):
                    yield Path(dirpath) / name

    def _folder_blobs(self, root: Path) -> Iterator[Blob]:
        for file in self._walk(root):
            source = file.relative_to(root).as_posix()
            if mime_type_of(file.name) is None:
                self._unsupported(str(file), file.name, str(root), source)
                continue
            yield from self._file_blobs(file, source, str(root))

    def _file_blobs(self, file: Path, source: str, root: str) -> Iterator[Blob]:
        mime = mime_type_of(file.name)
        if mime is None:
            self._unsupported(str(file), file.name, root, source)
            return
        try:
            if file.stat().st_size > self.max_bytes:
                raise SourceError(too_large(self.max_bytes))
            data = file.read_bytes()
            base = Path(root) if Path(root).is_dir() else None
            blob = self._blob(
                data,
                mime,
                str(file),
                source,
                root,
                include=(lambda name: _read_fragment(base, name, self.max_bytes)) if base else None,
            )
        except (SourceError, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self._skip(str(file), reason, root, source)
            return
        yield blob

    def _blob(
        self,
        data: bytes,
        mime: str,
        path: str,
        source: str,
        root: str,
        include: object = None,
        charset: str | None = None,
    ) -> Blob:
        """A Blob for the parsers: text decoded (and includes expanded), other formats as bytes."""
        if len(data) > self.max_bytes:
            raise SourceError(too_large(self.max_bytes))
        if mime in TEXT_TYPES:
            text = expand_includes(decode_text(data, self.max_bytes), include)
            return Blob.from_data(
                text,
                mime_type=mime,
                path=path,
                metadata={"source": source, "root": root, "source_hash": text_hash(text)},
            )
        if not data.strip():
            raise SourceError("empty file")
        return Blob.from_data(
            data,
            mime_type=mime,
            path=path,
            encoding=charset or "utf-8",
            metadata={"source": source, "root": root, "source_hash": text_hash(data)},
        )

    def _zip_blobs(self, data: bytes, root: str) -> Iterator[Blob]:
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            self._skip(root, "broken zip archive")
            return
        with archive:
            if problem := archive_problem(archive, self.max_unzipped_bytes):
                self._skip(root, problem)
                return
            # Hidden members and macOS `__MACOSX/._x.md` resource forks are skipped, as
            # hidden files are in folders: they are binary and would fail the ingest.
            names = {info.filename: info for info in archive.infolist() if _is_visible_member(info)}
            prefix = _common_prefix(list(names))

            def read(name: str) -> bytes:
                # A member can fail in many ways besides BadZipFile: encrypted (RuntimeError),
                # corrupt deflate data (zlib.error), unsupported compression
                # (NotImplementedError), truncated (EOFError). One bad member must not end
                # the whole ingest.
                try:
                    return archive.read(name)
                except Exception as exc:
                    raise SourceError(f"unreadable archive member ({type(exc).__name__}: {exc})") from exc

            def fragment(name: str) -> str | None:
                for candidate in (prefix + name, name):
                    if candidate in names:
                        try:
                            return decode_text(read(candidate), self.max_bytes)
                        except SourceError:
                            return None
                return None

            for name, info in sorted(names.items()):
                member = f"{root}!{name}"
                mime = mime_type_of(name)
                if mime is None:
                    self._unsupported(member, name, root, name)
                    continue
                try:
                    if info.file_size > self.max_bytes:
                        raise SourceError(too_large(self.max_bytes))
                    blob = self._blob(read(name), mime, member, name, root, include=fragment)
                except SourceError as exc:
                    self._skip(member, str(exc), root, name)
                    continue
                yield blob

    def _url_blobs(self, url: str) -> Iterator[Blob]:
        import httpx

        from loaders.url_safety import fetch

        try:
            data, header = fetch(url, allow_private=self.allow_private_urls)
        except (httpx.HTTPError, SourceError) as exc:
            self._skip(url, f"download failed: {exc}")
            return
        name = PurePosixPath(httpx.URL(url).path).name
        declared, charset = content_type(header)
        by_name = mime_type_of(name)
        if declared == ZIP or (data[:4] == b"PK\x03\x04" and declared != DOCX and by_name != DOCX):
            yield from self._zip_blobs(data, url)
            return
        mime = declared
        if declared in GENERIC_TYPES or (declared == PLAIN_TEXT and by_name in TEXT_TYPES):
            mime = by_name  # e.g. raw markdown served as text/plain
        if mime not in FORMATS:
            reason = f"unsupported content type {declared or '(none)'}"
            self.skipped.append(Skipped(url, reason, kind=UNSUPPORTED))
            return
        if not name:
            name = "index" + next((s for s, m in MIME_TYPES.items() if m == mime), "")
        try:
            yield self._blob(data, mime, url, name, url, charset=charset)
        except SourceError as exc:
            self._skip(url, str(exc))


def _is_visible_member(info: zipfile.ZipInfo) -> bool:
    """A file member outside hidden folders and macOS's `__MACOSX/` metadata."""
    if info.is_dir():
        return False
    parts = PurePosixPath(info.filename).parts
    return not any(part.startswith(".") or part == "__MACOSX" for part in parts)


def _common_prefix(names: list[str]) -> str:
    """The folder every member shares (an archive's top folder), with a trailing slash."""
    if not names:
        return ""
    try:
        parts = os.path.commonpath(names) if len(names) > 1 else str(PurePosixPath(names[0]).parent)
    except ValueError:  # absolute and relative member names mixed
        return ""
    return "" if parts in ("", ".") else parts.rstrip("/") + "/"


def _read_fragment(root: Path, name: str, max_bytes: int) -> str | None:
    target = (root / name).resolve()
    if not target.is_relative_to(root) or not target.is_file():
        return None
    try:
        return decode_text(target.read_bytes(), max_bytes)
    except (SourceError, OSError):
        return None


def expand_includes(text: str, read: object) -> str:
    """Replace `{{fragments/x.md}}` site directives with the fragment's text when it exists."""
    if "{{" not in text:
        return text
    reader = read if callable(read) else None
    if reader is None:
        return text

    def replace(match: re.Match[str]) -> str:
        fragment = reader(match.group(1))
        return fragment.strip() if fragment else match.group(0)

    return INCLUDE.sub(replace, text)
