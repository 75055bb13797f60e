"""Paths, folders, zip archives and URLs → decoded text files, with a reason for each one skipped.

A LangChain `BaseLoader`: `DirectoryLoader` would not read zip archives or URLs, and it
reports failures only as log lines (`silent_errors`), while users need a per-file summary.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from langchain_core.document_loaders import BaseLoader
from langchain_core.documents import Document

from errors import SourceError
from loaders.archive_safety import DEFAULT_MAX_UNZIPPED_BYTES, archive_problem

TEXT_SUFFIXES = {".md", ".markdown", ".mdx", ".txt", ".text", ".rst"}
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
INCLUDE = re.compile(r"\{\{\s*(fragments/[^{}\s]+?\.md)\s*\}\}")


@dataclass
class Skipped:
    """A file that was not ingested, and why."""

    path: str
    reason: str
    root: str | None = None
    source: str | None = None


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
    """Yields one Document per text file; `skipped` lists the files that failed and why.

    Metadata: `source` (path relative to the ingested folder, the archive member path, or
    the file name of a single file) and `root` (the absolute folder, archive or URL given).
    """

    def __init__(
        self,
        paths: list[str],
        max_bytes: int = DEFAULT_MAX_BYTES,
        *,
        allow_private_urls: bool = True,
        max_unzipped_bytes: int = DEFAULT_MAX_UNZIPPED_BYTES,
    ):
        self.paths = paths
        self.max_bytes = max_bytes
        # False when the server fetches URLs for a client (loaders/url_safety.py).
        self.allow_private_urls = allow_private_urls
        self.max_unzipped_bytes = max_unzipped_bytes
        self.skipped: list[Skipped] = []

    def lazy_load(self) -> Iterator[Document]:
        """Read each path in turn; never raises for a single bad file."""
        for path in self.paths:
            try:
                if is_url(path):
                    yield from self._load_url(path)
                    continue
                local = Path(path).expanduser()
                if not local.exists():
                    self.skipped.append(Skipped(path, "no such file or folder"))
                elif local.is_dir():
                    yield from self._load_folder(local.resolve())
                elif zipfile.is_zipfile(local):
                    yield from self._load_zip(local.read_bytes(), str(local.resolve()))
                elif local.suffix.lower() == ".zip":
                    self.skipped.append(Skipped(path, "broken zip archive"))
                else:
                    yield from self._load_file(local, local.name, str(local.resolve()))
            except OSError as exc:
                self.skipped.append(Skipped(path, exc.strerror or str(exc)))

    def count_candidates(self) -> int:
        """How many files `lazy_load` will look at (cheap: names only)."""
        total = 0
        for path in self.paths:
            local = Path(path).expanduser()
            if is_url(path) or not local.exists():
                total += 1
            elif local.is_dir():
                total += sum(1 for _ in self._walk(local.resolve(), record=False))
            elif zipfile.is_zipfile(local):
                try:
                    with zipfile.ZipFile(local) as archive:
                        total += sum(1 for info in archive.infolist() if _is_text_member(info))
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
                    self.skipped.append(Skipped(dirpath, "symlink loop, not followed"))
                dirnames[:] = []
                continue
            seen.add((stat.st_dev, stat.st_ino))
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if _is_text_name(name) and not name.startswith("."):
                    yield Path(dirpath) / name

    def _load_folder(self, root: Path) -> Iterator[Document]:
        for file in self._walk(root):
            yield from self._load_file(file, file.relative_to(root).as_posix(), str(root))

    def _load_file(self, file: Path, source: str, root: str) -> Iterator[Document]:
        try:
            if file.stat().st_size > self.max_bytes:
                raise SourceError(too_large(self.max_bytes))
            text = decode_text(file.read_bytes(), self.max_bytes)
        except (SourceError, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.skipped.append(Skipped(str(file), reason, root, source))
            return
        base = Path(root) if Path(root).is_dir() else None
        if base is not None:
            text = expand_includes(text, lambda name: _read_fragment(base, name, self.max_bytes))
        yield Document(page_content=text, metadata={"source": source, "root": root})

    def _load_zip(self, data: bytes, root: str) -> Iterator[Document]:
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            self.skipped.append(Skipped(root, "broken zip archive"))
            return
        with archive:
            if problem := archive_problem(archive, self.max_unzipped_bytes):
                self.skipped.append(Skipped(root, problem))
                return
            # Hidden members and macOS `__MACOSX/._x.md` resource forks are skipped, as
            # hidden files are in folders: they are binary and would fail the ingest.
            names = {info.filename: info for info in archive.infolist() if _is_visible_member(info)}
            prefix = _common_prefix(list(names))

            def read(name: str) -> str:
                # A member can fail in many ways besides BadZipFile: encrypted (RuntimeError),
                # corrupt deflate data (zlib.error), unsupported compression
                # (NotImplementedError), truncated (EOFError). One bad member must not end
                # the whole ingest.
                try:
                    return decode_text(archive.read(name), self.max_bytes)
                except SourceError:
                    raise
                except Exception as exc:
                    raise SourceError(f"unreadable archive member ({type(exc).__name__}: {exc})") from exc

            def fragment(name: str) -> str | None:
                for candidate in (prefix + name, name):
                    if candidate in names:
                        try:
                            return read(candidate)
                        except SourceError:
                            return None
                return None

            for name, info in sorted(names.items()):
                if not _is_text_name(name):
                    continue
                member = f"{root}!{name}"
                try:
                    if info.file_size > self.max_bytes:
                        raise SourceError(too_large(self.max_bytes))
                    text = read(name)
                except SourceError as exc:
                    self.skipped.append(Skipped(member, str(exc), root, name))
                    continue
                text = expand_includes(text, fragment)
                yield Document(page_content=text, metadata={"source": name, "root": root})

    def _load_url(self, url: str) -> Iterator[Document]:
        import httpx

        from loaders.url_safety import fetch

        try:
            data = fetch(url, allow_private=self.allow_private_urls)
        except (httpx.HTTPError, SourceError) as exc:
            self.skipped.append(Skipped(url, f"download failed: {exc}"))
            return
        if data[:4] == b"PK\x03\x04":
            yield from self._load_zip(data, url)
            return
        try:
            text = decode_text(data, self.max_bytes)
        except SourceError as exc:
            self.skipped.append(Skipped(url, str(exc)))
            return
        name = PurePosixPath(httpx.URL(url).path).name or "index.md"
        yield Document(page_content=text, metadata={"source": name, "root": url})


def _is_text_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in TEXT_SUFFIXES


def _is_visible_member(info: zipfile.ZipInfo) -> bool:
    """A file member outside hidden folders and macOS's `__MACOSX/` metadata."""
    if info.is_dir():
        return False
    parts = PurePosixPath(info.filename).parts
    return not any(part.startswith(".") or part == "__MACOSX" for part in parts)


def _is_text_member(info: zipfile.ZipInfo) -> bool:
    """A member that `_load_zip` reads (and `count_candidates` counts)."""
    return _is_visible_member(info) and _is_text_name(info.filename)


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
