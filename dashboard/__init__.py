"""The operator dashboard (issue 10, ADR 0016): server-rendered pages on the fleet service.

``register(app)`` mounts it at ``/dashboard`` on a fleet app (``ota.fleet._app.create_app``
calls it). Flask + Jinja2 templates, inline SVG charts drawn on the server, one stylesheet,
no JavaScript; sessions from operator tokens (:mod:`._security`).
"""

from __future__ import annotations

from ._views import register

__all__ = ["register"]
