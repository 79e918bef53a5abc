"""``ota serve``: read-only HTTP for a local repository (metadata, targets, blobs), with Range.

A Flask app factory, so the fleet service can mount the same routes later. Paths are joined
with werkzeug's ``safe_join`` (no traversal) and only three top-level folders are served.
"""

from __future__ import annotations

import sys
from pathlib import Path

from flask import Flask, Response, abort, send_from_directory

_SERVED = ("metadata", "targets", "blobs")


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
        response = send_from_directory(root / area, rest, conditional=True, max_age=0)
        # Metadata and the head change; blobs and consistent-snapshot files never do.
        if area == "metadata" and rest == "timestamp.json":
            response.headers["Cache-Control"] = "no-cache"
        elif area != "metadata" or rest[:1].isdigit():
            response.headers["Cache-Control"] = "public, max-age=31536000, immutable"
        return response

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def serve_forever(root: Path, host: str, port: int) -> None:
    """Run a threaded server until interrupted."""
    from werkzeug.serving import make_server

    server = make_server(host, port, create_app(root), threaded=True)
    print(f"serving {root} on http://{host}:{server.server_port}", flush=True)
    print("note: this is the embedded server; for a fleet, serve the folder with nginx, S3 or"
          " a CDN (docs/serving/)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
