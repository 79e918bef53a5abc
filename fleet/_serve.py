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

from collections.abc import Callable, Iterable
from typing import Any

from ._config import FleetConfig

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

KEEPALIVE_S = 15  # longer than a device's pause between two batches of one flush


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
            from ._app import create_app

            return close_after_errors(create_app(config))

    _App().run()


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
