"""The fleet simulation, short (issue 9's proof; ``bench/fleet_sim.py`` runs it at 2,000+
devices): simulated devices enrolled through the real service (gunicorn, SQLite/PG), deciding with
the client's own policy on the repository's signed rollout state, reporting with the client's
own reporter; the real controller with the inference-health gates plugged in as
``ota rollout controller`` plugs them (``rollout/_plugins.py``), on the real clock.

What is proved: a good release with two devices forging smoke failures (fewer than the
gates' minimum sample) reaches general availability and finishes, a real device (``ota
device init``, the real update with its smoke test) taking it along the simulated ones (this
also needs a baseline at stages of 100 % of a ring, which the simulation found missing); a
release whose smoke fails on one tier, with two devices forging success, halts in the first
stage and is never signed beyond it. And the wiring: the plan's ``[gates.health]`` reaches the
gates as thresholds (integers stay integers), a configured webhook queues every verdict, a
webhook URL without a secret is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from bench.fleet_sim import SCENARIOS, Scenario, plan_toml, run_scenario
from ota.errors import ConfigError, InputError
from ota.fleet import FleetConfig, migrate
from ota.fleet._db import make_engine
from ota.fleet._models import WebhookOutbox
from ota.rollout import _plugins
from ota.rollout._context import RolloutContext
from ota.rollout._gates import install_gates
from ota.rollout._plan import plan_from_toml
from ota.rollout._verdict import GateStatus
from tests.fleet_fixtures import postgres  # noqa: F401

DEVICES = 160  # 24 canary, 40 pilot, 96 ga; two tiers
SOAK_S = 3
# short and fast: a 3 s soak, the controller every 0.5 s, devices poll every 0.5 s and report
# every 1.5 s (and at once after an update, as the real client does)


def fast_run(sc: Scenario, work: Path, **kw: Any) -> dict[str, Any]:
    return run_scenario(
        sc, devices=DEVICES, work=work, soak_s=SOAK_S, tick_s=0.5, report_s=1.5, step_s=0.5,
        health_min=5, deadline_s=240, **kw,
    )  # fmt: skip


def test_plan_health_table_reaches_the_gates_as_thresholds(tmp_path: Path) -> None:
    from ota.rollout import _health

    plan = plan_from_toml(plan_toml(SOAK_S, 5, 5))
    assert plan.health["min_devices"] == 5.0  # the plan keeps floats; the gates take 5.0 as 5
    assert _plugins.extra_gates() == list(_health.GATES)
    url = f"sqlite:///{tmp_path / 'f.sqlite3'}"
    migrate(url)
    engine = make_engine(FleetConfig(db_url=url))
    ctx = RolloutContext(1, "m", "2.0.0", "1.0.0", 0, "canary", 50.0, 0.0, 10.0, plan.health)
    bad = RolloutContext(1, "m", "2.0.0", "1.0.0", 0, "canary", 50.0, 0.0, 10.0, {"x": 1.0})
    with Session(engine) as s:
        got = [g for gate in _plugins.extra_gates() for g in gate(s, ctx)]
        with pytest.raises(InputError, match="unknown"):
            _plugins.extra_gates()[0](s, bad)  # the controller turns this into a HOLD
    engine.dispose()
    assert got and all(g.status == GateStatus.HOLD for g in got)  # silence holds


def test_a_configured_webhook_queues_every_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'f.sqlite3'}"
    migrate(url)
    engine = make_engine(FleetConfig(db_url=url))
    monkeypatch.delenv("OTA_WEBHOOK_URL", raising=False)
    assert _plugins.verdict_hooks(engine) == []
    monkeypatch.setenv("OTA_WEBHOOK_URL", "http://127.0.0.1:9/hook")  # nobody listens
    monkeypatch.setenv("OTA_WEBHOOK_SECRET", "s" * 40)
    hooks = _plugins.verdict_hooks(engine)
    hooks[0]({"format": "edge-ota.rollout-verdict/1", "model": "m", "version": "2.0.0",
              "action": "hold", "gates": []})  # fmt: skip
    with Session(engine) as s:
        rows = list(s.scalars(select(WebhookOutbox)))
    engine.dispose()
    assert len(rows) == 1 and rows[0].state == "pending" and rows[0].attempts == 1
    assert '"action":"hold"' in rows[0].body and rows[0].last_error
    monkeypatch.setenv("OTA_WEBHOOK_SECRET", "short")
    with pytest.raises(ConfigError, match="secret"):
        _plugins.verdict_hooks(engine)


def test_good_release_with_forged_failures_reaches_ga(tmp_path: Path) -> None:
    """Two stages: canary 50 % (a concurrent baseline in the ring), then general availability
    (100 % of every ring: the baseline is the ring's own telemetry of the old release)."""
    sc = Scenario("good_forged", forgers=2, forge="failure")
    r = fast_run(sc, tmp_path, real=1, stages=(("canary", 50), ("ga", 100)))
    assert r["controller_error"] == ""
    assert not r["halted"], r["halt_reason"]
    assert r["max_stage"] == 1 and r["ga_s"] is not None, r
    assert r["state"] == "done", r
    assert r["ran_release"] >= DEVICES - 2, r  # all but the forgers
    # the real device (canary: real update, TUF client, smoke test) took it too
    assert r["real_devices"] == {"canary:real-0": "2.0.0"}, r


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_bad_release_with_forged_successes_halts_in_the_first_stage(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    if backend == "postgresql":
        request.getfixturevalue("postgres")  # skipped without PostgreSQL binaries
    sc = SCENARIOS["forge_success"]
    r = fast_run(sc, tmp_path, backend=backend)
    assert r["controller_error"] == ""
    assert r["halted"] and r["max_stage"] == 0, r
    assert "install" in r["halt_reason"], r["halt_reason"]
    # only canary devices of the healthy tier in the first stage's bucket ever ran it
    assert 0 < r["ran_release"] <= 24, r


def test_fewer_forged_failures_than_the_minimum_hold_a_tier_never_fail_it(tmp_path: Path) -> None:
    """The install gate's forged-device bound (found by the simulation): 2 failed among 20
    executed of a tier (10 % > the plan's 5 %) hold; 5 failed (the minimum sample) fail."""
    from tests.fleet_fixtures import new_db
    from tests.test_rollout_controller import Fleet

    f = Fleet(new_db("sqlite", None, tmp_path))
    plan = plan_from_toml(
        '[[stages]]\nring = "canary"\npercent = 100\nmin_devices = 1\nsoak = 0\n'
        "[gates.install]\nmax_failure_rate = 0.05\nmin_devices = 5\n"
    )
    ctx = RolloutContext(1, "m", "2.0.0", "1.0.0", 0, "canary", 100.0, 0.0, 1e10, {})

    def failures() -> GateStatus:
        with Session(f.engine) as s:
            got = install_gates(s, ctx, plan, plan.stages[0])
        return next(g.status for g in got if g.gate == "install.failures")

    try:
        for i in range(18):
            f.take(f"ok{i}", "canary")
        for i in range(2):
            f.enroll(f"forger{i}", "canary")
            f.report(f"forger{i}", "smoke_failed", reason="forged")
        assert failures() == GateStatus.HOLD
        for i in range(3):
            f.enroll(f"bad{i}", "canary")
            f.report(f"bad{i}", "smoke_failed", reason="smoke test failed")
        assert failures() == GateStatus.FAIL
    finally:
        f.engine.dispose()


def _latency_gate(tmp_path: Path, cohorts: dict[tuple[str, str], int], new_factor: float) -> Any:
    """The whole-stage ``health.latency_p95`` over real rows: ``cohorts`` maps (version, tier)
    to a device count; tier ``b`` is 1.6x slower than ``a`` on either release."""
    import numpy as np

    from ota.fleet._models import Device, DeviceModel
    from ota.fleet._report import ReportEvent
    from ota.fleet._telemetry import DeviceKey, absorb
    from ota.rollout._health import evaluate_health
    from tests.test_rollout_health import MODEL, NEW, RING, T0, Behaviour, Ctx, make_summary

    rng = np.random.default_rng(7)
    tmp_path.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{tmp_path / 'h.sqlite3'}"
    migrate(url)
    engine = make_engine(FleetConfig(db_url=url))
    k = 0
    with Session(engine) as s, s.begin():
        for (version, tier), count in cohorts.items():
            for _ in range(count):
                k += 1
                lat = 0.02 * (1.6 if tier == "b" else 1.0) * float(rng.lognormal(0, 0.1))
                b = Behaviour(latency_s=lat * (new_factor if version == NEW else 1.0))
                dev = Device(device_id=f"d{k}", credential_hash=f"{k:064d}", ring=RING,
                             tier=tier, enrolled_at=T0, health="ok", events_total=0,
                             dropped_total=0, rate_window_start=0.0, rate_count=0)  # fmt: skip
                s.add(dev)
                s.flush()
                s.add(DeviceModel(device_pk=dev.id, model=MODEL, version=version, counter=1,
                                  updated_at=T0, ring=RING, tier=tier, active=True))  # fmt: skip
                s.flush()
                ev = ReportEvent(1, T0, "telemetry", MODEL, version,
                                 {"summary": make_summary(rng, version, b)})  # fmt: skip
                absorb(s, DeviceKey(dev.id, dev.device_id), {MODEL: (version, 1)}, [ev], T0)
    with Session(engine) as s:
        got = evaluate_health(s, Ctx(), {})
    engine.dispose()
    return next(g for g in got if g.gate == "health.latency_p95" and g.tier == "")


def test_a_cohort_with_more_slow_tier_devices_is_no_latency_regression(tmp_path: Path) -> None:
    """Found by the many-rollouts simulation (6 of 100 good rollouts paused before): the
    buckets drew more devices of the slow tier into the new cohort, and the whole-stage gate,
    pooling raw p95s, judged the release 1.4-1.5x slower. Each device is now compared with
    its own tier's baseline; a regression on every tier still fails the whole stage."""
    from tests.test_rollout_health import NEW, OLD

    mix = {(NEW, "b"): 14, (NEW, "a"): 5, (OLD, "b"): 5, (OLD, "a"): 14}
    good = _latency_gate(tmp_path / "good", mix, 1.0)
    assert good.status != GateStatus.FAIL, good.reason
    assert good.value is not None and good.value < 1.1, good
    bad = _latency_gate(tmp_path / "bad", mix, 1.35)
    assert bad.status == GateStatus.FAIL, bad.reason
