"""Inference-health gates (issue 9, ADR 0015) on real database rows, SQLite and PostgreSQL.

Simulated devices make ``edge-ota.telemetry/1`` summaries with the client's own counters
(latency buckets, :class:`OutputCounter`) and :func:`validate_summary`; the fleet's
:func:`ota.fleet._telemetry.absorb` folds them into ``telemetry_agg``/``telemetry_bins`` as
at ingest; the gates read those rows. Scenarios: a good release, p95 +30 % on one tier, output
drift, crashes after commit, too few devices, and a handful of forged devices."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from ota.client._telemetry_format import (
    LATENCY_BUCKETS,
    LATENCY_EDGES,
    TELEMETRY_FORMAT,
    OutputCounter,
    OutputSpec,
    OutputSummary,
    validate_summary,
)
from ota.errors import InputError
from ota.fleet._models import Device, DeviceModel, ReleaseState
from ota.fleet._report import ReportEvent
from ota.fleet._telemetry import DeviceKey, DeviceTelemetry, absorb
from ota.rollout._health import HealthThresholds, evaluate_health, p95, p95s, reference_of
from ota.rollout._verdict import Action, GateResult, GateStatus, combine
from tests.fleet_fixtures import fleet_backend, postgres  # noqa: F401

MODEL, NEW, OLD, RING = "det", "1.1.0", "1.0.0", "canary"
SPEC = OutputSpec("y", "hist", -4.0, 4.0, 32)
T0 = 1_800_000_000.0


@dataclass(frozen=True)
class Ctx:
    """The attributes of the controller's RolloutContext the health gates read."""

    model: str = MODEL
    version: str = NEW
    baseline_version: str | None = OLD
    ring: str = RING
    stage_started_at: float = T0 - 3600
    now: float = T0 + 60
    percent: float | None = None  # the stage's; None: no tier is deferred


@dataclass
class Behaviour:
    """How one simulated device's model behaves over one interval."""

    latency_s: float = 0.02  # median
    spread: float = 0.25  # lognormal sigma
    error_p: float = 0.002
    crashes: int = 0
    out_mean: float = 0.0
    out_sd: float = 1.0
    inferences: int = 400


def make_summary(
    rng: np.random.Generator, version: str, b: Behaviour, end: float = T0
) -> dict[str, Any]:
    """One summary as a device's recorder makes it (same buckets, same output counter)."""
    lat = np.exp(rng.normal(np.log(b.latency_s), b.spread, b.inferences))
    hist = [0] * LATENCY_BUCKETS
    for x in lat.tolist():
        hist[bisect.bisect_right(LATENCY_EDGES, x)] += 1
    errors = int(rng.binomial(b.inferences, b.error_p))
    out = OutputCounter(SPEC)
    for row in rng.normal(b.out_mean, b.out_sd, (b.inferences - errors, 4)):
        out.add(row)
    doc = {
        "format": TELEMETRY_FORMAT, "model": MODEL, "version": version,
        "start": end - 300, "end": end, "inferences": b.inferences, "errors": errors,
        "crashes": b.crashes, "latency": {"counts": hist, "sum_s": float(lat.sum())},
        "outputs": [out.summary().to_dict()],
    }  # fmt: skip
    validate_summary(doc)
    return doc


@dataclass
class Fleet:
    """Devices in one database, each reporting through the fleet's own fold."""

    url: str
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(7))
    n: int = 0

    def device(
        self, tier: str, version: str, b: Behaviour, *, summaries: int = 1, device_id: str = ""
    ) -> None:
        engine = create_engine(self.url)
        try:
            with Session(engine) as s, s.begin():
                self.n += 1
                dev = Device(
                    device_id=device_id or f"d{self.n}", credential_hash=f"{self.n:064d}",
                    ring=RING, tier=tier, enrolled_at=T0 - 86400, health="ok", events_total=0,
                    dropped_total=0, rate_window_start=0.0, rate_count=0,
                )  # fmt: skip
                s.add(dev)
                s.flush()
                s.add(DeviceModel(device_pk=dev.id, model=MODEL, version=version, counter=1,
                                  updated_at=T0, ring=RING, tier=tier, active=True))  # fmt: skip
                s.add(ReleaseState(device_pk=dev.id, model=MODEL, version=version,
                                   state="confirmed", updated_at=T0, active=True))  # fmt: skip
                s.flush()
                events = [
                    ReportEvent(i + 1, T0, "telemetry", MODEL, version,
                                {"summary": make_summary(self.rng, version, b)})
                    for i in range(summaries)
                ]  # fmt: skip
                got = absorb(s, DeviceKey(dev.id, dev.device_id), {MODEL: (version, 1)}, events, T0)
                assert (got.folded, got.rejected) == (summaries, {})
        finally:
            engine.dispose()

    def updated(self, tier: str, before: Behaviour, after: Behaviour) -> None:
        """A device that reported OLD (received at ``T0 - 1800``, an earlier bucket), then
        updated and reported NEW (received at ``T0``)."""
        engine = create_engine(self.url)
        try:
            with Session(engine) as s, s.begin():
                self.n += 1
                dev = Device(
                    device_id=f"d{self.n}", credential_hash=f"{self.n:064d}", ring=RING,
                    tier=tier, enrolled_at=T0 - 86400, health="ok", events_total=0,
                    dropped_total=0, rate_window_start=0.0, rate_count=0,
                )  # fmt: skip
                s.add(dev)
                s.flush()
                s.add(DeviceModel(device_pk=dev.id, model=MODEL, version=NEW, counter=2,
                                  updated_at=T0, ring=RING, tier=tier, active=True))  # fmt: skip
                s.add(ReleaseState(device_pk=dev.id, model=MODEL, version=NEW,
                                   state="confirmed", updated_at=T0, active=True))  # fmt: skip
                s.flush()
                key = DeviceKey(dev.id, dev.device_id)
                t_old = T0 - 1800
                old = [
                    ReportEvent(
                        1,
                        t_old,
                        "telemetry",
                        MODEL,
                        OLD,
                        {"summary": make_summary(self.rng, OLD, before, t_old)},
                    )
                ]
                got = absorb(s, key, {MODEL: (OLD, 1)}, old, t_old)
                assert (got.folded, got.rejected) == (1, {})
                new = [
                    ReportEvent(
                        2,
                        T0,
                        "telemetry",
                        MODEL,
                        NEW,
                        {"summary": make_summary(self.rng, NEW, after)},
                    )
                ]
                got = absorb(s, key, {MODEL: (NEW, 2)}, new, T0)
                assert (got.folded, got.rejected) == (1, {})
        finally:
            engine.dispose()

    def cohort(
        self, tier: str, version: str, count: int, *, ids: list[str] | None = None, **kw: Any
    ) -> None:
        for i in range(count):
            self.device(tier, version, Behaviour(**kw), device_id=ids[i] if ids else "")

    def evaluate(self, ctx: Ctx | None = None, reference: Any = None, **th: Any
                 ) -> list[GateResult]:  # fmt: skip
        engine = create_engine(self.url)
        try:
            with Session(engine) as s:
                return evaluate_health(s, ctx or Ctx(), th, reference=reference)
        finally:
            engine.dispose()


@pytest.fixture
def fleet(fleet_backend: str) -> Fleet:  # noqa: F811
    return Fleet(fleet_backend)


def reference(mean: float = 0.0) -> list[OutputSummary]:
    rng = np.random.default_rng(1)
    c = OutputCounter(SPEC)
    for row in rng.normal(mean, 1.0, (2000, 4)):
        c.add(row)
    return [c.summary()]


def by(results: list[GateResult], gate: str, tier: str = "") -> GateResult:
    [r] = [r for r in results if r.gate == gate and r.tier == tier]
    return r


def healthy(fleet: Fleet, per_tier: int = 8, tiers: tuple[str, ...] = ("a", "b")) -> None:
    for tier in tiers:
        fleet.cohort(tier, OLD, per_tier)
        fleet.cohort(tier, NEW, per_tier)


# -- scenarios ---------------------------------------------------------------------------------


def test_a_good_release_passes_every_gate_on_every_tier(fleet: Fleet) -> None:
    healthy(fleet)
    results = fleet.evaluate(reference=reference())
    assert {r.tier for r in results} == {"", "a", "b"}
    gates = {r.gate for r in results}
    assert gates == {"health.latency_p95", "health.error_rate", "health.crash_rate",
                     "health.drift", "health.drift_reference"}  # fmt: skip
    bad = [r.to_json() for r in results if r.status is not GateStatus.PASS]
    assert bad == []
    assert combine(results, Action.PAUSE) is Action.PROMOTE
    lat = by(results, "health.latency_p95")
    assert lat.value is not None and 0.8 < lat.value < 1.2
    assert lat.evidence["new_devices"] == 16 and lat.evidence["baseline_devices"] == 16


def test_p95_30_percent_slower_on_one_tier_fails_that_tier_with_confidence(fleet: Fleet) -> None:
    fleet.cohort("a", OLD, 8)
    fleet.cohort("a", NEW, 8)
    fleet.cohort("b", OLD, 8, latency_s=0.05)
    fleet.cohort("b", NEW, 8, latency_s=0.065)
    results = fleet.evaluate()
    b = by(results, "health.latency_p95", "b")
    assert b.status is GateStatus.FAIL, b.to_json()
    assert b.confidence is not None and b.confidence >= 0.98
    assert b.value is not None and 1.2 < b.value < 1.45
    assert by(results, "health.latency_p95", "a").status is GateStatus.PASS
    assert combine(results, Action.ROLLBACK) is Action.ROLLBACK


def test_output_drift_is_detected_against_baseline_and_reference(fleet: Fleet) -> None:
    for tier in ("a", "b"):
        fleet.cohort(tier, OLD, 8)
        fleet.cohort(tier, NEW, 8, out_mean=1.0)
    results = fleet.evaluate(reference=reference())
    for tier in ("", "a", "b"):
        d = by(results, "health.drift", tier)
        assert d.status is GateStatus.FAIL, d.to_json()
        assert d.confidence is not None and d.confidence >= 0.98
        assert by(results, "health.drift_reference", tier).status is GateStatus.FAIL
    # latency and errors are unaffected by the drift
    assert by(results, "health.latency_p95").status is GateStatus.PASS


def test_crashes_after_commit_fail_the_crash_gate(fleet: Fleet) -> None:
    fleet.cohort("a", OLD, 8)
    fleet.cohort("a", NEW, 7, crashes=3, inferences=150)  # seven of eight crash
    fleet.cohort("a", NEW, 1)
    results = fleet.evaluate()
    c = by(results, "health.crash_rate", "a")
    assert c.status is GateStatus.FAIL, c.to_json()
    assert c.confidence is not None and c.confidence >= 0.98
    assert c.evidence["devices_beyond"] == 7
    assert by(results, "health.error_rate", "a").status is not GateStatus.FAIL


def test_too_few_devices_hold_and_say_why(fleet: Fleet) -> None:
    fleet.cohort("a", OLD, 8)
    fleet.cohort("a", NEW, 3, latency_s=1.0, error_p=0.5, crashes=9)
    results = fleet.evaluate(reference=reference())
    assert results and all(r.status is GateStatus.HOLD for r in results), [
        r.to_json() for r in results if r.status is not GateStatus.HOLD
    ]
    assert "3 new devices" in by(results, "health.latency_p95", "a").reason
    assert combine(results, Action.PAUSE) is Action.HOLD


def test_no_telemetry_at_all_holds(fleet: Fleet) -> None:
    fleet.cohort("a", OLD, 8)
    assert fleet.evaluate() == [] or all(r.status is GateStatus.HOLD for r in fleet.evaluate())
    assert combine(fleet.evaluate(), Action.PAUSE) is Action.HOLD


def test_forged_minority_cannot_fail_a_good_release(fleet: Fleet) -> None:
    healthy(fleet)
    # four forged devices (min_devices is 5) report everything as terrible
    fleet.cohort("a", NEW, 4, latency_s=5.0, error_p=0.9, crashes=50, out_mean=3.5)
    results = fleet.evaluate(reference=reference())
    failed = [r.to_json() for r in results if r.status is GateStatus.FAIL]
    assert failed == []
    # on the pooled gates they do not even hold it: a pass sets the most extreme aside
    for gate in ("health.error_rate", "health.crash_rate", "health.drift"):
        assert by(results, gate, "a").status is GateStatus.PASS, by(results, gate, "a").to_json()
    # at worst they delay it (the latency median moves by their number of ranks)
    assert combine(results, Action.PAUSE) in (Action.PROMOTE, Action.HOLD)


def test_forged_minority_alone_can_neither_pass_nor_fail(fleet: Fleet) -> None:
    fleet.cohort("a", OLD, 8)
    fleet.cohort("a", NEW, 4)  # perfect-looking reports from four devices only
    results = fleet.evaluate(reference=reference())
    assert results and all(r.status is GateStatus.HOLD for r in results)
    fleet.cohort("a", NEW, 4, latency_s=5.0, error_p=0.9, crashes=50)
    results = fleet.evaluate(reference=reference())
    assert not any(r.status is GateStatus.FAIL for r in results)


def test_forged_minority_cannot_pass_a_bad_release(fleet: Fleet) -> None:
    fleet.cohort("a", OLD, 8)
    fleet.cohort("a", NEW, 8, latency_s=0.03)  # +50 % on every honest device
    fleet.cohort("a", NEW, 4, latency_s=0.005)  # four forged, much faster
    results = fleet.evaluate()
    r = by(results, "health.latency_p95", "a")
    # the forged devices may delay the failure (a hold, which pauses at the stage's
    # deadline), never turn it into a pass
    assert r.status is not GateStatus.PASS, r.to_json()
    assert combine(results, Action.PAUSE) is not Action.PROMOTE
    # with as many honest devices again the failure is certain despite them
    fleet.cohort("a", NEW, 8, latency_s=0.03)
    r = by(fleet.evaluate(), "health.latency_p95", "a")
    assert r.status is GateStatus.FAIL, r.to_json()


def test_the_window_and_baseline_rules(fleet: Fleet) -> None:
    healthy(fleet, per_tier=6, tiers=("a",))
    # a stage that starts after every summary was received sees nothing
    later = Ctx(stage_started_at=T0 + 7200, now=T0 + 9000)
    assert all(r.status is GateStatus.HOLD for r in fleet.evaluate(later))
    # a first release (no baseline) cannot pass the comparing gates
    first = fleet.evaluate(Ctx(baseline_version=None), reference=reference())
    assert by(first, "health.latency_p95").status is GateStatus.HOLD
    assert by(first, "health.drift_reference").status is GateStatus.PASS
    # another ring is not this stage's baseline nor its cohort
    other = fleet.evaluate(Ctx(ring="ga"))
    assert other and all(r.status is GateStatus.HOLD for r in other)
    assert "0 new devices" in by(other, "health.latency_p95").reason


def test_thresholds_are_checked() -> None:
    assert HealthThresholds.from_mapping({}) == HealthThresholds()
    assert HealthThresholds.from_mapping({"max_p95_ratio": 1.5}).max_p95_ratio == 1.5
    for bad in (
        {"nope": 1},
        {"min_devices": 0},
        {"confidence": 1.5},
        {"max_p95_ratio": 0.5},
        {"drift_metric": "kl"},
        {"min_devices": True},
        {"max_drift": float("nan")},
    ):
        with pytest.raises(InputError):
            HealthThresholds.from_mapping(bad)


def test_p95_reads_the_fixed_buckets() -> None:
    counts = [0] * LATENCY_BUCKETS
    counts[9] = 100  # [LATENCY_EDGES[8], LATENCY_EDGES[9]) = [1 ms, 1.778 ms)
    v = p95(counts)
    assert LATENCY_EDGES[8] <= v < LATENCY_EDGES[9]
    counts[20] = 100
    assert p95(counts) > LATENCY_EDGES[19]
    with pytest.raises(ValueError, match="empty"):
        p95([0] * LATENCY_BUCKETS)


def _p95_per_device(counts: np.ndarray) -> float:
    """The per-histogram p95 the vectorised :func:`p95s` replaced (scipy ``norm.ppf`` and
    ``np.polyfit`` per device), kept here as the reference it must equal."""
    import math

    from scipy.stats import norm  # type: ignore[import-untyped]

    c = np.asarray(counts, dtype=np.float64)
    total = float(c.sum())
    ratio = LATENCY_EDGES[1] / LATENCY_EDGES[0]
    edges = np.array([LATENCY_EDGES[0] / ratio, *LATENCY_EDGES, LATENCY_EDGES[-1] * ratio])
    cum = np.cumsum(c)
    i = int(np.searchsorted(cum, 0.95 * total))
    lo, hi = float(edges[i]), float(edges[i + 1])
    before = float(cum[i - 1]) if i else 0.0
    interpolated = lo * (hi / lo) ** ((0.95 * total - before) / float(c[i]))
    f = cum[:-1] / total
    use = (f > 0.01) & (f < 0.99)
    if len(np.unique(f[use])) < 2:
        return float(interpolated)
    slope, intercept = np.polyfit(norm.ppf(f[use]), np.log(np.asarray(LATENCY_EDGES)[use]), 1)
    fitted = math.exp(float(intercept + slope * norm.ppf(0.95)))
    return float(min(max(fitted, lo), hi))


def random_histograms(rng: np.random.Generator, count: int) -> np.ndarray:
    """Log-normal samples of any median and spread, sparse noise, one or two buckets, and
    huge counts: every branch of the p95 (fit, interpolation, clamp, first/last bucket)."""
    out = []
    for k in range(count):
        kind = k % 4
        if kind == 0:
            med, sd = np.log(rng.uniform(1e-5, 2.0)), rng.uniform(0.01, 1.0)
            lat = np.exp(rng.normal(med, sd, int(rng.integers(1, 3000))))
            h = np.bincount(np.searchsorted(LATENCY_EDGES, lat, side="right"),
                            minlength=LATENCY_BUCKETS)  # fmt: skip
        elif kind == 1:
            h = rng.integers(0, 5, LATENCY_BUCKETS) * (rng.random(LATENCY_BUCKETS) < 0.3)
            if h.sum() == 0:
                h[rng.integers(0, LATENCY_BUCKETS)] = 1
        elif kind == 2:
            h = np.zeros(LATENCY_BUCKETS, dtype=np.int64)
            j = int(rng.integers(0, LATENCY_BUCKETS - 1))
            h[j], h[j + 1] = rng.integers(1, 100), rng.integers(0, 100)
        else:
            h = rng.integers(0, 10**6, LATENCY_BUCKETS)
        out.append(h)
    return np.array(out)


def test_p95s_equals_the_per_device_computation() -> None:
    hists = random_histograms(np.random.default_rng(11), 2000)
    old = np.array([_p95_per_device(h) for h in hists])
    new = p95s(hists)
    assert new.shape == old.shape and np.all(np.isfinite(new))
    ulps = np.abs(new - old) / np.spacing(old)
    # the least-squares line in closed form, not by SVD: a few ulps of the log-latency
    # intercept, ≤ 64 ulps of its exponential (both sit within ~40 ulps of the exact value)
    assert ulps.max() <= 64, (ulps.max(), hists[int(np.argmax(ulps))].tolist())
    np.testing.assert_allclose(new, old, rtol=2e-14, atol=0)
    assert np.median(ulps) <= 2
    # histograms judged by interpolation (no fit): numpy's power against Python's, 1 ulp
    cum = np.cumsum(hists, axis=1)[:, :-1] / hists.sum(axis=1)[:, None]
    few = np.array([len(np.unique(f[(f > 0.01) & (f < 0.99)])) < 2 for f in cum])
    assert few.sum() > 200 and ulps[few].max() <= 1
    assert [p95(h) for h in hists[:50]] == new[:50].tolist()
    with pytest.raises(ValueError, match="empty"):
        p95s([[1] * LATENCY_BUCKETS, [0] * LATENCY_BUCKETS])
    with pytest.raises(ValueError, match="buckets"):
        p95s([[1] * (LATENCY_BUCKETS - 1)])
    assert p95s(np.zeros((0, LATENCY_BUCKETS))).shape == (0,)


def test_drift_distances_in_one_pass_equal_the_per_device_ones() -> None:
    from ota.rollout._health import _distance, _distances, _summ

    rng = np.random.default_rng(5)
    ref = reference()[0]
    for metric in ("js", "psi"):
        th = HealthThresholds(drift_metric=metric)
        dist = _distance(th)
        for trial in range(120):
            spec = (
                OutputSpec("c", "classes")
                if trial % 10 == 0
                else OutputSpec("y", "hist", -4.0, 4.0, int(rng.integers(2, 40)))
            )
            every = list(range(12)) if spec.kind == "classes" else [*range(spec.bins), -1, -2, -3]
            size = int(rng.integers(1, len(every) + 1))
            keys = sorted(int(k) for k in rng.choice(every, size=size, replace=False))
            n = int(rng.integers(2, 30))
            raw = rng.random((n, len(keys))) * (rng.random((n, len(keys))) < 0.7)
            raw[:, 0] += 1e-3
            rows = raw / raw.sum(axis=1, keepdims=True)
            mix = rows.sum(axis=0)
            # each new device against the mixture; each baseline device leave-one-out
            for lefts, got in (
                ([mix] * n, _distances(th, spec, keys, mix, rows)),
                (list(mix - rows), _distances(th, spec, keys, mix - rows, rows)),
            ):
                old = np.array(
                    [
                        dist(_summ(spec, keys, x), _summ(spec, keys, r))
                        for x, r in zip(lefts, rows, strict=True)
                    ]
                )
                assert np.array_equal(got, old), (metric, spec, np.abs(got - old).max())
        # against the release's reference (its 32 bins)
        keys = list(range(SPEC.bins))
        rows = rng.random((9, SPEC.bins))
        rows /= rows.sum(axis=1, keepdims=True)
        old = np.array([dist(ref, _summ(SPEC, keys, r)) for r in rows])
        assert np.array_equal(_distances(th, SPEC, keys, None, rows, ref=ref), old)


def test_the_reference_comes_from_the_releases_signed_fact() -> None:
    [ref] = reference()
    doc = {"format": TELEMETRY_FORMAT, "outputs": [ref.to_dict()]}
    assert reference_of(doc) == (ref,)
    assert reference_of(None) == ()
    with pytest.raises(InputError):
        reference_of({"format": TELEMETRY_FORMAT, "outputs": []})


@dataclass(frozen=True)
class ControllerCtx:
    """The fields of the controller's RolloutContext (rollout/_context.py on main)."""

    rollout_id: int
    model: str
    version: str
    baseline_version: str
    stage_index: int
    ring: str
    percent: float
    stage_started_at: float
    now: float
    health: dict[str, float] = field(default_factory=dict)


def test_the_controller_plugin_takes_the_plans_float_table(fleet: Fleet) -> None:
    from ota.rollout._health import GATES

    healthy(fleet, tiers=("a",))
    ctx = ControllerCtx(1, MODEL, NEW, OLD, 0, RING, 10.0, T0 - 3600, T0 + 60,
                        {"min_devices": 5.0, "max_p95_ratio": 1.25})  # fmt: skip
    engine = create_engine(fleet.url)
    try:
        with Session(engine) as s:
            [gate] = GATES
            results = gate(s, ctx)
            assert by(results, "health.latency_p95", "a").threshold == 1.25
            assert combine(results, Action.PAUSE) is Action.PROMOTE
            first = ControllerCtx(1, MODEL, NEW, "", 0, RING, 10.0, T0 - 3600, T0 + 60)
            assert by(gate(s, first), "health.latency_p95").status is GateStatus.HOLD
            with pytest.raises(InputError):
                gate(
                    s,
                    ControllerCtx(1, MODEL, NEW, OLD, 0, RING, 10.0, T0, T0, {"min_devices": 5.5}),
                )
    finally:
        engine.dispose()


# -- the paired latency test (each updated device against its own p95 before) ------------------


def pessimistic(rng: np.random.Generator, count: int, tier_s: float = 0.02) -> list[Behaviour]:
    """Devices of one tier with the fleet simulation's pessimistic spread: speed log-normal
    sigma 0.2 (per-device p95s vary ~25 %), latency spread sigma 0.15-0.4, 100-1,000
    inferences."""
    return [
        Behaviour(
            latency_s=tier_s * float(rng.lognormal(0.0, 0.2)),
            spread=float(rng.uniform(0.15, 0.4)),
            inferences=int(rng.integers(100, 1000)),
        )
        for _ in range(count)
    ]


def slower(b: Behaviour, factor: float) -> Behaviour:
    return Behaviour(b.latency_s * factor, b.spread, b.error_p, b.crashes, b.out_mean,
                     b.out_sd, b.inferences)  # fmt: skip


def paired_stage(fleet: Fleet, tier: str, count: int, factor: float = 1.0) -> None:
    """``count`` devices of ``tier`` that updated (telemetry of OLD, then of NEW ``factor``
    slower) and ``count`` that still run OLD, all with pessimistic spread."""
    for b in pessimistic(fleet.rng, count):
        fleet.updated(tier, b, slower(b, factor))
    for b in pessimistic(fleet.rng, count):
        fleet.device(tier, OLD, b)


def test_paired_good_release_with_high_spread_passes_where_unpaired_cannot_tell(
    fleet: Fleet,
) -> None:
    for tier in ("a", "b"):
        paired_stage(fleet, tier, 12)
    results = fleet.evaluate()
    for tier in ("", "a", "b"):
        r = by(results, "health.latency_p95", tier)
        assert r.status is GateStatus.PASS, r.to_json()
        assert r.evidence["paired_devices"] == (24 if not tier else 12)
        assert r.confidence is not None and r.confidence >= 0.9
        assert r.value is not None and 0.9 < r.value < 1.1


def test_paired_p95_30_percent_slower_on_one_tier_fails_that_tier(fleet: Fleet) -> None:
    paired_stage(fleet, "a", 12)
    paired_stage(fleet, "b", 12, factor=1.3)
    results = fleet.evaluate()
    b = by(results, "health.latency_p95", "b")
    assert b.status is GateStatus.FAIL, b.to_json()
    assert b.evidence["paired_devices"] == 12
    assert b.confidence is not None and b.confidence >= 0.98
    assert b.value is not None and 1.2 < b.value < 1.4
    assert by(results, "health.latency_p95", "a").status is GateStatus.PASS
    assert combine(results, Action.ROLLBACK) is Action.ROLLBACK


def test_forged_minority_cannot_fail_a_good_release_paired(fleet: Fleet) -> None:
    # a good release: four forged devices (min_devices is 5) report being 5x slower after
    # the update; the fail test sets the four highest ratios aside
    paired_stage(fleet, "a", 12)
    for b in pessimistic(fleet.rng, 4):
        fleet.updated("a", b, slower(b, 5.0))
    r = by(fleet.evaluate(), "health.latency_p95", "a")
    assert r.evidence["paired_devices"] == 16 and r.evidence["set_aside"] == 4
    assert r.status is not GateStatus.FAIL, r.to_json()  # at worst a delay


def test_forged_minority_cannot_pass_a_paired_regression(fleet: Fleet) -> None:
    paired_stage(fleet, "a", 12, factor=1.3)
    for b in pessimistic(fleet.rng, 4):  # four forged devices: 5x faster after the update
        fleet.updated("a", b, slower(b, 0.2))
    r = by(fleet.evaluate(), "health.latency_p95", "a")
    assert r.evidence["paired_devices"] == 16
    assert r.status is not GateStatus.PASS, r.to_json()
    assert r.value is not None and r.value > 1.2


def test_forged_minority_alone_cannot_pass_or_fail_paired(fleet: Fleet) -> None:
    for b in pessimistic(fleet.rng, 8):
        fleet.device("a", OLD, b)
    for b in pessimistic(fleet.rng, 4):  # only four updated devices, however they report
        fleet.updated("a", b, slower(b, 0.5))
    assert by(fleet.evaluate(), "health.latency_p95", "a").status is GateStatus.HOLD
    for b in pessimistic(fleet.rng, 4):
        fleet.updated("a", b, slower(b, 0.5))
    r = by(fleet.evaluate(), "health.latency_p95", "a")
    assert r.evidence["paired_devices"] == 8


def test_pre_update_telemetry_is_found_within_the_lookback(fleet: Fleet) -> None:
    # each updated device's telemetry of OLD was received 30 min before its telemetry of NEW
    # (another 15 min bucket), before the stage started
    paired_stage(fleet, "a", 6)
    ctx = Ctx(stage_started_at=T0 + 60, now=T0 + 120)
    assert by(fleet.evaluate(ctx), "health.latency_p95", "a").evidence["paired_devices"] == 6
    unpaired = by(fleet.evaluate(ctx, paired_lookback_s=1), "health.latency_p95", "a")
    assert unpaired.evidence.get("paired_devices", 0) == 0, unpaired.to_json()


def _trial_device(
    rng: np.random.Generator, pk: int, b: Behaviour, factor: float = 1.0
) -> DeviceTelemetry:
    n = max(20, int(rng.poisson(b.inferences)))
    lat = np.exp(rng.normal(np.log(b.latency_s * factor), b.spread, n))
    hist = np.bincount(np.searchsorted(LATENCY_EDGES, lat, side="right"), minlength=LATENCY_BUCKETS)
    return DeviceTelemetry(pk, "a", n, 0, 0, tuple(int(x) for x in hist), float(lat.sum()))


def _trials(seed: int, devices: int, factor: float, forged: int = 0, forged_factor: float = 1.0,
            stages: int = 100) -> tuple[dict[str, int], dict[str, int]]:  # fmt: skip
    """``stages`` simulated one-tier stages judged paired and unpaired (the same data):
    ``devices`` updated devices (``factor`` slower) + ``forged`` devices reporting
    ``forged_factor``, and ``devices`` on the baseline, all with pessimistic spread."""
    from ota.rollout._health import _latency

    rng = np.random.default_rng(seed)
    th = HealthThresholds()
    counts: tuple[dict[str, int], dict[str, int]] = ({}, {})
    for _ in range(stages):
        new, before = [], {}
        for pk, b in enumerate(pessimistic(rng, devices + forged)):
            before[pk] = _trial_device(rng, pk, b)
            new.append(_trial_device(rng, pk, b, factor if pk < devices else forged_factor))
        base = [_trial_device(rng, 1000 + i, b) for i, b in enumerate(pessimistic(rng, devices))]
        for c, bf in zip(counts, (before, None), strict=True):
            s = _latency(new, base, "a", th, bf).status.value
            c[s] = c.get(s, 0) + 1
    return counts


def test_paired_latency_trials_pass_good_fail_regressions_and_resist_forgery() -> None:
    """100 seeded stages each, 12 devices per cohort, pessimistic spread (per-device p95s
    vary ~25 %): what the fleet simulation's many good rollouts held on."""
    paired, unpaired = _trials(1, 12, 1.0)
    assert paired.get("pass", 0) >= 98 and "fail" not in paired, paired
    assert unpaired.get("pass", 0) < 90, unpaired  # the spread the paired test removes
    paired, _ = _trials(2, 12, 1.3)
    assert paired.get("fail", 0) >= 95 and "pass" not in paired, paired
    # four forged devices (min_devices 5) among 12 honest ones flip nothing either way
    paired, _ = _trials(3, 12, 1.0, forged=4, forged_factor=5.0, stages=50)
    assert "fail" not in paired, paired
    paired, _ = _trials(4, 12, 1.3, forged=4, forged_factor=0.2, stages=50)
    assert "pass" not in paired, paired


# -- tiers too small for a stage (the fleet simulation's 2 of 100 false halts) ----------------


def ids_in(prefix: str, count: int, lo: float, hi: float) -> list[str]:
    """``count`` device ids whose percentage bucket for ``MODEL NEW`` is in ``[lo, hi)``."""
    from ota.client._policy import bucket

    out: list[str] = []
    i = 0
    while len(out) < count:
        i += 1
        if lo <= bucket(f"{prefix}{i}", MODEL, NEW) < hi:
            out.append(f"{prefix}{i}")
    return out


def test_a_tier_the_stage_admits_too_few_of_is_deferred_then_judged(fleet: Fleet) -> None:
    # a 10 % stage admits 8 devices of tier a and 3 of tier b (whose 6 other devices stay on
    # the baseline, outside the bucket)
    fleet.cohort("a", OLD, 8, ids=ids_in("ao", 8, 50, 100))
    fleet.cohort("a", NEW, 8, ids=ids_in("an", 8, 0, 10))
    fleet.cohort("b", OLD, 6, ids=ids_in("bo", 6, 50, 100))
    fleet.cohort("b", NEW, 3, ids=ids_in("bn", 3, 0, 10))
    # devices of the ring and tier that run another model are not this model's population
    engine = create_engine(fleet.url)
    with Session(engine) as s, s.begin():
        for i, did in enumerate(ids_in("bx", 5, 0, 10)):
            dev = Device(
                device_id=did, credential_hash=f"x{i:063d}", ring=RING, tier="b",
                enrolled_at=T0 - 86400, health="ok", events_total=0, dropped_total=0,
                rate_window_start=0.0, rate_count=0,
            )  # fmt: skip
            s.add(dev)
            s.flush()
            s.add(DeviceModel(device_pk=dev.id, model="other", version="1.0.0", counter=1,
                              updated_at=T0, ring=RING, tier="b", active=True))  # fmt: skip
    engine.dispose()
    results = fleet.evaluate(Ctx(percent=10.0))
    b = by(results, "health.latency_p95", "b")
    assert b.status is GateStatus.PASS, b.to_json()
    assert b.reason == "tier b: 3 device(s) in this stage < min_devices 5: judged in the next stage"
    assert b.evidence["admitted_devices"] == 3 and "3 new devices" in b.evidence["held_because"]
    # the whole-stage gates still need (and have) their own sample
    assert by(results, "health.latency_p95").evidence["new_devices"] == 11
    assert by(results, "health.latency_p95", "a").status is GateStatus.PASS
    assert combine(results, Action.PAUSE) is Action.PROMOTE, [
        r.to_json() for r in results if r.status is not GateStatus.PASS
    ]
    # without a stage percentage nothing is deferred: the small tier holds, as before
    assert combine(fleet.evaluate(Ctx()), Action.PAUSE) is Action.HOLD
    # the next stage (100 % of the ring) admits all 9: 3 reporting is too few, and it holds
    # (admitted devices that stay silent still count against the stage)
    held = fleet.evaluate(Ctx(percent=100.0))
    assert by(held, "health.latency_p95", "b").status is GateStatus.HOLD
    assert combine(held, Action.PAUSE) is Action.HOLD
    # ... and once tier b's devices report, a regression there halts
    fleet.cohort("b", NEW, 10, latency_s=0.04, ids=ids_in("bs", 10, 50, 100))
    judged = fleet.evaluate(Ctx(percent=100.0))
    assert by(judged, "health.latency_p95", "b").status is GateStatus.FAIL
    assert combine(judged, Action.PAUSE) is Action.PAUSE


def test_at_100_percent_a_tier_smaller_than_the_sample_is_judged_by_the_whole_stage(
    fleet: Fleet,
) -> None:
    fleet.cohort("a", OLD, 8)
    fleet.cohort("c", NEW, 3)  # the ring holds only 3 devices of tier c
    # never promote on silence: the whole-stage gates still need their own sample
    alone = fleet.evaluate(Ctx(percent=100.0))
    assert by(alone, "health.error_rate", "c").status is GateStatus.PASS
    assert by(alone, "health.error_rate").status is GateStatus.HOLD
    assert combine(alone, Action.PAUSE) is Action.HOLD
    fleet.cohort("a", NEW, 8)
    results = fleet.evaluate(Ctx(percent=100.0))
    c = by(results, "health.error_rate", "c")
    assert c.status is GateStatus.PASS
    assert c.reason.endswith("< min_devices 5: judged by the whole-stage gate only")
    assert by(results, "health.error_rate").evidence["new_devices"] == 11
    assert combine(results, Action.PAUSE) is Action.PROMOTE


def test_a_tier_whose_concurrent_baseline_the_stage_leaves_too_small_is_deferred(
    fleet: Fleet,
) -> None:
    # a 50 % stage admits 8 of tier b's 11 devices: only 3 stay on the baseline
    fleet.cohort("a", OLD, 8, ids=ids_in("ao", 8, 50, 100))
    fleet.cohort("a", NEW, 8, ids=ids_in("an", 8, 0, 50))
    fleet.cohort("b", OLD, 3, ids=ids_in("bo", 3, 50, 100))
    fleet.cohort("b", NEW, 8, ids=ids_in("bn", 8, 0, 50))
    results = fleet.evaluate(Ctx(percent=50.0))
    b = by(results, "health.error_rate", "b")
    assert b.status is GateStatus.PASS, b.to_json()
    assert b.reason == (
        "tier b: 3 device(s) outside this stage (its concurrent baseline) < min_devices 5: "
        "judged in the next stage"
    )
    assert combine(results, Action.PAUSE) is Action.PROMOTE
    assert combine(fleet.evaluate(Ctx()), Action.PAUSE) is Action.HOLD


# -- crash rate normalised for exposure -------------------------------------------------------


def crash_cohorts(fleet: Fleet, new_crashes: list[int]) -> None:
    """Baseline: 40 devices x 4 intervals of 100 inferences (400), 3 crashes (2 % of 160
    intervals); new: 40 devices x 12 intervals (1,200 inferences: three times the exposure),
    ``new_crashes`` per device (the rest none)."""
    for i in range(40):
        fleet.device("a", OLD, Behaviour(inferences=400, crashes=int(i < 3)))
    for i in range(40):
        c = new_crashes[i] if i < len(new_crashes) else 0
        fleet.device("a", NEW, Behaviour(inferences=1200, crashes=c))


def test_crash_rate_is_judged_per_inference_so_more_exposure_passes(fleet: Fleet) -> None:
    # 2 % of intervals crash on both releases: 10 crashes in 480 intervals on 9 devices. The
    # crashed-device fraction (9/40 vs 3/40) was 0.15 higher, beyond its 0.05 and held it
    crash_cohorts(fleet, [2] + [1] * 8)
    c = by(fleet.evaluate(), "health.crash_rate", "a")
    assert c.status is GateStatus.PASS, c.to_json()
    assert c.value is not None and c.baseline is not None and c.value < 1.5 * c.baseline
    assert (c.evidence["new_crashes"], c.evidence["baseline_crashes"]) == (10, 3)


def test_crash_rate_ten_times_higher_fails(fleet: Fleet) -> None:
    # 20 % of intervals crash on the new release: 100 crashes on 40 devices
    crash_cohorts(fleet, [3] * 20 + [2] * 20)
    c = by(fleet.evaluate(), "health.crash_rate", "a")
    assert c.status is GateStatus.FAIL, c.to_json()
    assert c.confidence is not None and c.confidence >= 0.98


def test_forged_minority_flips_no_crash_verdict(fleet: Fleet) -> None:
    crash_cohorts(fleet, [2] + [1] * 8)
    # four forged devices crash-looping on a good release: neither fail nor hold it
    fleet.cohort("a", NEW, 4, crashes=60, inferences=40)
    c = by(fleet.evaluate(), "health.crash_rate", "a")
    assert c.status is GateStatus.PASS, c.to_json()


def test_forged_minority_cannot_pass_a_crash_regression(fleet: Fleet) -> None:
    crash_cohorts(fleet, [3] * 20 + [2] * 20)
    # four forged devices with the most exposure a device can weigh and no crash
    fleet.cohort("a", NEW, 4, crashes=0, inferences=10_000)
    c = by(fleet.evaluate(), "health.crash_rate", "a")
    assert c.status is GateStatus.FAIL, c.to_json()
