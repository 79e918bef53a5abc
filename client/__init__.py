"""The device updater: verified, resumable, delta-aware A/B installs with smoke inference.

Public API (everything else is private):

* :func:`init_device`, :func:`update_once`, :func:`status`, :func:`confirm`, :func:`revert`,
  :func:`forget_failure`, :func:`run_daemon`, :func:`report_events` - what ``ota device
  init|update|status|confirm|revert|forget-failure|run|report`` call (events reach the fleet
  service through :mod:`ota.client._report`, protocol ``edge-ota.report/1``);
* :func:`current_model` - for apps: the path of the committed model file;
* result types with ``to_dict()`` for ``--json``: :class:`UpdateResult` (``.exit_code``),
  :class:`ModelOutcome`, :class:`DeviceStatus`;
* configuration: :class:`DeviceConfig`, :class:`FetchConfig`, :class:`DaemonConfig`;
* seams for tests and integrators: :class:`Verifier`, :class:`SmokeRunner`.

Importing this package imports none of its modules (each public name is imported on first
use), and no server, publisher or ML dependency (flask, cyclonedx, onnx,
onnxruntime are never imported here; boto3 only if installed, by securesystemslib, which the
``ota device`` commands prevent: :mod:`ota._lean`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ota._lazy import exports

if TYPE_CHECKING:
    from ota.client._daemon import DaemonConfig, run_daemon
    from ota.client._events import Event, EventQueue
    from ota.client._fetch import FetchConfig, SlowRetrievalError
    from ota.client._install import SmokeRunner, Verifier
    from ota.client._report import ReportOutcome
    from ota.client._slots import current_model
    from ota.client._state import DeviceConfig
    from ota.client._telemetry import Telemetry
    from ota.client._updater import (
        DeviceStatus,
        ModelOutcome,
        UpdateResult,
        confirm,
        forget_failure,
        init_device,
        report_events,
        revert,
        status,
        update_once,
    )

# Public name -> the private module that defines it. Imported on first use (PEP 562): the
# publisher reuses small client helpers (``ota.client._policy.semver_key``,
# ``ota.client._smoke_child``), and importing them must not import the updater, python-tuf's
# client and the telemetry stack with this package (0.3 s of CPU in a fresh ``ota publish``,
# issue 13).
_LAZY = {
    "DaemonConfig": "_daemon",
    "run_daemon": "_daemon",
    "Event": "_events",
    "EventQueue": "_events",
    "FetchConfig": "_fetch",
    "SlowRetrievalError": "_fetch",
    "SmokeRunner": "_install",
    "Verifier": "_install",
    "ReportOutcome": "_report",
    "current_model": "_slots",
    "DeviceConfig": "_state",
    "Telemetry": "_telemetry",
    "DeviceStatus": "_updater",
    "ModelOutcome": "_updater",
    "UpdateResult": "_updater",
    "confirm": "_updater",
    "forget_failure": "_updater",
    "init_device": "_updater",
    "report_events": "_updater",
    "revert": "_updater",
    "status": "_updater",
    "update_once": "_updater",
}


__getattr__, __dir__ = exports(__name__, _LAZY, globals())


__all__ = [
    "DaemonConfig",
    "DeviceConfig",
    "DeviceStatus",
    "Event",
    "EventQueue",
    "FetchConfig",
    "ModelOutcome",
    "ReportOutcome",
    "SlowRetrievalError",
    "SmokeRunner",
    "Telemetry",
    "UpdateResult",
    "Verifier",
    "confirm",
    "current_model",
    "forget_failure",
    "init_device",
    "report_events",
    "revert",
    "run_daemon",
    "status",
    "update_once",
]
