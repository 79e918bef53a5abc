"""Attacks on single-publisher mode's host lock (review of issue 12 item 1).

The lock is the only thing that keeps two publishers on one host from losing each other's
releases on a store that ignores conditional writes, so every process that writes to the
same store must land on the same lock file, however it spells the store's endpoint and
whatever its environment's temporary folder is.
"""

from __future__ import annotations

import pytest

from ota.repository._condwrite import lock_path
from ota.repository._s3 import S3Storage


def test_one_store_spelled_two_ways_is_one_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    """``localhost`` and ``127.0.0.1`` (or a trailing slash) name the same endpoint: two
    publishers configured each way took two different locks and raced unserialized."""
    monkeypatch.delenv("OTA_LOCK_DIR", raising=False)
    spellings = ("http://127.0.0.1:9/", "http://localhost:9", "http://LOCALHOST:9/")
    paths = {
        lock_path(S3Storage("bucket", "repo", endpoint_url=e, single_publisher=True).store_id)
        for e in spellings
    }
    assert len(paths) == 1, paths
    other = S3Storage("bucket", "other-repo", endpoint_url=spellings[0], single_publisher=True)
    assert lock_path(other.store_id) not in paths  # another repository: another lock
