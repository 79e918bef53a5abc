"""Run the fleet service under gunicorn (never Flask's development server).

Each worker builds its own app (and connection pool) after the fork, so no database
connection is shared between processes. The schema is migrated once, by the caller, before
the workers start.
"""

from __future__ import annotations

from typing import Any

from ._config import FleetConfig


def serve(
    config: FleetConfig, *, bind: str, workers: int, timeout_s: int = 30, access_log: bool = False
) -> None:
    """Block serving ``config`` on ``bind`` with ``workers`` sync workers."""
    from gunicorn.app.base import BaseApplication

    class _App(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            settings: dict[str, Any] = {
                "bind": [bind],
                "workers": workers,
                "worker_class": "sync",
                "timeout": timeout_s,
                "graceful_timeout": 10,
                "keepalive": 5,
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

            return create_app(config)

    _App().run()
