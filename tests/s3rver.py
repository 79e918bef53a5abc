"""A second S3 implementation for tests: the npm ``s3rver`` (3.7.1) on a free loopback port.

A pytest plugin beside :mod:`tests.s3server` (moto). moto honours conditional writes as AWS S3
does; s3rver does not: it answers 200 to ``PutObject`` with ``If-None-Match: *`` on an existing
key and with a wrong ``If-Match``, and overwrites the object. Running the storage tests against
both keeps both kinds of store covered: the ones edge-ota publishes to concurrently, and the ones
it must refuse (or serialise in single-publisher mode).

``scripts/setup`` installs s3rver into ``.node/`` (ignored by git) when npm exists. Tests that
need it are skipped when it is missing, except where ``OTA_REQUIRE_S3RVER`` is set (``.ci/run``
sets it): there a missing s3rver fails them.

Fixtures:
    s3rver_endpoint (session): starts ``node s3rver`` in its own process group with a fresh data
        folder, exports the fake credentials of :data:`tests.s3server.FAKE_AWS_ENV` (s3rver
        knows only the access key ``S3RVER``) and yields the endpoint URL. It does not touch
        ``AWS_ENDPOINT_URL``: tests pass the endpoint explicitly.
    s3rver_url (function): a fresh bucket on it; yields ``s3://bucket/repo``.

Run ``python -m tests.s3rver`` for a standalone endpoint.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from tests.s3server import _UNSET, FAKE_AWS_ENV, _delete_bucket

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".node" / "node_modules" / "s3rver" / "bin" / "s3rver.js"
VERSION = "3.7.1"
_LISTENING = re.compile(r"listening on (?P<host>[0-9.]+):(?P<port>[0-9]+)")


def node() -> str | None:
    return shutil.which("node")


def available() -> bool:
    """Whether s3rver can be started. True wherever ``OTA_REQUIRE_S3RVER`` is set, so that a
    missing s3rver fails the tests that need it there instead of skipping them."""
    return (node() is not None and SCRIPT.is_file()) or bool(os.environ.get("OTA_REQUIRE_S3RVER"))


@contextlib.contextmanager
def run_s3rver(startup_deadline: float = 60.0) -> Iterator[str]:
    """Start s3rver on 127.0.0.1 (a free port it picks); yield ``http://127.0.0.1:PORT``."""
    exe = node()
    if exe is None or not SCRIPT.is_file():
        raise RuntimeError(
            f"s3rver is not installed (node: {exe}, {SCRIPT}): run scripts/setup with npm present"
        )
    data = Path(tempfile.mkdtemp(prefix="s3rver-"))
    log = data.with_name(f"{data.name}.log")  # its output, kept to say why it ended
    # Any signature is accepted; only the access key id must be S3RVER.
    args = ["-d", str(data), "-a", "127.0.0.1", "-p", "0", "-s", "--allow-mismatched-signatures"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [exe, str(SCRIPT), *args, "--no-vhost-buckets"],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = ""
    try:
        url = _wait_for_port(proc, log, startup_deadline)
        _RUNNING[url] = (proc, log)
        yield url
    finally:
        _RUNNING.pop(url, None)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(data, ignore_errors=True)
        log.unlink(missing_ok=True)


_RUNNING: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}


def _tail(log: Path) -> str:
    with contextlib.suppress(OSError):
        return log.read_bytes()[-2000:].decode("utf-8", "replace")
    return ""


def _wait_for_port(proc: subprocess.Popen[bytes], log: Path, deadline_s: float) -> str:
    """Read s3rver's output until it names its port (a condition, with a generous deadline)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        m = _LISTENING.search(_tail(log))
        if m:
            return f"http://{m['host']}:{m['port']}"
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"s3rver did not start within {deadline_s:g} s: {_tail(log)[-500:]}")


def check_alive(url: str) -> None:
    """Raise, with s3rver's own last output, if the s3rver serving ``url`` has ended (a
    clear error instead of every later test's "connection refused")."""
    proc, log = _RUNNING.get(url, (None, None))
    if proc is not None and log is not None and proc.poll() is not None:
        raise RuntimeError(f"s3rver at {url} exited with {proc.returncode}: {_tail(log)}")


@pytest.fixture(scope="session")
def s3rver_endpoint() -> Iterator[str]:
    """s3rver, started once per session; yields its URL. Skips where it is not installed."""
    if not available():
        pytest.skip("s3rver is not installed (scripts/setup installs it when npm exists)")
    with run_s3rver() as url, pytest.MonkeyPatch.context() as mp:
        for name in _UNSET:
            mp.delenv(name, raising=False)
        for name, value in FAKE_AWS_ENV.items():
            mp.setenv(name, value)
        yield url


@pytest.fixture
def s3rver_url(s3rver_endpoint: str) -> Iterator[str]:
    """A fresh empty bucket on s3rver; yield ``s3://<bucket>/repo``."""
    check_alive(s3rver_endpoint)
    bucket = f"ota-test-{uuid.uuid4().hex[:16]}"
    client = boto3.client("s3", endpoint_url=s3rver_endpoint)
    client.create_bucket(Bucket=bucket)
    try:
        yield f"s3://{bucket}/repo"
    finally:
        check_alive(s3rver_endpoint)
        _delete_bucket(client, bucket)
        client.close()


def main() -> None:
    """Serve until interrupted, printing the environment to use it from a shell."""
    with run_s3rver() as url:
        for name, value in FAKE_AWS_ENV.items():
            print(f"export {name}={value}")
        print(f"export AWS_ENDPOINT_URL={url}")
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


if __name__ == "__main__":
    main()
