"""Attacks on single-publisher mode's host lock (review of issue 12 item 1).

The lock is the only thing that keeps two publishers on one host from losing each other's
releases on a store that ignores conditional writes, so every process that writes to the
same store must land on the same lock file, however it spells the store's endpoint and
whatever its environment's temporary folder is.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

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


def test_the_lock_does_not_follow_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``tempfile.gettempdir()`` honours TMPDIR/TEMP/TMP, which differ between a login shell,
    a CI job and a systemd unit (pam_tmpdir, per-user TMPDIR): two publishers on one host
    then held two different locks. Only ``$OTA_LOCK_DIR`` chooses the folder."""
    monkeypatch.delenv("OTA_LOCK_DIR", raising=False)
    seen = set()
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        monkeypatch.setenv("TMPDIR", str(folder))
        monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() looks again
        seen.add(lock_path("some-store"))
    assert len(seen) == 1, seen
    monkeypatch.setenv("OTA_LOCK_DIR", str(tmp_path / "a"))
    assert lock_path("some-store").parent == tmp_path / "a"
