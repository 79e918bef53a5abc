"""The fleet service: device enrolment, report ingestion (``edge-ota.report/1``), fleet state
derived from events, and the operator API. Installed by the ``server`` extra; a device never
imports it.

Public surface: :func:`create_app` (Flask app factory), :class:`FleetConfig`,
:func:`migrate`, :func:`default_db_url`, :func:`fleet_exposure` (which devices run given
releases, asked of a running service). Names are imported lazily, so ``ota.fleet._query``
(the operator-side HTTP client) works without Flask or SQLAlchemy installed. See
docs/adr/0007-fleet-service.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._app import create_app
    from ._config import FleetConfig, default_db_url
    from ._db import migrate
    from ._query import fleet_exposure

__all__ = ["FleetConfig", "create_app", "default_db_url", "fleet_exposure", "migrate"]
_WHERE = {
    "create_app": "_app",
    "FleetConfig": "_config",
    "default_db_url": "_config",
    "migrate": "_db",
    "fleet_exposure": "_query",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
