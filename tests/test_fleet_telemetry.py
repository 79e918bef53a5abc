"""Inference telemetry through the real fleet service (gunicorn; SQLite and PostgreSQL):
summaries made by the real client recorder (``ota.client.telemetry``) on a real device, sent
by the real reporter, folded into the per-device aggregates the health gates read; bad
summaries refused with a reason and counted while the rest of the report is stored."""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from ota.client import init_device, report_events
from ota.client._enroll import credential_path, ensure_enrolled
from ota.client.telemetry import Telemetry
from ota.fleet._models import Device, TelemetryAgg, TelemetryBin
from ota.fleet._telemetry import BUCKET_S, MAX_SKEW_S, per_device, rejections
from tests.fleet_fixtures import (  # noqa: F401
    FleetService,
    call,
    fleet_backend,
    fleet_service,
    postgres,
)
from tests.test_fleet_ingest import ev, post_report, report, timeline
from tests.test_rollout_health import Behaviour, make_summary
from tests.test_telemetry import MODEL, Base, Clock, base  # noqa: F401
from tests.updater_world import FAST


def db_rows(svc: FleetService, device_id: str) -> tuple[list[TelemetryAgg], list[TelemetryBin]]:
    engine = create_engine(svc.db_url)
    try:
        with Session(engine) as s:
            pk = s.scalar(select(Device.id).where(Device.device_id == device_id))
            aggs = list(s.scalars(select(TelemetryAgg).where(TelemetryAgg.device_pk == pk)))
            bins = list(s.scalars(select(TelemetryBin).where(TelemetryBin.device_pk == pk)))
            s.expunge_all()
            return aggs, bins
    finally:
        engine.dispose()


def refused(svc: FleetService, device_id: str) -> dict[str, int]:
    engine = create_engine(svc.db_url)
    try:
        with Session(engine) as s:
            pk = s.scalar(select(Device.id).where(Device.device_id == device_id))
            return rejections(s, pk)
    finally:
        engine.dispose()


def test_real_recorder_summaries_are_folded_per_device(
    fleet_service: FleetService, base: Base, tmp_path: Path
) -> None:
    svc = fleet_service
    dev = tmp_path / "device"
    shutil.copytree(base.device, dev, symlinks=True)
    trusted = (base.root / "repo" / "metadata" / "1.root.json").read_bytes()
    cfg = init_device(dev, base.url, trusted, "dev-1", [MODEL], ring="canary",
                      health_timeout_s=0, report_url=svc.url,
                      report_token_file=str(credential_path(dev)))  # fmt: skip
    ensure_enrolled(dev, cfg, svc.url, svc.enroll_token(), FAST)
    clock = Clock()
    sent: list[dict[str, Any]] = []
    with Telemetry.open(dev, auto_flush=False, clock=clock) as rec:
        for interval in range(2):
            for i in range(100):
                rec.record(MODEL, "1.0.0", 0.001 * (i + 1), ok=i % 10 != 0,
                           outputs=np.full((1, 8), 0.1 * (i % 5), np.float32))  # fmt: skip
            clock.t += 300
            assert rec.flush() == 1, interval
    out = report_events(dev, fetch_config=FAST)
    assert out.status == "sent", out.error
    sent = [json.loads(json.dumps(e))["summary"] for e in _telemetry_data(svc, "dev-1")]
    assert len(sent) == 2
    [agg], bins = db_rows(svc, "dev-1")
    assert (agg.model, agg.version, agg.summaries) == (MODEL, "1.0.0", 2)
    assert (agg.inferences, agg.errors, agg.crashes) == (200, 20, 0)
    lat = [getattr(agg, f"lat_{i:02d}") for i in range(30)]
    assert lat == [a + b for a, b in zip(*(s["latency"]["counts"] for s in sent), strict=True)]
    assert agg.bucket % BUCKET_S == 0
    [o] = sent[0]["outputs"]
    assert sum(b.count for b in bins) == sum(sum(s["outputs"][0]["counts"]) for s in sent)
    assert {b.spec for b in bins} == {f"hist:{float(o['lo'])!r}:{float(o['hi'])!r}:{o['bins']}"}
    assert refused(svc, "dev-1") == {}
    # the gates' query sees this device, in its ring and tier
    engine = create_engine(svc.db_url)
    try:
        with Session(engine) as s:
            [d] = per_device(s, MODEL, "1.0.0", "canary", agg.bucket, agg.bucket + 1).values()
            assert (d.inferences, d.errors, d.tier) == (200, 20, cfg.tier)
            assert per_device(s, MODEL, "1.0.0", "ga", agg.bucket, agg.bucket + 1) == {}
    finally:
        engine.dispose()
    # a resend of the same events (a lost ack) is not counted twice
    out = report_events(dev, fetch_config=FAST)
    [agg2], _ = db_rows(svc, "dev-1")
    assert agg2.inferences == 200


def _telemetry_data(svc: FleetService, device_id: str) -> list[dict[str, Any]]:
    engine = create_engine(svc.db_url)
    try:
        from ota.fleet._models import Event

        with Session(engine) as s:
            pk = s.scalar(select(Device.id).where(Device.device_id == device_id))
            rows = s.scalars(
                select(Event.data).where(Event.device_pk == pk, Event.kind == "telemetry")
                .order_by(Event.seq)
            )  # fmt: skip
            return [dict(r) for r in rows]
    finally:
        engine.dispose()


def recent(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary dated by this machine's clock (the service refuses one from the future)."""
    end = float(int(time.time()))
    return {**summary, "start": end - 300, "end": end}


def tel(seq: int, summary: Any, version: str = "1.0.0") -> dict[str, Any]:
    return ev(seq, "telemetry", MODEL, version, summary=summary)


def test_bad_summaries_are_refused_counted_and_the_rest_is_stored(
    fleet_service: FleetService,
) -> None:
    svc = fleet_service
    cred = svc.enroll("dev-1", ring="canary", tier="jetson")
    rng = np.random.default_rng(3)
    good = recent(make_summary(rng, "1.0.0", Behaviour(inferences=50)))
    oversized = {**copy.deepcopy(good), "pad": "x" * 13_000}
    inconsistent = copy.deepcopy(good)
    inconsistent["latency"]["counts"][0] += 1  # no longer sums to `inferences`
    not_run = recent(make_summary(rng, "9.9.9", Behaviour(inferences=50)))
    future = {**copy.deepcopy(good), "start": 4e9, "end": 4e9 + 300}
    trial = recent(make_summary(rng, "1.1.0", Behaviour(inferences=30, crashes=2)))
    events = [
        ev(1, "checked", MODEL, "1.0.0"),
        tel(2, good),
        tel(3, oversized),
        tel(4, inconsistent),
        tel(5, not_run, "9.9.9"),
        tel(6, good, "1.1.0"),  # the event names another release than its summary
        tel(7, future),
        ev(8, "committed", MODEL, "1.1.0"),  # it ran 1.1.0 (then reverted): its crashes count
        tel(9, trial, "1.1.0"),
        ev(10, "reverted", MODEL, "1.1.0"),
        {**ev(11, "telemetry", MODEL, "1.0.0"), "data": {"summary": good, "extra": 1}},
    ]
    doc = report("dev-1", events, models={MODEL: {"version": "1.0.0", "counter": 1}},
                 ring="canary", tier="jetson")  # fmt: skip
    r = post_report(svc, "dev-1", cred, doc)
    assert (r.status, r.doc) == (200, {"ack": 11})
    assert [k for _, _, k in timeline(svc, "dev-1")].count("telemetry") == 8  # all stored raw
    aggs, _ = db_rows(svc, "dev-1")
    got = {(a.version, a.summaries, a.inferences, a.crashes) for a in aggs}
    assert got == {("1.0.0", 1, 50, 0), ("1.1.0", 1, 30, 2)}
    assert refused(svc, "dev-1") == {
        "malformed": 3, "wrong_version": 1, "mismatch": 1, "future": 1,
    }  # fmt: skip
    # the device's state moved as usual
    d = call("GET", f"{svc.url}/v1/devices/dev-1", token=svc.admin_token).doc
    assert d["last_outcome"]["kind"] == "reverted"
    # a summary ending just within the allowed skew is taken
    end = float(int(time.time()) + MAX_SKEW_S / 2)
    ok_skew = {**copy.deepcopy(good), "start": end - 300, "end": end}
    r = post_report(svc, "dev-1", cred, report("dev-1", [tel(12, ok_skew)], ring="canary",
                    tier="jetson", models={MODEL: {"version": "1.0.0", "counter": 1}}))  # fmt: skip
    assert r.status == 200
    assert sum(a.summaries for a in db_rows(svc, "dev-1")[0] if a.version == "1.0.0") == 2


def test_too_many_summaries_in_one_report_are_refused_beyond_the_bound(
    fleet_service: FleetService,
) -> None:
    from ota.fleet._telemetry import MAX_PER_REPORT

    svc = fleet_service
    cred = svc.enroll("dev-1")
    good = recent(make_summary(np.random.default_rng(4), "1.0.0", Behaviour(inferences=20)))
    events = [tel(i + 1, good) for i in range(MAX_PER_REPORT + 3)]
    r = post_report(svc, "dev-1", cred, report("dev-1", events,
                    models={MODEL: {"version": "1.0.0", "counter": 1}}))  # fmt: skip
    assert r.status == 200
    [agg], _ = db_rows(svc, "dev-1")
    assert agg.summaries == MAX_PER_REPORT and agg.inferences == 20 * MAX_PER_REPORT
    assert refused(svc, "dev-1") == {"too_many": 3}
