"""Letting go of a Milvus Lite file before the process exits: the one call into milvus-lite.

pymilvus opens a Lite file (a `.db` MILVUS_URI) by asking milvus-lite's server manager
(`milvus_lite.server_manager.server_manager_instance`, the integration point pymilvus itself
calls) for an in-process gRPC server, and never stops it: closing the client leaves the file
open and locked until the process exits. Neither pymilvus nor langchain-milvus has a public
call for that, so `RagStore.close` asks the manager's `release_server`, which milvus-lite's own
`atexit` hook also uses. Guarded: if a milvus-lite release moves it, the file stays locked
until exit (a warning says so) instead of `close` failing, and
tests/integration/test_store.py fails on the pinned version, because another process can no
longer open the file after `close`.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def release_lite_file(path: str) -> bool:
    """Stop the in-process server of the Lite file at `path` (absolute); True if it could be asked."""
    try:
        from milvus_lite.server_manager import server_manager_instance

        release = server_manager_instance.release_server
    except (ImportError, AttributeError):
        log.warning(
            "this milvus-lite has no server_manager_instance.release_server: the Milvus Lite file "
            "%s stays locked until this process exits",
            path,
        )
        return False
    release(path)
    return True
