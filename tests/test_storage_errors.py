"""Storage and network failures reach the operator as what they are, with a documented exit code.

Issue 12 item 18: a refused connection was reported as a timeout (urllib3 derives
``NewConnectionError`` from ``ConnectTimeoutError``), and an S3 read error ended the CLI with the
undocumented exit code 1.
"""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from ota.client._fetch import FetchConfig, SlowRetrievalError, TufFetcher, make_pool
from ota.client._tuf import tuf_errors
from ota.errors import ExitCode, OtaError, TransientError
from ota.repository import _storage
from tests.repo_helpers import make_project

DOCUMENTED = set(ExitCode) - {ExitCode.INTERNAL}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_connection_refused_is_not_reported_as_a_timeout() -> None:
    cfg = FetchConfig(retries=0)
    fetcher = TufFetcher(make_pool(cfg), cfg)
    url = f"http://127.0.0.1:{_closed_port()}/metadata/timestamp.json"
    with pytest.raises(TransientError) as exc, tuf_errors("refresh"):
        list(fetcher._fetch(url))
    assert not isinstance(exc.value, SlowRetrievalError)
    message = str(exc.value)
    assert "refused" in message.lower() and "timeout" not in message.lower()
    assert exc.value.exit_code == ExitCode.TRANSIENT


def _all_subclasses(cls: type[OtaError]) -> set[type[OtaError]]:
    out = {cls}
    for sub in cls.__subclasses__():
        out |= _all_subclasses(sub)
    return out


def test_every_storage_error_has_a_documented_exit_code() -> None:
    import ota.repository._s3  # noqa: F401 - its error classes too

    classes = _all_subclasses(_storage.StorageError)
    assert {_storage.NotFound, _storage.TooLarge} <= classes
    for cls in classes:
        assert cls.exit_code in DOCUMENTED, cls
    assert _storage.TooLarge.exit_code == ExitCode.SECURITY


class _Always400(http.server.BaseHTTPRequestHandler):
    """An S3-compatible endpoint that refuses every request with an unexpected 4xx."""

    def _refuse(self) -> None:
        body = b"<Error><Code>InvalidRequest</Code><Message>not supported here</Message></Error>"
        self.send_response(400)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _refuse

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def refusing_endpoint() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Always400)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.usefixtures("s3_endpoint")  # fake credentials in the environment
def test_an_s3_read_error_exits_with_the_configuration_code(
    tmp_path: Path, refusing_endpoint: str
) -> None:
    from ota.cli._main import _register, cli

    project = make_project(tmp_path)
    config = project.root_dir / "ota.toml"
    text = config.read_text().replace(f'storage = "{project.storage.url}"', 'storage = "s3://b/r"')
    text = text.replace('s3_endpoint = ""', f's3_endpoint = "{refusing_endpoint}"')
    assert "s3://b/r" in text and refusing_endpoint in text
    config.write_text(text)
    _register()
    result = CliRunner().invoke(cli, ["releases", "--project", str(project.root_dir)])
    assert result.exit_code == ExitCode.CONFIG, result.output
    assert "InvalidRequest" in result.output and "s3://b/r/" in result.output
    assert "Traceback" not in result.output
