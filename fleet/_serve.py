"""Run the fleet service under gunicorn (never Flask's development server).

Each worker builds its own app (and connection pool) after the fork, so no database
connection is shared between processes. The schema is migrated once, by the caller, before
the workers start.

Workers are gunicorn's ``gthread`` class: each runs ``threads`` request threads (each with
its own pooled database connection while it serves a request) and keeps idle HTTP/1.1
connections open for ``KEEPALIVE_S`` (a device's batches, a dashboard's polls and a
Prometheus scrape reuse one connection; sync workers close every connection, so each request
paid a TCP handshake and an accept). A thread waiting on the database gives the GIL to
another, so a worker overlaps one report's round trips with another's Python.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from ._config import FleetConfig

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

KEEPALIVE_S = 15  # longer than a device's pause between two batches of one flush


def json_protocol_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's reply to a request it refuses before the app sees it (a malformed request
    line or header, e.g. ``Content-Length: nU}]``), as the service's JSON error object instead
    of gunicorn's HTML page, so every 4xx of the API has the documented shape (OpenAPI).
    gunicorn offers no hook for this body: its ``util.write_error`` is replaced in each worker
    (same signature; the connection is closed as gunicorn does)."""
    from gunicorn import util

    code = {400: "malformed_http", 403: "forbidden", 414: "uri_too_long",
            417: "expectation_failed", 431: "headers_too_large",
            501: "not_implemented"}.get(status_int, "malformed_http")  # fmt: skip
    body = json.dumps({"error": code, "message": f"{reason}: {mesg}"[:500]}).encode()
    head = (
        f"HTTP/1.1 {int(status_int)} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)


def serve(
    config: FleetConfig,
    *,
    bind: str,
    workers: int,
    threads: int = 4,
    timeout_s: int = 30,
    access_log: bool = False,
) -> None:
    """Block serving ``config`` on ``bind`` with ``workers`` processes of ``threads`` threads."""
    from gunicorn.app.base import BaseApplication

    class _App(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            settings: dict[str, Any] = {
                "bind": [bind],
                "workers": workers,
                "worker_class": "gthread",
                "threads": threads,
                "timeout": timeout_s,
                "graceful_timeout": 10,
                "keepalive": KEEPALIVE_S,
                # bounded request line and headers (gunicorn's own limits, made explicit)
                "limit_request_line": 8190,
                "limit_request_fields": 64,
                "limit_request_field_size": 8190,
                "accesslog": "-" if access_log else None,
                "errorlog": "-",
                "proc_name": "ota-fleet",
                # no shared control socket in $HOME: several services may run side by side
                "control_socket_disable": True,
            }
            try:  # the metrics module may need gunicorn hooks (multiprocess mode)
                from ._metrics import (  # type: ignore[import-not-found,unused-ignore]
                    gunicorn_settings,
                )
            except ImportError:
                pass
            else:
                settings.update(gunicorn_settings(config))
            for key, value in settings.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            from gunicorn import util

            from ._app import create_app

            util.write_error = json_protocol_error

            return close_after_errors(create_app(config))

    server = _App()  # its config sets PROMETHEUS_MULTIPROC_DIR before anything imports the client
    # the app's modules load once, here in the master, so the forked workers share them instead
    # of each importing them (the dashboard pulls in the publisher's and tuf's modules, ~0.5 s
    # of CPU a worker); each worker still builds its own app and connection pool in load()
    import ota.dashboard
    import ota.fleet._app
    import ota.fleet._mtls  # noqa: F401

    server.run()


def close_after_errors(app: WsgiApp) -> WsgiApp:
    """``app``, whose error replies (4xx/5xx) close the connection (``Connection: close``).

    A refusal is often answered without reading the body (401 before the report is parsed,
    413 by its ``Content-Length``, 415); gunicorn then drains at most 64 KiB of what is left
    before it keeps the connection, and otherwise closes it silently *after* a keep-alive
    reply, so the client's next request on it fails. Saying so in the reply lets every client
    reconnect instead. Uses gunicorn's response object (``start_response.__self__``); with
    any other server it changes nothing."""

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def start(status: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
            if status[:1] in ("4", "5"):
                force = getattr(getattr(start_response, "__self__", None), "force_close", None)
                if callable(force):
                    force()
            return start_response(status, headers, *exc)

        return app(environ, start)

    return wrapped
