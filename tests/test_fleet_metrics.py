"""``GET /metrics`` of the real service under gunicorn (2 workers, multiprocess mode) on
SQLite and PostgreSQL: after a known ingestion the counters, histograms and fleet gauges hold
exactly what happened, merged across workers; names follow Prometheus conventions; no label
carries a device id; the endpoint needs a read token."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fleet_fixtures import (  # noqa: F401 - fixtures used by name
    FleetService,
    call,
    fleet_backend,
    fleet_service,
    postgres,
)

PREFIX = "edge_ota_fleet_"


def report(
    device_id: str, seqs: list[int], *, version: str = "1.0.0", queue: str = "q-1"
) -> dict[str, Any]:
    return {
        "format": "edge-ota.report/1",
        "device": {
            "id": device_id,
            "ring": "canary",
            "tier": "default",
            "arch": "x86_64",
            "runtime_version": "1.31.1",
            "client_version": "0.1.0",
            "models": {"det": {"version": version, "counter": 1}},
        },
        "queue": queue,
        "dropped": 0,
        "events": [
            {
                "seq": s,
                "time": 1_700_000_000.0 + s,
                "kind": "confirmed",
                "model": "det",
                "version": version,
                "data": {"by": "auto"},
            }
            for s in seqs
        ],
    }


def scrape(
    svc: FleetService, token: str, max_age: int = 0
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The scrape's samples; the fleet gauges counted now (``max_age=0``) unless told."""
    r = call("GET", f"{svc.url}/metrics?max_age={max_age}", token=token)
    assert r.status == 200, r.raw[:500]
    assert r.headers["content-type"].startswith("text/plain")
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for fam in text_string_to_metric_families(r.raw.decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(
    m: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in m.items() if n == PREFIX + name and want <= ls)


def test_metrics_count_what_was_ingested(fleet_service: FleetService) -> None:
    svc = fleet_service
    creds = {d: svc.enroll(d, ring="canary") for d in ("cam-1", "cam-2", "cam-3")}
    url = f"{svc.url}/v1/devices/{{}}/events"
    ok = [
        call("POST", url.format("cam-1"), report("cam-1", [1, 2, 3]), token=creds["cam-1"]),
        call("POST", url.format("cam-1"), report("cam-1", [1, 2, 3]), token=creds["cam-1"]),
        call(
            "POST",
            url.format("cam-2"),
            report("cam-2", [1, 2], version="1.1.0"),
            token=creds["cam-2"],
        ),
    ]
    assert [r.status for r in ok] == [200, 200, 200], [r.doc for r in ok]
    refused = [
        # another device's credential: a device can report only as itself
        call("POST", url.format("cam-1"), report("cam-1", [4]), token=creds["cam-2"]),
        call("POST", url.format("cam-3"), {"format": "nope"}, token=creds["cam-3"]),
    ]
    assert [r.status for r in refused] == [401, 400], [r.doc for r in refused]

    assert call("GET", f"{svc.url}/metrics").status == 401
    m = scrape(svc, svc.operator_token("read"))

    assert value(m, "reports_total", outcome="accepted") == 3
    assert value(m, "reports_total", outcome="rejected") == 2
    assert value(m, "events_ingested_total") == 5  # the resent batch is not counted again
    assert value(m, "report_duration_seconds_count") == 3
    assert value(m, "report_events_count") == 3 and value(m, "report_events_sum") == 5
    assert value(m, "requests_rejected_total", route="events", reason="unauthorized") == 1
    assert value(m, "requests_rejected_total", route="events") == 2
    assert value(m, "enrolments_total", outcome="accepted") == 3
    assert value(m, "http_requests_total", route="events", status="200") == 3
    assert value(m, "http_request_duration_seconds_count", route="events") == 5

    assert value(m, "model_devices", model="det", version="1.0.0", ring="canary") == 1
    assert value(m, "model_devices", model="det", version="1.1.0", ring="canary") == 1
    assert value(m, "devices") == 3
    assert value(m, "devices_revoked") == 0
    assert value(m, "devices_silent") == 1  # cam-3 never got a report in

    # whichever worker answers the scrape, it merges every worker's counts (multiprocess)
    read = svc.operator_token("read")
    assert {value(scrape(svc, read), "events_ingested_total") for _ in range(8)} == {5}

    r = call("POST", f"{svc.url}/v1/devices/cam-2/revoke", {}, token=svc.admin_token)
    assert r.status == 200, r.doc
    m = scrape(svc, svc.operator_token("read"))
    assert value(m, "devices_revoked") == 1 and value(m, "devices") == 2
    assert value(m, "model_devices", version="1.1.0") == 0

    for (name, labels), _ in m.items():
        # the fleet's own, and the rollout gauges it also serves (rollout/_metrics.py)
        assert name.startswith((PREFIX, "edge_ota_rollout_")) or not name.startswith("edge_ota")
        assert not any(v in creds for _, v in labels), (name, labels)  # never a device id
        if name.endswith("_total"):
            assert not re.search(r"_seconds_total$", name)
        assert "milliseconds" not in name and "_ms" not in name


def test_fleet_gauges_come_from_the_cached_summary(fleet_service: FleetService) -> None:
    """A scrape does not count the fleet while the cached summary is young enough: a change
    made after the last count shows only when a scrape (or ``GET /v1/fleet``) recounts, and
    the age of the figures is exported. A bad ``max_age`` is a 400, not a count."""
    svc = fleet_service
    read = svc.operator_token("read")
    svc.enroll("cam-1")
    svc.enroll("cam-2")
    counted = scrape(svc, read, max_age=0)  # counts now, and stores the count
    assert value(counted, "devices") == 2 and value(counted, "devices_revoked") == 0
    assert value(counted, "summary_age_seconds") < 60
    r = call("POST", f"{svc.url}/v1/devices/cam-2/revoke", {}, token=svc.admin_token)
    assert r.status == 200, r.doc
    cached = scrape(svc, read, max_age=3600)  # every worker reads the same stored count
    assert value(cached, "devices") == 2 and value(cached, "devices_revoked") == 0
    assert value(cached, "summary_age_seconds") >= 0
    fresh = scrape(svc, read, max_age=0)
    assert value(fresh, "devices") == 1 and value(fresh, "devices_revoked") == 1
    again = scrape(svc, read, max_age=3600)  # the recount was stored for the next scrapes
    assert value(again, "devices_revoked") == 1
    for bad in ("-1", "abc", "86401", "²"):
        r = call("GET", f"{svc.url}/metrics?max_age={bad}", token=read)
        assert r.status == 400 and r.doc["error"] == "malformed", (bad, r.raw[:200])


def test_metrics_need_a_read_token(fleet_service: FleetService) -> None:
    svc = fleet_service
    assert call("GET", f"{svc.url}/metrics").status == 401
    assert call("GET", f"{svc.url}/metrics", token="otaop_" + "x" * 43).status == 401
    cred = svc.enroll("cam-9")
    assert call("GET", f"{svc.url}/metrics", token=cred).status == 401  # a device's: no
    assert call("GET", f"{svc.url}/metrics", token=svc.operator_token("read")).status == 200


def test_logs_are_json_lines_and_refusals_are_logged(fleet_service: FleetService) -> None:
    import json
    import time

    svc = fleet_service
    cred = svc.enroll("cam-7")
    r = call("POST", f"{svc.url}/v1/devices/cam-8/events", report("cam-8", [1]), token=cred)
    assert r.status == 401

    def refusals() -> list[dict[str, Any]]:
        docs = [
            json.loads(line) for line in svc.log.read_text().splitlines() if line.startswith("{")
        ]
        return [d for d in docs if d["logger"] == "ota.fleet.request"]

    deadline = time.monotonic() + 30  # the worker's line reaches the file on its own time
    while not refusals():
        assert time.monotonic() < deadline, svc.log_text()
        time.sleep(0.05)
    [line] = refusals()
    assert line["route"] == "events" and line["status"] == 401
    assert line["reason"] == "unauthorized" and line["level"] == "info"
    assert line["time"].endswith("Z") and line["duration_ms"] >= 0
    lines = svc.log.read_text().splitlines()
    gunicorn = [json.loads(x) for x in lines if x.startswith("{") and '"gunicorn.error"' in x]
    assert gunicorn, lines[:10]  # gunicorn's own lines are JSON too
    assert all(not x.startswith("[") for x in lines), lines[:10]  # no plain gunicorn lines


def test_a_chosen_multiprocess_folder_loses_only_stale_metric_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ota.fleet._metrics import MULTIPROC_ENV, prepare_multiprocess

    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    (tmp_path / "counter_123.db").write_bytes(b"stale")
    (tmp_path / "notes.txt").write_text("the operator's")
    assert prepare_multiprocess(str(tmp_path)) == str(tmp_path)
    assert os.environ[MULTIPROC_ENV] == str(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
