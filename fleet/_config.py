"""The fleet service's configuration: where the database is, and every bound on untrusted input.

Invariant: every quantity a device or an operator controls (body size, batch size, string
lengths, nesting depth, report rate) has a limit here, checked before any database write.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DB_ENV = "OTA_FLEET_DB"
DB_FILE = "fleet.sqlite3"


@dataclass(frozen=True)
class FleetConfig:
    """Settings of one fleet service (the same for every worker sharing a database)."""

    db_url: str
    # Device reports (edge-ota.report/1). The client sends at most 100 events and 512 KiB.
    max_report_bytes: int = 1024 * 1024
    max_events_per_report: int = 200
    max_event_data_bytes: int = 64 * 1024
    max_models_per_device: int = 256
    # Operator and enrolment bodies are small documents.
    max_request_bytes: int = 64 * 1024
    max_json_depth: int = 16
    # Per-device report rate, counted in the database (so it holds across workers).
    rate_window_s: float = 60.0
    rate_max_reports: int = 120
    # SQLite only: how long a writer waits for the file lock before answering 503.
    busy_timeout_ms: int = 10_000
    # Retention of raw events (derived state is kept).
    retention_days: float = 90.0
    # A device unheard of for this long counts as silent in the summary.
    silent_after_s: float = 24 * 3600.0
    # ``GET /v1/fleet`` serves a summary counted at most this long ago unless asked otherwise
    # (``?max_age=``); the reply's ``as_of`` says when it was counted.
    summary_max_age_s: float = 10.0
    # Timeline length in ``GET /v1/devices/<id>``.
    timeline_events: int = 100
    # Answer 503 instead of hanging when the pool is exhausted or the DB does not answer.
    pool_timeout_s: float = 10.0
    connect_timeout_s: int = 5


def default_db_url(project_dir: str | Path = ".") -> str:
    """``OTA_FLEET_DB`` if set, else a SQLite file in the project folder."""
    env = os.environ.get(DB_ENV, "").strip()
    if env:
        return env
    return f"sqlite:///{(Path(project_dir).resolve() / DB_FILE).as_posix()}"
