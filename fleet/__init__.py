"""The fleet service: device enrolment, report ingestion (``edge-ota.report/1``), fleet state
derived from events, and the operator API. Installed by the ``server`` extra; a device never
imports it.

Public surface: :func:`create_app` (Flask app factory), :class:`FleetConfig`,
:func:`migrate`, :func:`default_db_url`. See docs/adr/0007-fleet-service.md.
"""

from ._app import create_app
from ._config import FleetConfig, default_db_url
from ._db import migrate

__all__ = ["FleetConfig", "create_app", "default_db_url", "migrate"]
