"""Prometheus metrics of the fleet service: ``GET /metrics`` (prometheus-client).

Under gunicorn every worker is its own process. Counters and histograms are then kept in
files under ``PROMETHEUS_MULTIPROC_DIR`` (made fresh by :func:`prepare_multiprocess`, which
``ota fleet serve`` calls in the master before any worker imports prometheus-client; a dead
worker's live gauges are dropped by :func:`child_exit`), and ``/metrics`` merges every worker's
files. The fleet gauges (devices by model, version, ring, tier and by health) come from the
database's cached fleet summary (``_summary``), the same figures ``GET /v1/fleet`` serves:
one truth, never per process; at most ``max_age`` seconds old (``summary_max_age_s``, or the
scrape's ``?max_age=``), as ``edge_ota_fleet_summary_age_seconds`` says.

Naming (Prometheus conventions): one prefix ``edge_ota_fleet_``, base units (seconds),
``_total`` on counters. Every label has a bounded set of values: route names, HTTP status
codes, fixed outcome words, refusal reasons (code words, anything else counted as ``other``),
and model/version/ring/tier as stored (bounded by what is published, capped at
``MAX_MODEL_SERIES`` series); never a device id or a token.

The rollout gauges (``edge_ota_rollout_*``, :mod:`ota.rollout._metrics`: each live rollout's
stage, percentage, state and latest gate statuses, values and thresholds) are served here
too, read from the database at each scrape in one bounded statement.

``/metrics`` needs an operator token of scope ``read`` (fleet composition is not public);
Prometheus sends it with ``authorization: {credentials_file: ...}``.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, request

# prometheus-client is imported lazily: it picks its value storage (per process, or files in
# PROMETHEUS_MULTIPROC_DIR) when first imported, so the gunicorn master must be able to import
# this module (prepare_multiprocess, child_exit) before setting that variable.

PREFIX = "edge_ota_fleet_"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
MAX_MODEL_SERIES = 5000
_REASON_RE = re.compile(r"[a-z][a-z_]{0,39}")
# seconds: a report is a few ms on PostgreSQL; SQLite under a lock can wait up to its timeout
_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
_EVENT_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200)


@dataclass(frozen=True)
class _Metrics:
    requests: Any
    request_seconds: Any
    reports: Any
    report_seconds: Any
    events: Any
    events_per_report: Any
    rejected: Any
    enrolments: Any

    def all(self) -> tuple[Any, ...]:
        return (
            self.requests,
            self.request_seconds,
            self.reports,
            self.report_seconds,
            self.events,
            self.events_per_report,
            self.rejected,
            self.enrolments,
        )


@functools.cache
def _m() -> _Metrics:
    from prometheus_client import Counter, Histogram

    return _Metrics(
        requests=Counter(
            f"{PREFIX}http_requests_total",
            "HTTP requests answered, by route and status",
            ["route", "status"],
        ),
        request_seconds=Histogram(
            f"{PREFIX}http_request_duration_seconds",
            "Time to answer an HTTP request, by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
        ),
        reports=Counter(
            f"{PREFIX}reports_total",
            "Device reports (edge-ota.report/1), by outcome: accepted or rejected",
            ["outcome"],
        ),
        report_seconds=Histogram(
            f"{PREFIX}report_duration_seconds",
            "Time to ingest one device report (accepted ones)",
            buckets=_LATENCY_BUCKETS,
        ),
        events=Counter(
            f"{PREFIX}events_ingested_total", "New events stored (resent duplicates not counted)"
        ),
        events_per_report=Histogram(
            f"{PREFIX}report_events",
            "New events stored per accepted report",
            buckets=_EVENT_BUCKETS,
        ),
        rejected=Counter(
            f"{PREFIX}requests_rejected_total",
            "Requests refused, by route and reason (the JSON error's code)",
            ["route", "reason"],
        ),
        enrolments=Counter(
            f"{PREFIX}enrolments_total", "Enrolment attempts, by outcome", ["outcome"]
        ),
    )


def observe_report(outcome: str, seconds: float, events: int) -> None:
    """Count one device report: ``outcome`` is ``accepted`` or ``rejected``; ``events`` is the
    number of new events it stored. Called for every report by :func:`register_metrics`'s
    request hook; ingestion code elsewhere (a batch importer) may call it too."""
    m = _m()
    m.reports.labels("accepted" if outcome == "accepted" else "rejected").inc()
    if outcome == "accepted":
        m.report_seconds.observe(seconds)
        m.events.inc(max(0, events))
        m.events_per_report.observe(max(0, events))


def prepare_multiprocess(path: str | None = None) -> str:
    """Give the worker processes one folder for their metric files, in the environment
    (``PROMETHEUS_MULTIPROC_DIR``) they inherit. Call in the gunicorn master before forking.
    In a given ``path`` only prometheus-client's own files (``*.db``) of an earlier run are
    removed (they would add up); nothing else in it is touched. Else a new temporary folder."""
    if path:
        folder = Path(path)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in folder.glob("*.db"):
            if stale.is_file():
                stale.unlink()
    else:
        path = tempfile.mkdtemp(prefix="ota-fleet-metrics-")
    os.environ[MULTIPROC_ENV] = path
    return path


def child_exit(_server: Any, worker: Any) -> None:
    """gunicorn's ``child_exit`` hook: forget a dead worker's live gauges."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def gunicorn_settings(_config: Any) -> dict[str, Any]:
    """gunicorn settings for observability (``ota fleet serve`` applies them in the master,
    before any worker forks): JSON log lines (``fleet._logs``), and for multiprocess metrics an
    emptied ``PROMETHEUS_MULTIPROC_DIR`` (the one set in
    the environment, else a new temporary folder, removed when the master exits) and the hook
    that drops a dead worker's live values."""
    given = os.environ.get(MULTIPROC_ENV) or None
    path = prepare_multiprocess(given)

    def on_exit(_server: Any) -> None:
        if given is None:
            shutil.rmtree(path, ignore_errors=True)

    from ._logs import gunicorn_logconfig

    return {"child_exit": child_exit, "on_exit": on_exit, "logconfig_dict": gunicorn_logconfig()}


def _reason(value: Any) -> str:
    text = str(value or "")
    return text if _REASON_RE.fullmatch(text) else "other"


class _FleetCollector:
    """Fleet gauges from the cached fleet summary (``_summary.cached_summary``, ADR 0007):
    a scrape reads one row while the count is younger than ``max_age`` seconds, and at most
    one worker recounts it when it is older, so a scrape costs the same at 100 devices and at
    100,000 (a count at every scrape took 0.26-0.30 s there). ``summary_age_seconds`` says how
    old the figures are; ``max_age=0`` (query parameter) counts now."""

    def __init__(self, engine: Any, read_engine: Any, silent_after_s: float, max_age: float):
        self.engine = engine
        self.read_engine = read_engine
        self.silent_after_s = silent_after_s
        self.max_age = max_age

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from ._summary import cached_summary

        t0 = time.perf_counter()
        now = time.time()
        doc = cached_summary(self.engine, self.read_engine, now, self.silent_after_s, self.max_age)
        devices = doc["devices"]
        health = GaugeMetricFamily(
            f"{PREFIX}devices", "Enrolled, unrevoked devices by health", labels=["health"]
        )
        for h, n in devices["by_health"].items():
            health.add_metric([str(h)], float(n))
        yield health
        yield GaugeMetricFamily(
            f"{PREFIX}devices_revoked", "Revoked devices", value=float(devices["revoked"])
        )
        yield GaugeMetricFamily(
            f"{PREFIX}devices_silent",
            "Unrevoked devices not heard from within the silence threshold",
            value=float(devices["silent"]),
        )
        rows = doc["models"]
        if len(rows) > MAX_MODEL_SERIES:  # the largest series, as before the cache
            rows = sorted(rows, key=lambda r: -int(r["devices"]))
        models = GaugeMetricFamily(
            f"{PREFIX}model_devices",
            "Unrevoked devices running a model version, by ring and "
            "tier (as the devices last reported)",
            labels=["model", "version", "ring", "tier"],
        )
        for r in rows[:MAX_MODEL_SERIES]:
            models.add_metric(
                [str(r["model"]), str(r["version"]), str(r["ring"]), str(r["tier"])],
                float(r["devices"]),
            )
        yield models
        yield GaugeMetricFamily(
            f"{PREFIX}model_series_truncated",
            f"1 when more than {MAX_MODEL_SERIES} model series exist",
            value=float(len(rows) > MAX_MODEL_SERIES),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}summary_age_seconds",
            "How long before this scrape the fleet gauges were counted",
            value=max(0.0, now - float(doc["as_of"])),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}scrape_query_seconds",
            "Time the fleet gauges took to read (or recount) the fleet summary",
            value=time.perf_counter() - t0,
        )


def _registry(collector: _FleetCollector, *extra: Any) -> Any:
    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        for c in _m().all():
            registry.register(c)
    registry.register(collector)
    for c in extra:
        registry.register(c)
    return registry


def register_metrics(app: Flask) -> None:
    """Count every request of ``app`` and serve ``GET /metrics`` (scope ``read``)."""
    ext = app.extensions["ota_fleet"]
    config = ext["config"]
    m = _m()

    @app.before_request
    def _start() -> None:
        g.ota_t0 = time.perf_counter()

    @app.after_request
    def _count(resp: Response) -> Response:
        t0 = g.get("ota_t0")
        if t0 is None:
            return resp
        seconds = time.perf_counter() - t0
        route = request.endpoint or "unmatched"
        if route == "metrics":
            return resp
        m.requests.labels(route, str(resp.status_code)).inc()
        m.request_seconds.labels(route).observe(seconds)
        if resp.status_code >= 400:
            m.rejected.labels(route, _reason(g.get("ota_reject"))).inc()
        if route == "events":
            ok = resp.status_code < 300
            observe_report(
                "accepted" if ok else "rejected", seconds, int(g.get("ota_ingested") or 0)
            )
        elif route == "enroll":
            m.enrolments.labels("accepted" if resp.status_code < 300 else "rejected").inc()
        return resp

    from ._logs import register_request_log

    register_request_log(app)  # observability's other half: refusals as JSON log lines

    @app.get("/metrics")
    def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from sqlalchemy.orm import Session

        from . import _secrets, _store

        with Session(ext["engine"]) as s, s.begin():
            _store.authenticate_operator(
                s, _secrets.bearer(request.headers.get("Authorization")), "read", time.time()
            )
        from ota.rollout._metrics import RolloutCollector

        collector = _FleetCollector(
            ext["engine"], ext["read_engine"], config.silent_after_s, _max_age(config)
        )
        # the live rollouts' stage, percentage and gates (ADR 0011): one bounded read
        rollouts = RolloutCollector(ext["read_engine"])
        return Response(
            generate_latest(_registry(collector, rollouts)), mimetype=CONTENT_TYPE_LATEST
        )


def _max_age(config: Any) -> float:
    """``?max_age=`` of a scrape (0-86400 s, ASCII digits), else the summary's default."""
    from ._validate import bad

    raw = request.args.get("max_age")
    if raw is None:
        return float(config.summary_max_age_s)
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 6 or int(raw) > 86400:
        raise bad("'max_age' must be an integer between 0 and 86400")
    return float(raw)
