"""The cheaper health-gate computations equal the ones they replaced (issue 9, ADR 0015), on
random inputs: ``per_device`` (fixed statements, rows decoded once) against the per-call
statements it replaced, kept here as the reference; and whole judgements (every gate, every
tier) made with the reference against the ones made with the new code (SQLite and
PostgreSQL)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from sqlalchemy import and_, create_engine, func, select
from sqlalchemy.orm import Session

import ota.rollout._health as health
from ota.fleet import _telemetry as tel
from ota.fleet._models import LATENCY_COLUMNS, Device, DeviceModel
from ota.fleet._telemetry import DeviceTelemetry, bucket_of, per_device
from tests.fleet_fixtures import fleet_backend, postgres  # noqa: F401
from tests.test_rollout_health import NEW, OLD, RING, T0, Behaviour, Ctx, Fleet, fleet  # noqa: F401


def reference_per_device(
    s: Session, model: str, version: str, ring: str, since: float, until: float,
    *, on_version: str | None = None,
) -> dict[int, DeviceTelemetry]:  # fmt: skip
    """``per_device`` as it was before the fixed statements (the reference; unchanged)."""
    agg, bin_ = tel._AGG, tel._BIN
    cond = [
        agg.c.model == model,
        agg.c.version == version,
        agg.c.bucket >= bucket_of(since),
        agg.c.bucket <= until,
        Device.ring == ring,
        Device.revoked_at.is_(None),
    ]
    join = agg.join(Device.__table__, Device.id == agg.c.device_pk)
    if on_version is not None:
        join = join.join(
            DeviceModel.__table__,
            and_(DeviceModel.device_pk == agg.c.device_pk, DeviceModel.model == model),
        )
        cond.append(DeviceModel.version == on_version)
    sums = [func.sum(agg.c[c]) for c in ("inferences", "errors", "crashes", "latency_sum_s")]
    lat = [func.sum(agg.c[c]) for c in LATENCY_COLUMNS]
    q = (
        select(agg.c.device_pk, Device.tier, *sums, *lat)
        .select_from(join)
        .where(*cond)
        .group_by(agg.c.device_pk, Device.tier)
    )
    out: dict[int, DeviceTelemetry] = {}
    for row in s.execute(q):
        pk, tier, n, e, c, ls, *h = row
        out[int(pk)] = DeviceTelemetry(
            int(pk), str(tier), int(n or 0), int(e or 0), int(c or 0),
            tuple(int(v or 0) for v in h), float(ls or 0.0),
        )  # fmt: skip
    if not out:
        return out
    bcond = [
        bin_.c.model == model,
        bin_.c.version == version,
        bin_.c.bucket >= bucket_of(since),
        bin_.c.bucket <= until,
        bin_.c.device_pk.in_(sorted(out)),
    ]
    bq = (
        select(bin_.c.device_pk, bin_.c.output, bin_.c.spec, bin_.c.bin, func.sum(bin_.c.count))
        .where(*bcond)
        .group_by(bin_.c.device_pk, bin_.c.output, bin_.c.spec, bin_.c.bin)
    )
    for pk, o, sk, b, c in s.execute(bq):
        out[int(pk)].outputs.setdefault((str(o), str(sk)), {})[int(b)] = int(c or 0)
    return out


def random_fleet(fleet: Fleet, seed: int) -> None:  # noqa: F811
    """New, baseline and updated devices over three tiers, with random behaviours (some
    slower, some drifting, some crashing, some with few inferences), and a revoked one."""
    rng = np.random.default_rng(seed)

    def behaviour() -> Behaviour:
        return Behaviour(
            latency_s=float(rng.uniform(0.01, 0.05)),
            spread=float(rng.uniform(0.1, 0.6)),
            error_p=float(rng.uniform(0.0, 0.02)),
            crashes=int(rng.integers(0, 2)),
            out_mean=float(rng.normal(0.0, 0.3)),
            out_sd=float(rng.uniform(0.7, 1.3)),
            inferences=int(rng.integers(20, 600)),
        )

    for tier in ("a", "b", "c"):
        for _ in range(int(rng.integers(4, 12))):
            fleet.device(tier, NEW, behaviour(), summaries=int(rng.integers(1, 3)))
        for _ in range(int(rng.integers(4, 12))):
            fleet.device(tier, OLD, behaviour())
        for _ in range(int(rng.integers(0, 8))):
            fleet.updated(tier, behaviour(), behaviour())
    engine = create_engine(fleet.url)
    try:
        with Session(engine) as s, s.begin():
            dev = s.scalars(select(Device).order_by(Device.id)).first()
            assert dev is not None
            dev.revoked_at = T0 - 10
    finally:
        engine.dispose()


@pytest.mark.parametrize("seed", [3, 11])
def test_per_device_equals_the_per_call_statements(fleet: Fleet, seed: int) -> None:  # noqa: F811
    random_fleet(fleet, seed)
    engine = create_engine(fleet.url)
    windows = [
        (T0 - 3600, T0 + 60),
        (T0 - 600, T0 + 60),
        (T0 - 7200, T0 - 1000),
        (T0 + 1e5, T0 + 2e5),
    ]
    try:
        with Session(engine) as s:
            compared = 0
            for version in (NEW, OLD, "9.9.9"):
                for since, until in windows:
                    for on_version in (None, NEW, OLD):
                        for ring in (RING, "other"):
                            args = (s, "det", version, ring, since, until)
                            want = reference_per_device(*args, on_version=on_version)
                            got = per_device(*args, on_version=on_version)
                            assert got == want, (version, since, until, on_version, ring)
                            compared += len(got)
            assert compared > 50  # the comparisons saw devices, bins and all
            some = per_device(s, "det", NEW, RING, T0 - 3600, T0 + 60)
            assert any(d.outputs for d in some.values())
    finally:
        engine.dispose()


def _thresholds(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "min_devices": int(rng.integers(2, 6)),
        "min_inferences": int(rng.integers(100, 2000)),
        "min_device_inferences": int(rng.integers(10, 100)),
    }


@pytest.mark.parametrize("seed", [5, 19])
def test_judgements_equal_the_reference_computations(
    fleet: Fleet,  # noqa: F811
    seed: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every gate of every tier (statuses, values, p-values, evidence) equal with the old
    ``per_device`` patched back in."""
    random_fleet(fleet, seed)
    rng = np.random.default_rng(seed)
    ctxs = [Ctx(), Ctx(percent=50.0), Ctx(stage_started_at=T0 - 600), Ctx(baseline_version=None)]
    statuses: set[str] = set()
    for ctx in ctxs:
        th = _thresholds(rng)
        got = fleet.evaluate(ctx, **th)
        with monkeypatch.context() as m:
            m.setattr(health, "per_device", reference_per_device)
            want = fleet.evaluate(ctx, **th)
        assert got == want, ctx
        statuses |= {g.status.value for g in got}
        assert (
            any(g.evidence.get("test") == "mann-whitney-u" for g in got) or not ctx.baseline_version
        )
    assert len(statuses) >= 2  # not one status throughout
