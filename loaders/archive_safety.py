"""Refusing zip bombs before anything is decompressed.

Python's zipfile never decompresses a member past the size its central directory declares
(a member that lies fails its CRC check instead), so the declared sizes bound what reading
an archive can cost: the check adds them up, counts the members, and refuses archives whose
entries overlap (the "non-recursive" bomb, where thousands of entries point at one block of
compressed data). Archives inside archives are never opened by the loaders.
"""

from __future__ import annotations

import zipfile

# Far more than a documentation set holds; each member is a file to read and split.
MAX_MEMBERS = 10_000
DEFAULT_MAX_UNZIPPED_BYTES = 1024 * 1024 * 1024
# A local file header is at least this long before the member's data (PKZIP APPNOTE 4.3.7).
LOCAL_HEADER_BYTES = 30


def _mb(size: int) -> str:
    return f"{size / (1024 * 1024):.0f} MB" if size >= 1024 * 1024 else f"{size} bytes"


def archive_problem(
    archive: zipfile.ZipFile, max_unzipped_bytes: int = DEFAULT_MAX_UNZIPPED_BYTES
) -> str | None:
    """Why `archive` must not be unpacked (a zip bomb), or None when it is safe to read."""
    members = [info for info in archive.infolist() if not info.is_dir()]
    if len(members) > MAX_MEMBERS:
        return f"zip archive with {len(members)} files; at most {MAX_MEMBERS} are read"
    total = sum(info.file_size for info in members)
    if total > max_unzipped_bytes:
        return f"zip archive expands to {_mb(total)}, over the {_mb(max_unzipped_bytes)} limit"
    ordered = sorted(members, key=lambda info: info.header_offset)
    for current, following in zip(ordered, ordered[1:], strict=False):
        if current.header_offset + LOCAL_HEADER_BYTES + current.compress_size > following.header_offset:
            return "zip archive with overlapping entries (a zip bomb)"
    return None
