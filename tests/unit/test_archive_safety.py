"""Zip bombs are refused from the archive's directory, before anything is decompressed."""

from __future__ import annotations

import copy
import io
import zipfile
from pathlib import Path

from loaders.archive_safety import MAX_MEMBERS, archive_problem
from loaders.sources import DocumentSourceLoader


def archive(members: dict[str, bytes]) -> zipfile.ZipFile:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as out:
        for name, data in members.items():
            out.writestr(name, data)
    return zipfile.ZipFile(io.BytesIO(buffer.getvalue()))


def overlapping_bomb(copies: int) -> bytes:
    """The "non-recursive" bomb: many directory entries pointing at one compressed member."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as out:
        out.writestr("kernel.md", b"0" * 1_000_000)
        first = out.filelist[0]
        for n in range(copies):
            entry = copy.copy(first)
            entry.filename = f"copy{n}.md"
            out.filelist.append(entry)
    return buffer.getvalue()


def test_an_ordinary_archive_passes() -> None:
    assert archive_problem(archive({"docs/a.md": b"# A\n", "docs/b.md": b"# B\n"})) is None


def test_an_archive_that_expands_past_the_limit_is_refused() -> None:
    bomb = archive({f"part{n}.md": b"0" * 1_000_000 for n in range(5)})
    assert archive_problem(bomb, max_unzipped_bytes=10_000_000) is None
    assert archive_problem(bomb, max_unzipped_bytes=4 * 1024 * 1024) == (
        "zip archive expands to 5 MB, over the 4 MB limit"
    )


def test_overlapping_entries_are_refused() -> None:
    data = overlapping_bomb(50)
    assert len(data) < 10_000  # 51 MB declared in a few kB
    problem = archive_problem(zipfile.ZipFile(io.BytesIO(data)), max_unzipped_bytes=10**12)
    assert problem == "zip archive with overlapping entries (a zip bomb)"


def test_too_many_members_are_refused() -> None:
    many = archive({f"f{n}.md": b"x" for n in range(MAX_MEMBERS + 1)})
    assert (
        archive_problem(many) == f"zip archive with {MAX_MEMBERS + 1} files; at most {MAX_MEMBERS} are read"
    )


def test_the_loader_skips_a_bomb_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "bomb.zip"
    path.write_bytes(overlapping_bomb(5))
    loader = DocumentSourceLoader([str(path)])
    assert loader.load() == []
    assert [(s.path, s.reason) for s in loader.skipped] == [
        (str(path.resolve()), "zip archive with overlapping entries (a zip bomb)")
    ]
