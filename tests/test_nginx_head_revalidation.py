"""Attack on the documented nginx server block's validators (review of issue 13).

nginx's only validators for a static file are its mtime in whole seconds (Last-Modified, and
the ETag it derives from mtime and size). Two publishes within one second write two
timestamp.json files of the same size (version n and n+1, same digits, fixed-size
signatures) with the same Last-Modified: a CDN revalidating its copy of the first got a 304
and kept serving the older head until the next publish in another second, so a release
(a security fix) stayed invisible to every device behind it.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests import nginx

pytestmark = pytest.mark.skipif(not nginx.available(), reason="nginx is not installed")


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read(), {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}


def test_a_head_rewritten_within_the_same_second_is_never_a_304(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "metadata").mkdir(parents=True)
    head = repo / "metadata" / "timestamp.json"
    head.write_bytes(b'{"version": 41}\n')
    stamp = head.stat().st_mtime_ns
    with nginx.serve_static(repo) as url:
        code, body, headers = _get(url + "/metadata/timestamp.json")
        assert code == 200 and body == b'{"version": 41}\n'
        # the next publish, in the same second: same size, new bytes
        head.write_bytes(b'{"version": 42}\n')
        os.utime(head, ns=(stamp, stamp))
        since = {"If-Modified-Since": headers["last-modified"]}
        code, body, _ = _get(url + "/metadata/timestamp.json", since)
        assert (code, body) == (200, b'{"version": 42}\n')
        # root.json (the unversioned copy a root ceremony rewrites) alike
        (repo / "metadata" / "root.json").write_bytes(b"{}")
        code, _, headers = _get(url + "/metadata/root.json")
        code, _, _ = _get(
            url + "/metadata/root.json", {"If-Modified-Since": headers["last-modified"]}
        )
        assert code == 200
