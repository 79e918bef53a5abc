"""A repository served by a plain static web server (nginx, with the documented server block
``docs/serving/nginx-site.conf``) is all a device needs: the repository layout has no server
logic, so S3, a CDN or nginx serve it as well as ``ota serve``.

nginx runs in its own process (``tests.nginx``); CI installs Debian's ``nginx-light``.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ota.client import init_device, update_once
from ota.repository import PublishRequest, publish
from tests import nginx
from tests.onnx_models import big_mlp, fine_tune, save
from tests.repo_helpers import make_project, serve_dir, stock_updater
from tests.updater_world import FAST, current_version

pytestmark = pytest.mark.skipif(not nginx.available(), reason="nginx is not installed")


def _head(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
    req = urllib.request.Request(url, headers=headers or {}, method="GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path, str]]:
    root = tmp_path_factory.mktemp("mirror")
    proj = make_project(root)
    save(big_mlp(4), root / "m1" / "model.onnx")
    publish(proj, PublishRequest(source=root / "m1" / "model.onnx", name="det", version="1.0.0"))
    with nginx.serve_static(root / "repo") as url:
        yield proj, root, url


def test_device_installs_then_updates_by_delta_from_nginx(
    mirror: tuple[Any, Path, str], tmp_path: Path
) -> None:
    proj, root, url = mirror
    trusted = (root / "repo" / "metadata" / "1.root.json").read_bytes()
    dev = tmp_path / "dev"
    init_device(dev, url, trusted, "dev-1", ["det"], ring="canary", health_timeout_s=0)
    first = update_once(dev, fetch_config=FAST)
    assert first.status == "updated", first.to_dict()
    assert current_version(dev) == "1.0.0"
    full = first.outcomes[0].figures["stage"]
    assert full["bytes_downloaded"] == full["bytes_total"]

    # a fine-tune of the same architecture: only the changed chunks cross the network
    save(fine_tune(big_mlp(4), 0.1), root / "m2" / "model.onnx")
    publish(proj, PublishRequest(source=root / "m2" / "model.onnx", name="det", version="1.1.0"))
    second = update_once(dev, fetch_config=FAST)
    assert second.status == "updated", second.to_dict()
    assert current_version(dev) == "1.1.0"
    stage = second.outcomes[0].figures["stage"]
    assert 0 < stage["bytes_downloaded"] < stage["bytes_total"] * 0.5, stage
    assert update_once(dev, fetch_config=FAST).status == "up_to_date"

    # python-tuf's own client verifies the same mirror
    up = stock_updater(url, trusted, tmp_path / "stock")
    up.refresh()
    assert up.get_targetinfo("index/det.json") is not None


def test_nginx_serves_like_ota_serve(mirror: tuple[Any, Path, str]) -> None:
    """Same statuses and the same caching class as ``ota serve`` for every kind of path,
    dotfiles and unserved folders hidden, and byte ranges for resumed blobs."""
    _, root, url = mirror
    repo = root / "repo"
    blob = next(p for p in sorted((repo / "blobs").rglob("*")) if p.is_file())
    target = next(p for p in sorted((repo / "targets").rglob("*")) if p.is_file())
    versioned = next(p for p in sorted((repo / "metadata").glob("[0-9]*.json")))
    (repo / "metadata" / ".lock").write_text("")
    (repo / "trust").mkdir(exist_ok=True)
    (repo / "trust" / "secret.json").write_text("{}")
    paths = {
        "/metadata/timestamp.json": (200, False),
        f"/metadata/{versioned.name}": (200, True),
        f"/{blob.relative_to(repo).as_posix()}": (200, True),
        f"/{target.relative_to(repo).as_posix()}": (200, True),
        "/metadata/.lock": (404, None),
        "/trust/secret.json": (404, None),
        "/metadata/../trust/secret.json": (404, None),
    }
    with serve_dir(repo) as ota_url:
        for path, (status, immutable) in paths.items():
            for base in (url, ota_url):
                code, headers = _head(base + path)
                assert code == status, (base, path, code)
                if immutable is not None:
                    assert ("immutable" in headers.get("cache-control", "")) is immutable, (
                        base,
                        path,
                        headers,
                    )
    code, headers = _head(url + f"/{blob.relative_to(repo).as_posix()}", {"Range": "bytes=3-"})
    assert code == 206
    assert headers["content-range"].startswith("bytes 3-")
    assert int(headers["content-length"]) == blob.stat().st_size - 3


def test_idle_poll_headers_are_lean_and_never_cache_a_missing_root(
    mirror: tuple[Any, Path, str],
) -> None:
    """The next-root probe a device makes every poll: an empty 404 that no cache may keep
    (a cached 404 would hide a root rotation); the timestamp: revalidated, one validator
    (Last-Modified), no version in ``Server``, no ranges on metadata."""
    _, root, url = mirror
    repo = root / "repo"
    newest = max(int(p.name.split(".")[0]) for p in (repo / "metadata").glob("[0-9]*.root.json"))
    missing = f"/metadata/{newest + 1}.root.json"
    req = urllib.request.Request(url + missing)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    err = info.value
    assert err.code == 404
    assert len(err.read()) <= 1
    assert err.headers["Cache-Control"] == "no-cache"
    assert "immutable" not in str(err.headers)
    code, headers = _head(url + "/metadata/timestamp.json")
    assert code == 200
    assert headers["cache-control"] == "no-cache"
    assert "last-modified" in headers and "etag" not in headers
    assert headers["server"] == "nginx"
    assert "accept-ranges" not in headers
    # The head is never a 304 (its validator has one-second granularity: review, see
    # test_nginx_head_revalidation); versioned metadata, never rewritten, still is.
    since = {"If-Modified-Since": headers["last-modified"]}
    code, _ = _head(url + "/metadata/timestamp.json", since)
    assert code == 200
    code, headers = _head(url + "/metadata/1.root.json")
    code, _ = _head(url + "/metadata/1.root.json", {"If-Modified-Since": headers["last-modified"]})
    assert code == 304
    # Other missing paths get the same empty 404.
    code, headers = _head(url + "/trust/secret.json")
    assert code == 404 and headers["content-length"] in ("0", "1")
