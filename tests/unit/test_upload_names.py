"""Upload names become `source` values and paths under the job's folder: only relative
names that stay inside it pass. Settings of the documents API."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import HTTPException
from pydantic import ValidationError

from documents_api import client_path, upload_name
from settings import Settings


@pytest.mark.parametrize(
    "name", ["guide.md", "docs/guide.md", "a/b/c d.txt", "Über/été.md", "v1.2/notes.rst"]
)
def test_relative_names_pass(name: str) -> None:
    assert upload_name(name) == name


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "no name"),
        (None, "no name"),
        ("../x.md", "'..' part"),
        ("docs/../../x.md", "'..' part"),
        ("/etc/passwd.md", "absolute path"),
        ("docs//x.md", "empty"),
        ("./x.md", "'.' or"),
        (".env.md", "hidden"),
        ("docs/.git/config.md", "hidden"),
        ("C:x.md", "one of"),
        ("a\\b.md", "one of"),
        ('x".md', "one of"),
        ("<passage>.md", "one of"),
        ("x\n.md", "control characters"),
        ("x\x00.md", "control characters"),
        ("a/" * 600 + "x.md", "longer than"),
    ],
)
def test_names_that_are_paths_out_or_markup_are_refused(name: str | None, reason: str) -> None:
    with pytest.raises(HTTPException) as caught:
        upload_name(name)
    assert caught.value.status_code == 400 and reason in str(caught.value.detail)


def test_skipped_paths_are_reported_by_the_clients_names() -> None:
    names = {"/srv/jobs/u/1/files": "", "/srv/jobs/u/1/archives/0/site.zip": "site.zip"}
    assert client_path("/srv/jobs/u/1/files/docs/a.md", names) == "docs/a.md"
    assert client_path("/srv/jobs/u/1/archives/0/site.zip!img/x.md", names) == "site.zip!img/x.md"
    assert client_path("/srv/jobs/u/1/archives/0/site.zip", names) == "site.zip"
    assert client_path("https://example.com/a.md", names) == "https://example.com/a.md"


def test_jobs_live_beside_a_lite_file_or_in_the_cache(tmp_path: Path) -> None:
    lite = Settings(_env_file=None, MILVUS_URI=str(tmp_path / "store.db"))
    assert lite.jobs_path == tmp_path / "store.db-jobs"
    server = Settings(_env_file=None, MILVUS_URI="http://127.0.0.1:19530", RAG_CACHE_DIR=str(tmp_path))
    assert server.jobs_path == tmp_path / "jobs"
    chosen = Settings(_env_file=None, RAG_JOBS_DIR=str(tmp_path / "jobs-here"))
    assert chosen.jobs_path == tmp_path / "jobs-here"


def test_a_batch_larger_than_the_burst_is_refused_when_a_rate_is_set() -> None:
    assert Settings(_env_file=None, RAG_MAX_BATCH="50", RAG_RATE_BURST="10").max_batch == 50  # no rate
    with pytest.raises(ValidationError, match="RAG_MAX_BATCH"):
        Settings(_env_file=None, RAG_RATE_LIMIT="60", RAG_MAX_BATCH="50", RAG_RATE_BURST="10")
