"""``ota serve``: read-only HTTP for a local repository (metadata, targets, blobs), with Range.

A Flask app factory, so the fleet service can mount the same routes later. Paths are joined
with werkzeug's ``safe_join`` (no traversal) and only three top-level folders are served.

Compression follows ``docs/serving/nginx-site.conf`` (ADR 0010): versioned snapshot and role
metadata (:func:`~ota.repository._storage.gzip_eligible`) of at least 1 KiB is sent
``Content-Encoding: gzip`` to a client whose ``Accept-Encoding`` allows gzip, with
``Vary: Accept-Encoding``; ``timestamp.json``, roots, targets and blobs are always sent as they
are. The compressed body of an immutable file is kept in a cache keyed by its path, size, mtime
and inode and bounded by total bytes (``GZIP_CACHE_BYTES``), so a fleet polling the same
snapshot compresses it once and no client can pin more memory than that.
"""

from __future__ import annotations

import collections
import gzip
import os
import sys
import threading
from pathlib import Path
from typing import Any

from flask import Flask, Response, abort, request, send_from_directory
from werkzeug.security import safe_join

from ota.repository._storage import GZIP_MIN_BYTES, IMMUTABLE, gzip_eligible

_SERVED = ("metadata", "targets", "blobs")
# Headers a device never uses, dropped to keep an idle poll under 1 KiB on the wire as through
# nginx (docs/serving/nginx-site.conf): the file name, a second Date, validators (a poll asks
# for the whole timestamp; an mtime validator can answer 304 for a file rewritten within the
# same second) and ranges on metadata, which is never fetched in parts.
_METADATA_DROP = (
    "Content-Disposition",
    "Date",
    "Expires",
    "ETag",
    "Last-Modified",
    "Accept-Ranges",
)
_GZIP_MAX_BYTES = 8 << 20  # python-tuf reads at most 5 MB of a role: larger is sent plain


GZIP_CACHE_BYTES = 32 << 20  # compressed bodies kept, in all: a fleet's current files fit
_cache: collections.OrderedDict[tuple[str, int, int, int], bytes] = collections.OrderedDict()
_cache_lock = threading.Lock()


def _gzip_cache_clear() -> None:
    with _cache_lock:
        _cache.clear()


def _gzipped(path: str, size: int, mtime_ns: int) -> bytes | None:
    """``path`` compressed (level 6, as nginx-site.conf), or None if it changed under us.

    Kept in a least-recently-used cache bounded by the total size of the compressed bodies
    (``GZIP_CACHE_BYTES``), not their count: a client requesting many old, large versions
    cannot pin more than that in memory. Keyed by path, size, mtime and inode."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
            return None
        key = (path, size, mtime_ns, st.st_ino)
        with _cache_lock:
            body = _cache.get(key)
            if body is not None:
                _cache.move_to_end(key)
                return body
        data = f.read(size + 1)
    if len(data) != size:
        return None
    body = gzip.compress(data, 6, mtime=0)
    if len(body) <= GZIP_CACHE_BYTES // 4:
        with _cache_lock:
            _cache[key] = body
            total = sum(len(b) for b in _cache.values())
            while total > GZIP_CACHE_BYTES:
                _, dropped = _cache.popitem(last=False)
                total -= len(dropped)
    return body


def _maybe_gzip(root: Path, rest: str) -> Response | None:
    """The gzip response for ``metadata/<rest>`` if it is eligible and the client asked."""
    eligible = gzip_eligible(f"metadata/{rest}")
    if not eligible or request.accept_encodings.quality("gzip") <= 0 or "Range" in request.headers:
        return None
    path = safe_join(str(root / "metadata"), rest)
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not GZIP_MIN_BYTES <= st.st_size <= _GZIP_MAX_BYTES:
        return None
    body = _gzipped(path, st.st_size, st.st_mtime_ns)
    if body is None:
        return None
    response = Response(body, mimetype="application/json")
    response.headers["Content-Encoding"] = "gzip"
    response.headers["Vary"] = "Accept-Encoding"
    response.headers["Cache-Control"] = IMMUTABLE
    return response


def create_app(root: Path) -> Flask:
    """A Flask app serving ``root/{metadata,targets,blobs}`` read-only."""
    app = Flask("ota.repository.serve")
    root = Path(root).resolve()

    @app.get("/<area>/<path:rest>")
    def files(area: str, rest: str) -> Response:
        if area not in _SERVED:
            abort(404)
        if any(part.startswith(".") for part in rest.split("/")):
            abort(404)  # temp files and locks of the file backend
        if area == "metadata" and (gz := _maybe_gzip(root, rest)) is not None:
            return gz
        response = send_from_directory(root / area, rest, conditional=area != "metadata", max_age=0)
        for name in _METADATA_DROP if area == "metadata" else ("Content-Disposition", "Date"):
            del response.headers[name]
        if area == "metadata" and gzip_eligible(f"metadata/{rest}"):
            response.headers["Vary"] = "Accept-Encoding"  # a cache must not mix the two
        # Metadata and the head change; blobs and consistent-snapshot files never do.
        if area == "metadata" and rest == "timestamp.json":
            response.headers["Cache-Control"] = "no-cache"
        elif area != "metadata" or rest[:1].isdigit():
            response.headers["Cache-Control"] = "public, max-age=31536000, immutable"
        return response

    @app.errorhandler(404)
    def not_found(_error: Exception) -> Response:
        response = Response(b"", 404)  # the root probe's usual answer: no page on every poll
        del response.headers["Content-Type"]
        return response

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def make_server(root: Path, host: str, port: int) -> Any:
    """A threaded werkzeug server for :func:`create_app` whose ``Server`` header names no
    versions."""
    from werkzeug.serving import WSGIRequestHandler
    from werkzeug.serving import make_server as _make

    class _Handler(WSGIRequestHandler):
        server_version = "ota"
        sys_version = ""

        def version_string(self) -> str:
            return "ota"

    return _make(host, port, create_app(root), threaded=True, request_handler=_Handler)


def serve_forever(root: Path, host: str, port: int) -> None:
    """Run a threaded server until interrupted."""
    server = make_server(root, host, port)
    print(f"serving {root} on http://{host}:{server.server_port}", flush=True)
    print(
        "note: this is the embedded server; for a fleet, serve the folder with nginx, S3 or"
        " a CDN (docs/serving/)",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()
