"""The blob and TUF fetchers against the fault-injecting HTTP server."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuf.api import exceptions as tuf_exc

from ota.bundle import blob_key
from ota.client._fetch import (
    BlobFetcher,
    FetchConfig,
    FetchStats,
    SlowRetrievalError,
    TufFetcher,
    make_pool,
)
from ota.errors import SecurityError, TransientError
from tests import http_faults
from tests.http_faults import FaultServer

CFG = FetchConfig(retries=3, backoff=0.001, backoff_max=0.01, connect_timeout=2, read_timeout=2,
                  read_size=4096)
DATA = bytes(range(256)) * 400  # 100 KiB
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FaultServer]:
    blob = tmp_path / blob_key(SHA)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(DATA)
    (tmp_path / "meta.json").write_bytes(b"{}" * 100)
    with http_faults.serve(tmp_path) as fs:
        yield fs


def _fetcher(fs: FaultServer, cfg: FetchConfig = CFG) -> BlobFetcher:
    return BlobFetcher(make_pool(cfg), fs.url, cfg, FetchStats())


def test_plain_fetch(server: FaultServer) -> None:
    f = _fetcher(server)
    assert bytes(f.fetch(SHA, len(DATA))) == DATA
    assert f.stats.requests == 1 and f.stats.bytes == len(DATA)


@pytest.mark.parametrize("kind", ["reset", "truncate"])
def test_resume_with_range_after_reset_or_truncation(server: FaultServer, kind: str) -> None:
    server.add(kind, SHA, after=30_000)
    server.add(kind, SHA, after=30_000)
    f = _fetcher(server)
    assert bytes(f.fetch(SHA, len(DATA))) == DATA
    log = server.requests(SHA)
    assert [r[2] for r in log] == [200, 206, 206]
    assert log[1][1] is not None and int(log[1][1][6:-1]) > 0
    assert f.stats.bytes == len(DATA)  # no byte downloaded twice


def test_server_ignoring_range_restarts_cleanly(server: FaultServer) -> None:
    server.add("truncate", SHA, after=10_000)
    server.add("norange", SHA)
    assert bytes(_fetcher(server).fetch(SHA, len(DATA))) == DATA


def test_5xx_retried_then_bounded(server: FaultServer) -> None:
    server.add("status", SHA, times=2, status=503)
    assert bytes(_fetcher(server).fetch(SHA, len(DATA))) == DATA
    server.add("status", SHA, times=99, status=502)
    with pytest.raises(TransientError):
        _fetcher(server).fetch(SHA, len(DATA))
    assert len(server.requests(SHA)) == 3 + 1 + CFG.retries


def test_wrong_digest_and_endless_data_are_security_errors(server: FaultServer) -> None:
    server.add("replace", SHA, body=b"x" * len(DATA))
    with pytest.raises(SecurityError, match="verification"):
        _fetcher(server).fetch(SHA, len(DATA))
    server.add("endless", SHA)
    with pytest.raises(SecurityError, match="more than"):
        _fetcher(server).fetch(SHA, len(DATA))
    with pytest.raises(SecurityError, match="more than"):
        _fetcher(server).fetch(SHA, len(DATA) - 1)  # the manifest says smaller: cut


def test_missing_blob_is_a_security_error(server: FaultServer) -> None:
    with pytest.raises(SecurityError, match="missing"):
        _fetcher(server).fetch("ab" * 32, 10)


def test_slow_drip_is_cut(server: FaultServer) -> None:
    server.add("drip", SHA, times=9, step=512, delay=0.02)
    cfg = FetchConfig(min_rate=100_000, grace=0.05, retries=1, backoff=0.001, read_size=4096)
    with pytest.raises(SlowRetrievalError):
        _fetcher(server, cfg).fetch(SHA, len(DATA))


def test_connection_refused_is_transient() -> None:
    cfg = FetchConfig(retries=1, backoff=0.001)
    with pytest.raises(TransientError):
        BlobFetcher(make_pool(cfg), "http://127.0.0.1:9", cfg).fetch(SHA, 10)


def test_tuf_fetcher_maps_errors(server: FaultServer) -> None:
    f = TufFetcher(make_pool(CFG), CFG)
    assert f.download_bytes(server.url + "/meta.json", 1000) == b"{}" * 100
    with pytest.raises(tuf_exc.DownloadHTTPError) as e:
        f.download_bytes(server.url + "/nope.json", 1000)
    assert e.value.status_code == 404
    with pytest.raises(tuf_exc.DownloadLengthMismatchError):
        f.download_bytes(server.url + "/meta.json", 10)
    server.add("status", "/meta.json", times=2, status=503)
    assert f.download_bytes(server.url + "/meta.json", 1000) == b"{}" * 100
    server.add("drip", "/meta.json", step=1, delay=0.05)
    slow = TufFetcher(make_pool(CFG), CFG, max_seconds=0.1)
    with pytest.raises(tuf_exc.SlowRetrievalError):
        slow.download_bytes(server.url + "/meta.json", 1000)


# -- progress of a device download (issue 12 item 18) ----------------------------------------


def _device(tmp_path: Path, base: str) -> Path:
    from ota.client import init_device

    root = (tmp_path / "proj" / "root.json").read_bytes()
    state = tmp_path / "dev"
    init_device(state, base, root, "cam-1", ["det"], health_timeout_s=0)
    return state


def _update_cli(state: Path, *args: str, tty: bool) -> tuple[int, str, str]:
    """``ota device update`` in a child process, its stderr a pseudo-terminal when ``tty``.
    Returns the exit code, stdout and stderr."""
    import os
    import pty
    import subprocess
    import sys

    argv = [sys.executable, "-m", "ota.cli", "device", "update", "--state-dir", str(state), *args]
    if not tty:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=300)
        return proc.returncode, proc.stdout, proc.stderr
    leader, follower = pty.openpty()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=follower, text=True) as child:
        os.close(follower)
        err = b""
        while True:  # read until the child closes its end (EIO on Linux, b"" elsewhere)
            try:
                piece = os.read(leader, 65536)
            except OSError:
                break
            if not piece:
                break
            err += piece
        os.close(leader)
        out = child.stdout.read() if child.stdout else ""
        code = child.wait(timeout=300)
    return code, out, err.decode("utf-8", "replace")


def test_stage_reports_progress_up_to_the_bundle_size(tmp_path: Path) -> None:
    from ota.client import update_once
    from tests.repo_helpers import make_project, publish_mlp, serve_dir

    project = make_project(tmp_path)
    publish_mlp(project, "det", "1.0.0", ring="ga")
    seen: list[tuple[str, str, int, int]] = []
    with serve_dir(tmp_path / "repo") as base:
        result = update_once(_device(tmp_path, base), progress=lambda *a: seen.append(a))
    assert result.status == "updated", result.to_dict()
    assert seen and {(m, v) for m, v, _, _ in seen} == {("det", "1.0.0")}
    done = [d for _, _, d, _ in seen]
    assert done == sorted(done)  # never goes backwards
    total = seen[-1][3]
    assert done[-1] == total == result.outcomes[0].figures["stage"]["bytes_total"]


def test_cli_shows_progress_on_a_terminal_only(tmp_path: Path) -> None:
    from tests.repo_helpers import make_project, publish_mlp, serve_dir

    project = make_project(tmp_path)
    publish_mlp(project, "det", "1.0.0", ring="ga")
    with serve_dir(tmp_path / "repo") as base:
        state = _device(tmp_path, base)
        # --json on a terminal: no progress, stdout is the JSON document alone.
        code, out, err = _update_cli(state, "--json", tty=True)
        assert code == 0, err
        assert json.loads(out)["models"][0]["version"] == "1.0.0"
        assert "MiB (" not in err and "\r" not in err
        # A terminal: one rewritten line on stderr ending at 100%, then a newline.
        publish_mlp(project, "det", "1.1.0", seed=1, ring="ga")
        code, out, err = _update_cli(state, tty=True)
        assert code == 0, err
        assert err.startswith("\rdet 1.1.0: ") and "(100%)" in err, err
        assert "MiB" not in out and "1.1.0" in out  # the report on stdout is unchanged
        # Not a terminal (a pipe, as under systemd or a script): no progress at all.
        publish_mlp(project, "det", "1.2.0", seed=2, ring="ga")
        code, out, err = _update_cli(state, tty=False)
        assert code == 0, err
        assert "1.2.0" in out and "MiB (" not in err and "\r" not in err
