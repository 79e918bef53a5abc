"""A real S3 endpoint over HTTP for tests: moto's server on a free loopback port.

A pytest plugin (``pytest_plugins = ["tests.s3server"]``). boto3 is never patched in-process:
code under test talks HTTP to the endpoint exactly as it would to S3, MinIO or R2.

Fixtures:
    s3_endpoint (session): starts the server, exports fake credentials, a region and
        ``AWS_ENDPOINT_URL`` into ``os.environ`` (inherited by child processes; restored at the
        end of the session) and yields the endpoint URL.
    s3_url (function): a fresh, uniquely named, empty bucket; yields ``s3://bucket/repo``.
        The bucket and its objects are deleted afterwards.

Fidelity: S3 decides a conditional write (``If-Match`` / ``If-None-Match``) atomically; moto
checks the precondition and then stores in two steps without a lock, so two conditional writes
racing through its threaded server can both succeed. The endpoint therefore serialises the
requests that write or delete an object or complete a multipart upload (one lock, held for one
request); reads, listings and multipart part uploads stay concurrent. moto does not check
credentials or presigned-URL expiry: no test here proves anything about those.

Run ``python -m tests.s3server`` to get a standalone endpoint for manual work.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

import boto3
import pytest
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import BaseWSGIServer, make_server

# What the environment of the tests (and of their child processes) must hold to reach the
# endpoint with fake credentials and no real AWS configuration.
# The access key is s3rver's only one (tests/s3rver.py); moto accepts any.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "S3RVER",
    "AWS_SECRET_ACCESS_KEY": "S3RVER",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
_UNSET = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3")

_WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def s3_env(endpoint: str) -> dict[str, str]:
    """The variables a process needs to use ``endpoint`` through boto3's standard chain."""
    return {**FAKE_AWS_ENV, "AWS_ENDPOINT_URL": endpoint}


def child_env(endpoint: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment for a subprocess that talks to ``endpoint`` (``base`` defaults to ours)."""
    env = dict(os.environ if base is None else base)
    for name in _UNSET:
        env.pop(name, None)
    env.update(s3_env(endpoint))
    return env


class _SerialiseWrites:
    """WSGI middleware: one object-changing request at a time (see the module docstring)."""

    def __init__(self, app: _WSGIApp) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        method = environ.get("REQUEST_METHOD", "")
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        writes = method in ("PUT", "DELETE") and "partNumber" not in query
        completes = method == "POST" and "uploadId" in query
        if writes or completes:
            with self.lock:
                # Materialise the body inside the lock: moto's work happens while it is built.
                result = self.app(environ, start_response)
                try:
                    return list(result)
                finally:
                    close = getattr(result, "close", None)
                    if close is not None:
                        close()
        return self.app(environ, start_response)


class S3Server:
    """moto's S3 server (the same app as ``ThreadedMotoServer``) in a daemon thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        app = _SerialiseWrites(DomainDispatcherApplication(create_backend_app))
        self._server: BaseWSGIServer = make_server(
            host, port, app, threaded=True, request_handler=MotoRequestHandler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="moto-s3", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=10)
        self._server.server_close()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Start the S3 endpoint once per session; yield its URL (``http://127.0.0.1:PORT``)."""
    server = S3Server()
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        for name in _UNSET:
            mp.delenv(name, raising=False)
        for name, value in s3_env(server.url).items():
            mp.setenv(name, value)
        try:
            yield server.url
        finally:
            server.stop()


@pytest.fixture
def s3_url(s3_endpoint: str) -> Iterator[str]:
    """A fresh empty bucket on the endpoint; yield ``s3://<bucket>/repo``."""
    bucket = f"ota-test-{uuid.uuid4().hex[:16]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=bucket)
    try:
        yield f"s3://{bucket}/repo"
    finally:
        _delete_bucket(client, bucket)
        client.close()


def _delete_bucket(client: Any, bucket: str) -> None:
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", ())]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
    client.delete_bucket(Bucket=bucket)


def main() -> None:
    """Serve until interrupted, printing the environment to use it from a shell."""
    server = S3Server()
    server.start()
    for name, value in s3_env(server.url).items():
        print(f"export {name}={value}")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
