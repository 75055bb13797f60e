"""The one call into milvus-lite (store/lite_file.py): active on the pinned version, guarded otherwise."""

from __future__ import annotations

import logging

import pytest

from store.lite_file import release_lite_file


def test_the_installed_milvus_lite_can_release_a_file(tmp_path: object) -> None:
    # Fails on a milvus-lite that moved `release_server`: RagStore.close would then leave the
    # file locked until exit (tests/integration/test_store.py shows what that breaks).
    assert release_lite_file(f"{tmp_path}/never-opened.db") is True


def test_without_release_server_closing_warns_instead_of_failing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from milvus_lite import server_manager

    monkeypatch.delattr(server_manager.ServerManager, "release_server")
    with caplog.at_level(logging.WARNING, logger="store.lite_file"):
        assert release_lite_file("/data/kb.db") is False
    assert "/data/kb.db stays locked until this process exits" in caplog.text
