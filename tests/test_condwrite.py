"""A store that ignores conditional writes is refused; one that honours them is probed cheaply.

Real endpoints: s3rver (ignores ``If-None-Match``/``If-Match``) and moto (honours them as AWS S3
does). Nothing is patched.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from click.testing import CliRunner

from ota.errors import ConfigError, ExitCode
from ota.repository import _auditlog
from ota.repository._condwrite import MARKER_KEY, PROBE_PREFIX, HostLock, lock_path
from ota.repository._s3 import S3Storage
from ota.repository._storage import open_storage


def _bucket(url: str) -> str:
    return url.removeprefix("s3://").split("/", 1)[0]


def _keys(endpoint: str, url: str) -> set[str]:
    client = boto3.client("s3", endpoint_url=endpoint)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=_bucket(url))
    return {obj["Key"] for page in pages for obj in page.get("Contents", ())}


def _s3(url: str, endpoint: str, *, single: bool = False) -> S3Storage:
    storage = open_storage(url, s3_endpoint=endpoint, single_publisher=single)
    assert isinstance(storage, S3Storage)
    return storage


class _Requests:
    """Counts the HTTP requests a boto3 client sends (botocore's ``before-send`` event)."""

    def __init__(self, storage: S3Storage) -> None:
        self.methods: list[str] = []
        storage._client.meta.events.register("before-send.s3", self._seen)

    def _seen(self, request: Any, **_: Any) -> None:
        self.methods.append(str(request.method))


def _cli(args: list[str]) -> tuple[int, str]:
    from ota.cli._main import _register, cli

    _register()
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.output


# -- the store itself ---------------------------------------------------------------------------


def test_s3rver_really_ignores_conditional_writes(s3rver_url: str, s3rver_endpoint: str) -> None:
    """The fixture's premise: without it, the refusal tests below would prove nothing."""
    client = boto3.client("s3", endpoint_url=s3rver_endpoint)
    bucket, key = _bucket(s3rver_url), "raw/k"
    client.put_object(Bucket=bucket, Key=key, Body=b"a", IfNoneMatch="*")
    client.put_object(Bucket=bucket, Key=key, Body=b"b", IfNoneMatch="*")  # 200, overwritten
    client.put_object(Bucket=bucket, Key=key, Body=b"c", IfMatch='"' + "0" * 32 + '"')
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"c"


def test_moto_honours_conditional_writes(s3_url: str, s3_endpoint: str) -> None:
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket, key = _bucket(s3_url), "raw/k"
    client.put_object(Bucket=bucket, Key=key, Body=b"a", IfNoneMatch="*")
    with pytest.raises(ClientError, match="PreconditionFailed"):
        client.put_object(Bucket=bucket, Key=key, Body=b"b", IfNoneMatch="*")


# -- refusal --------------------------------------------------------------------------------


def test_conditional_write_is_refused_on_a_store_that_ignores_them(
    s3rver_url: str, s3rver_endpoint: str
) -> None:
    storage = _s3(s3rver_url, s3rver_endpoint)
    storage.put("plain", b"unconditional writes need no guarantee")
    for call in (
        lambda: storage.put("head", b"x", if_none_match=True),
        lambda: storage.put("plain", b"y", if_match="abc"),
        lambda: storage.put_blob("blobs/sha256/ab", b"chunk"),
    ):
        with pytest.raises(ConfigError) as exc:
            call()
        assert exc.value.exit_code == ExitCode.CONFIG
        message = exc.value.diagnostics()
        assert "conditional writes" in message and "If-None-Match" in message
        assert 'publishers = "single"' in message  # the way out is named
    # Nothing was written but the plain object: no canary, no marker, no refused object.
    assert _keys(s3rver_endpoint, s3rver_url) == {"repo/plain"}
    assert storage.get("plain")[0] == b"unconditional writes need no guarantee"


def test_a_store_swapped_under_the_project_is_caught(s3rver_url: str, s3rver_endpoint: str) -> None:
    """The bucket was synced from an honest store, marker included: the quick check still
    tests the store, so the marker alone proves nothing."""
    client = boto3.client("s3", endpoint_url=s3rver_endpoint)
    marker = f"repo/{MARKER_KEY}"
    from ota.repository._condwrite import MARKER

    client.put_object(Bucket=_bucket(s3rver_url), Key=marker, Body=MARKER)
    storage = _s3(s3rver_url, s3rver_endpoint)
    with pytest.raises(ConfigError, match="conditional writes"):
        storage.put("k", b"v", if_none_match=True)
    assert not storage.exists("k")
    assert _keys(s3rver_endpoint, s3rver_url) == set()  # the marker that lied is gone


def test_the_audit_log_is_refused_there_too(s3rver_url: str, s3rver_endpoint: str) -> None:
    """Audit entries are created if absent: an ignoring store would overwrite them silently."""
    storage = _s3(s3rver_url, s3rver_endpoint)
    with pytest.raises(ConfigError, match="conditional writes"):
        _auditlog.append_event(storage, "publish", actor="ci", subject="m 1.0.0")
    assert not any(k.startswith("repo/audit/") for k in _keys(s3rver_endpoint, s3rver_url))


# -- the probe on a store that honours them -------------------------------------------------


def test_probe_runs_once_then_costs_two_requests(s3_url: str, s3_endpoint: str) -> None:
    first = _s3(s3_url, s3_endpoint)
    seen = _Requests(first)
    first.put("head", b"v1", if_none_match=True)
    assert [p.full for p in first.probes] == [True]
    # marker + canary (create, create again, wrong If-Match, read, delete) + the write itself
    assert len(seen.methods) == 7
    assert _keys(s3_endpoint, s3_url) == {f"repo/{MARKER_KEY}", "repo/head"}  # no canary left

    etag = first.get("head")[1]
    first.put("head", b"v2", if_match=etag)  # probed once per storage
    assert len(first.probes) == 1

    later = _s3(s3_url, s3_endpoint)  # the next command: the quick check on the marker
    seen = _Requests(later)
    later.put("head", b"v3", if_match=later.get("head")[1])
    assert [p.full for p in later.probes] == [False]
    assert seen.methods == ["GET", "PUT", "PUT", "PUT"]  # read, two refused checks, the write
    assert later.get("head")[0] == b"v3"
    assert not any(k.startswith(f"repo/{PROBE_PREFIX}probe-") for k in _keys(s3_endpoint, s3_url))


def test_reads_do_not_probe(s3_url: str, s3_endpoint: str) -> None:
    storage = _s3(s3_url, s3_endpoint)
    storage.put("k", b"v")
    assert storage.get("k")[0] == b"v"
    assert list(storage.list("")) == ["k"]
    assert storage.probes == []


# -- single-publisher mode --------------------------------------------------------------------


@pytest.fixture
def lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "locks"
    folder.mkdir()
    monkeypatch.setenv("OTA_LOCK_DIR", str(folder))
    return folder


def test_single_publisher_mode_holds_the_host_lock(
    s3rver_url: str, s3rver_endpoint: str, lock_dir: Path
) -> None:
    storage = _s3(s3rver_url, s3rver_endpoint, single=True)
    assert storage.get_range("absent", 0, 0) == b""  # no request: nothing settled yet
    storage.put("head", b"v1", if_none_match=True)
    assert storage.conditional_mode() == "emulated"
    assert lock_path(storage.store_id).parent == lock_dir
    # Another process could not take the lock now: prove it with a second descriptor.
    import fcntl
    import os

    fd = os.open(lock_path(storage.store_id), os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Emulated conditional writes keep their meaning.
        from ota.repository._storage import PreconditionFailed

        with pytest.raises(PreconditionFailed):
            storage.put("head", b"v2", if_none_match=True)
        with pytest.raises(PreconditionFailed):
            storage.put("head", b"v2", if_match="0" * 32)
        assert storage.get("head")[0] == b"v1"
        storage.close()
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def test_the_host_lock_times_out_with_a_conflict(lock_dir: Path) -> None:
    import fcntl
    import os

    from ota.errors import ConflictError

    path = lock_path("some-store")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # "another process" (another open file description)
        with pytest.raises(ConflictError, match="another publisher on this host"):
            HostLock.acquire("some-store", wait_s=0.2)
    finally:
        os.close(fd)
    HostLock.acquire("some-store", wait_s=0.2)
    HostLock.release("some-store")


def test_single_publisher_on_an_honest_store_stays_native(
    s3_url: str, s3_endpoint: str, lock_dir: Path
) -> None:
    storage = _s3(s3_url, s3_endpoint, single=True)
    storage.put("k", b"v", if_none_match=True)
    assert storage.conditional_mode() == "native"
    assert list(lock_dir.iterdir()) == []  # no lock needed, none taken


# -- ota init ---------------------------------------------------------------------------------


def test_ota_init_refuses_such_a_store_before_making_keys(
    s3rver_url: str, s3rver_endpoint: str, tmp_path: Path
) -> None:
    proj = tmp_path / "proj"
    code, out = _cli(["init", s3rver_url, "--project", str(proj), "--s3-endpoint", s3rver_endpoint])
    assert code == ExitCode.CONFIG, out
    assert "conditional writes" in out
    assert not proj.exists()  # no keys, no ota.toml
    assert _keys(s3rver_endpoint, s3rver_url) == set()


def test_ota_init_single_publisher_records_the_mode(
    s3rver_url: str, s3rver_endpoint: str, tmp_path: Path, lock_dir: Path
) -> None:
    proj = tmp_path / "proj"
    args = ["init", s3rver_url, "--project", str(proj), "--s3-endpoint", s3rver_endpoint]
    code, out = _cli([*args, "--bins", "16", "--single-publisher"])
    assert code == 0, out
    assert "ONE publisher host only" in out
    config = tomllib.loads((proj / "ota.toml").read_text())
    assert config["repository"]["publishers"] == "single"


def test_ota_init_on_moto_records_concurrent_mode(
    s3_url: str, s3_endpoint: str, tmp_path: Path
) -> None:
    proj = tmp_path / "proj"
    code, out = _cli(
        ["init", s3_url, "--project", str(proj), "--s3-endpoint", s3_endpoint, "--bins", "16"]
    )
    assert code == 0, out
    assert tomllib.loads((proj / "ota.toml").read_text())["repository"]["publishers"] == (
        "concurrent"
    )
    assert f"repo/{MARKER_KEY}" in _keys(s3_endpoint, s3_url)


def test_a_bad_publishers_value_is_a_config_error(tmp_path: Path) -> None:
    from ota.repository._project import ProjectConfig

    text = '[repository]\nstorage = "repo"\npublishers = "many"\n'
    with pytest.raises(ConfigError, match="publishers"):
        ProjectConfig.from_toml(text)
