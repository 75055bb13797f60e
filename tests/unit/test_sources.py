"""DocumentSourceLoader: folders, single files, zip archives, skip reasons, includes."""

from __future__ import annotations

import io
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import pytest
from langchain_core.documents import Document

from errors import SourceError
from loaders.sources import DocumentSourceLoader, Skipped, decode_text, expand_includes

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus"


@pytest.fixture(scope="module")
def corpus() -> Path:
    assert (CORPUS / "milvus-docs" / "faq" / "operational_faq.md").is_file(), f"corpus missing at {CORPUS}"
    return CORPUS


def load(*paths: Path | str, **kwargs: Any) -> tuple[dict[str, Document], list[Skipped]]:
    loader = DocumentSourceLoader([str(p) for p in paths], **kwargs)
    docs = loader.load()
    by_source = {d.metadata["source"]: d for d in docs}
    assert len(by_source) == len(docs), "a source was yielded twice"
    return by_source, loader.skipped


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def make_zip(path: Path, members: dict[str, str | bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


# --- folders ---------------------------------------------------------------------------


def test_folder_yields_nested_text_files_with_relative_posix_sources(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    write(root / "a.md", "# A\n\nalpha\n")
    write(root / "notes.txt", "plain notes\n")
    write(root / "sub" / "deeper" / "b.markdown", "# B\n\nbeta\n")
    write(root / "guide.rst", "Guide\n=====\n")
    write(root / "picture.png", b"\x89PNG\r\n\x1a\n\x00\x00")
    write(root / "data.json", '{"a": 1}')
    write(root / ".hidden.md", "# hidden\n")
    write(root / ".git" / "HEAD.md", "# inside a hidden folder\n")

    docs, skipped = load(root)

    assert sorted(docs) == ["a.md", "guide.rst", "notes.txt", "sub/deeper/b.markdown"]
    # Files of other types are listed with their type; hidden ones are not.
    assert {(s.source, s.reason, s.kind) for s in skipped} == {
        ("picture.png", "unsupported file type .png", "unsupported"),
        ("data.json", "unsupported file type .json", "unsupported"),
    }
    for source, doc in docs.items():
        assert doc.metadata["root"] == str(root.resolve())
        assert doc.page_content == (root / source).read_text(encoding="utf-8")


def test_folder_given_as_relative_path_gets_absolute_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "kb" / "x.md", "# X\n\nx\n")
    monkeypatch.chdir(tmp_path)
    docs, _ = load("kb")
    assert docs["x.md"].metadata["root"] == str((tmp_path / "kb").resolve())
    assert os.path.isabs(docs["x.md"].metadata["root"])


def test_single_file_source_is_its_name(tmp_path: Path) -> None:
    file = write(tmp_path / "some" / "dir" / "faq.md", "# FAQ\n\nanswer\n")
    docs, skipped = load(file)
    assert list(docs) == ["faq.md"]
    assert docs["faq.md"].metadata["root"] == str(file.resolve())
    assert docs["faq.md"].page_content == "# FAQ\n\nanswer\n"
    assert skipped == []


def test_crlf_and_bom_are_normalised(tmp_path: Path) -> None:
    file = write(tmp_path / "win.md", b"\xef\xbb\xbf# Title\r\n\r\nline\r\n")
    docs, _ = load(file)
    assert docs["win.md"].page_content == "# Title\n\nline\n"


# --- zip archives ----------------------------------------------------------------------


def test_zip_sources_are_member_paths(tmp_path: Path) -> None:
    archive = make_zip(
        tmp_path / "kb.zip",
        {
            "docs/guide/intro.md": "# Intro\n\nhello\n",
            "docs/readme.txt": "read me\n",
            "docs/logo.png": b"\x89PNG\x00\x00",
        },
        compression=zipfile.ZIP_DEFLATED,
    )
    docs, skipped = load(archive)
    assert sorted(docs) == ["docs/guide/intro.md", "docs/readme.txt"]
    assert {d.metadata["root"] for d in docs.values()} == {str(archive.resolve())}
    assert docs["docs/guide/intro.md"].page_content == "# Intro\n\nhello\n"
    assert [(s.path, s.reason, s.kind) for s in skipped] == [
        (f"{archive.resolve()}!docs/logo.png", "unsupported file type .png", "unsupported")
    ]


def test_zip_bad_members_are_skipped_with_member_path(tmp_path: Path) -> None:
    archive = make_zip(
        tmp_path / "kb.zip",
        {
            "ok.md": "# ok\n\nfine\n",
            "empty.md": "",
            "bin.md": b"a\x00b",
            "latin.md": "caf\xe9".encode("latin-1"),
        },
    )
    docs, skipped = load(archive)
    assert list(docs) == ["ok.md"]
    reasons = {s.source: s.reason for s in skipped}
    assert set(reasons) == {"empty.md", "bin.md", "latin.md"}
    assert "empty" in reasons["empty.md"]
    assert "binary" in reasons["bin.md"]
    assert "UTF-8" in reasons["latin.md"]
    assert all(s.root == str(archive.resolve()) for s in skipped)
    assert all(s.path == f"{archive.resolve()}!{s.source}" for s in skipped)


def test_zip_includes_resolve_against_the_archive_top_folder(tmp_path: Path) -> None:
    archive = make_zip(
        tmp_path / "site.zip",
        {
            "site/faq/q.md": "# Q\n\n{{fragments/answer.md}}\n\n{{fragments/missing.md}}\n",
            "site/fragments/answer.md": "The answer is 42.\n",
        },
    )
    docs, _ = load(archive)
    text = docs["site/faq/q.md"].page_content
    assert "The answer is 42." in text
    assert "{{fragments/answer.md}}" not in text
    assert "{{fragments/missing.md}}" in text


def test_zip_hidden_members_and_macos_resource_forks_are_ignored(tmp_path: Path) -> None:
    # Finder's "Compress" adds __MACOSX/._name entries: binary AppleDouble files.
    archive = make_zip(
        tmp_path / "mac.zip",
        {
            "docs/a.md": "# A\n\n{{fragments/f.md}}\n",
            "docs/fragments/f.md": "fragment text\n",
            "__MACOSX/docs/._a.md": b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X",
            "docs/.draft.md": "# draft\n",
        },
    )
    loader = DocumentSourceLoader([str(archive)])
    docs = {d.metadata["source"]: d for d in loader.lazy_load()}
    assert sorted(docs) == ["docs/a.md", "docs/fragments/f.md"]
    assert loader.skipped == []
    # The common top folder is still found, so the include expands.
    assert "fragment text" in docs["docs/a.md"].page_content
    assert loader.count_candidates() == len(docs)


def _set_encrypted_flag(data: bytes, name: str) -> bytes:
    """Mark one member as (traditionally) encrypted in the local and central headers."""
    raw = bytearray(data)
    encoded = name.encode()
    for signature, flag_offset, name_offset in ((b"PK\x03\x04", 6, 30), (b"PK\x01\x02", 8, 46)):
        for match in re.finditer(re.escape(signature), bytes(raw)):
            start = match.start()
            if bytes(raw[start + name_offset : start + name_offset + len(encoded)]) == encoded:
                raw[start + flag_offset] |= 0x01
    return bytes(raw)


def test_unreadable_zip_members_are_skipped_not_raised(tmp_path: Path) -> None:
    body = "".join(f"paragraph {i} about vectors and collections\n" for i in range(300))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("corrupt.md", body)
        archive.writestr("secret.md", "# secret\n\npassword protected\n")
        archive.writestr("good.md", "# good\n\nreadable\n")
    data = bytearray(_set_encrypted_flag(buffer.getvalue(), "secret.md"))
    start = 30 + len("corrupt.md")  # the compressed bytes of the first member
    for i in range(start + 4, start + 60):
        data[i] ^= 0xFF
    path = write(tmp_path / "damaged.zip", bytes(data))

    docs, skipped = load(path)

    assert list(docs) == ["good.md"]
    reasons = {s.source: s.reason for s in skipped}
    assert set(reasons) == {"corrupt.md", "secret.md"}
    assert "encrypted" in reasons["secret.md"]


# --- skip reasons ------------------------------------------------------------------------


def test_bad_files_in_a_folder_are_skipped_with_reasons(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    write(root / "good.md", "# Good\n\nfine\n")
    write(root / "empty.md", b"")
    write(root / "blank.txt", " \n\t\n   \n")
    write(root / "binary.md", b"# looks like text\x00\x01\x02")
    write(root / "latin1.md", "caf\xe9 au lait\n".encode("latin-1"))
    write(root / "huge.md", "word " * 400)

    docs, skipped = load(root, max_bytes=1000)

    assert list(docs) == ["good.md"]
    reasons = {s.source: s.reason for s in skipped}
    assert set(reasons) == {"empty.md", "blank.txt", "binary.md", "latin1.md", "huge.md"}
    assert "empty" in reasons["empty.md"]
    assert "empty" in reasons["blank.txt"]
    assert "binary" in reasons["binary.md"]
    assert "UTF-8" in reasons["latin1.md"] and "byte 3" in reasons["latin1.md"]
    assert "larger than" in reasons["huge.md"] and "1000 bytes" in reasons["huge.md"]
    for s in skipped:
        assert s.root == str(root.resolve())
        assert s.source is not None
        assert Path(s.path) == root.resolve() / s.source


def test_size_limit_in_megabytes_reads_naturally() -> None:
    with pytest.raises(SourceError, match="larger than 20 MB"):
        decode_text(b"x" * (20 * 1024 * 1024 + 1), max_bytes=20 * 1024 * 1024)


def test_missing_path_is_reported_and_others_still_load(tmp_path: Path) -> None:
    good = write(tmp_path / "ok.md", "# ok\n\nyes\n")
    missing = tmp_path / "nope"
    docs, skipped = load(missing, good)
    assert list(docs) == ["ok.md"]
    assert skipped == [Skipped(str(missing), "no such file or folder")]


@pytest.mark.parametrize("content", [b"this is not a zip archive", b"PK\x03\x04 truncated"])
def test_broken_zip_is_reported(tmp_path: Path, content: bytes) -> None:
    broken = write(tmp_path / "broken.zip", content)
    docs, skipped = load(broken)
    assert docs == {}
    assert len(skipped) == 1
    assert skipped[0].path == str(broken)
    assert "zip" in skipped[0].reason


def test_truncated_real_zip_is_reported(tmp_path: Path) -> None:
    full = make_zip(tmp_path / "full.zip", {f"f{i}.md": f"# {i}\n\ntext {i}\n" for i in range(5)})
    half = write(tmp_path / "half.zip", full.read_bytes()[: full.stat().st_size // 2])
    docs, skipped = load(half)
    assert docs == {}
    assert [s.reason for s in skipped] == ["broken zip archive"]


def test_symlink_loop_terminates_and_is_reported(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    write(root / "top.md", "# top\n\nt\n")
    write(root / "sub" / "inner.md", "# inner\n\ni\n")
    os.symlink(root, root / "sub" / "up")  # docs/sub/up -> docs: a cycle

    loader = DocumentSourceLoader([str(root)])
    docs = [d.metadata["source"] for d in loader.lazy_load()]

    assert sorted(docs) == ["sub/inner.md", "top.md"]
    assert len(loader.skipped) == 1
    assert "loop" in loader.skipped[0].reason
    assert loader.skipped[0].path.endswith(os.path.join("sub", "up"))
    assert loader.count_candidates() == 2


# --- count_candidates --------------------------------------------------------------------


def test_count_candidates_matches_the_files_looked_at(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    write(root / "a.md", "# a\n\na\n")
    write(root / "b" / "c.txt", "c\n")
    write(root / "b" / "empty.md", "")
    write(root / "b" / "skip.png", b"\x89PNG")
    write(root / ".hidden" / "h.md", "# h\n")
    archive = make_zip(
        tmp_path / "kb.zip",
        {"x/one.md": "# one\n\n1\n", "x/two.txt": "two\n", "x/img.png": b"\x00", "x/sub/": ""},
    )
    single = write(tmp_path / "single.md", "# s\n\ns\n")
    paths = [str(root), str(archive), str(single), str(tmp_path / "missing.md")]

    loader = DocumentSourceLoader(paths)
    expected = loader.count_candidates()
    docs = loader.load()

    # 3 in the folder (one of them empty), 2 in the archive, 1 file, 1 missing path; the two
    # pictures are passed over by name, without being read.
    assert expected == 7
    failed = [s for s in loader.skipped if s.kind == "failed"]
    assert len(docs) + len(failed) == expected
    assert len(docs) == 5
    assert (
        sorted(s.reason for s in loader.skipped if s.kind == "unsupported")
        == ["unsupported file type .png"] * 2
    )


# --- includes -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def milvus_docs(corpus: Path) -> dict[str, Document]:
    docs, skipped = load(corpus / "milvus-docs")
    assert skipped == []
    return docs


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    following = re.search(r"^\s*#{1,6} ", text[start + len(heading) :], re.MULTILINE)
    end = start + len(heading) + (following.start() if following else len(text))
    return text[start:end]


def test_fragment_include_is_expanded_from_the_docs_root(
    corpus: Path, milvus_docs: dict[str, Document]
) -> None:
    fragment = (corpus / "milvus-docs" / "fragments" / "cpu_support.md").read_text(encoding="utf-8")
    first_line = fragment.strip().splitlines()[0]
    text = milvus_docs["faq/operational_faq.md"].page_content

    section = _section(text, "How do I know if my CPU supports Milvus?")
    assert "{{fragments/cpu_support.md}}" not in text
    assert first_line in section
    assert "AVX512" in section


def test_every_corpus_file_is_loaded_once(corpus: Path, milvus_docs: dict[str, Document]) -> None:
    on_disk = sorted(
        p.relative_to(corpus / "milvus-docs").as_posix() for p in (corpus / "milvus-docs").rglob("*.md")
    )
    assert sorted(milvus_docs) == on_disk
    assert DocumentSourceLoader([str(corpus / "milvus-docs")]).count_candidates() == len(on_disk)


def test_fragment_include_left_as_is_without_fragments_folder(corpus: Path) -> None:
    docs, _ = load(corpus / "milvus-faq")
    assert sorted(docs) == [
        "operational_faq.md",
        "performance_faq.md",
        "product_faq.md",
        "troubleshooting.md",
    ]
    assert "{{fragments/cpu_support.md}}" in docs["operational_faq.md"].page_content


def test_fragment_include_cannot_escape_the_root(tmp_path: Path) -> None:
    write(tmp_path / "secret.md", "TOP SECRET\n")
    root = tmp_path / "docs"
    write(root / "fragments" / "ok.md", "included text\n")
    write(root / "page.md", "# P\n\n{{ fragments/ok.md }}\n\n{{fragments/../../secret.md}}\n")
    docs, _ = load(root)
    text = docs["page.md"].page_content
    assert "included text" in text
    assert "TOP SECRET" not in text
    assert "{{fragments/../../secret.md}}" in text


def test_expand_includes_without_a_reader_keeps_text() -> None:
    text = "before {{fragments/a.md}} after"
    assert expand_includes(text, None) == text
    assert expand_includes(text, lambda name: None) == text
    assert expand_includes(text, lambda name: f"<{name}>\n") == "before <fragments/a.md> after"
