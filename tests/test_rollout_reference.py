"""Drift against the release's *own* signed reference, judged by the controller (issue 9).

Real parts: a repository whose releases carry their reference output distribution in the
signed release facts (published with ``reference_data``), the fleet database on SQLite and
PostgreSQL, devices that enrol, install and send ``edge-ota.telemetry/1`` summaries as
``edge-ota.report/1`` documents through the service's own parser and ingest code, summaries
made with the client's own :class:`OutputCounter` over the bins the signed reference fixes, and
the controller with the inference-health gates plugged in as ``ota rollout controller`` does.

What is proved: when the new release's outputs drift from its own reference *and the baseline
devices drift the same way* (so drift against the baseline sees nothing), the controller
pauses the rollout on ``health.drift_reference`` with the evidence (which reference, metric,
value, threshold, sample sizes); the same release whose outputs match its reference promotes;
the reference comes from the signed facts, never from a device: fewer than ``min_devices``
devices summarising over bins of their own cannot take the gate away; an application that
summarises over its own bins is judged against the baseline instead.
"""

from __future__ import annotations

import bisect
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy.orm import Session

from ota.client._telemetry_format import (
    LATENCY_BUCKETS,
    LATENCY_EDGES,
    TELEMETRY_FORMAT,
    OutputCounter,
    OutputSpec,
    OutputSummary,
)
from ota.fleet._ingest import ingest, lock_device, reporter_of
from ota.fleet._report import parse_report
from ota.repository import Project
from ota.repository._auditlog import read_log
from ota.rollout import _health, _lease, _store
from ota.rollout._controller import Controller
from ota.rollout._health import reference_of
from ota.rollout._plan import plan_from_toml
from tests.fleet_fixtures import fleet_backend, postgres  # noqa: F401
from tests.repo_helpers import make_project, publish_mlp
from tests.test_rollout_controller import Fleet, row, signed, steering

PLAN = """
on_failure = "pause"
device_timeout = "1h"
[[stages]]
ring = "canary"
percent = 100
min_devices = 5
soak = 0
deadline = "1h"
[[stages]]
ring = "ga"
percent = 100
min_devices = 1
soak = 0
[gates.install]
min_devices = 5
[gates.health]
min_devices = 5
min_inferences = 1000
pass_confidence = 0
drift_metric = "{metric}"
"""
DEVICES = 6


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """m 1.0.0 (ga) and m 2.0.0 (canary 10 %), each carrying in its signed facts the reference
    output distribution of output ``y``: standard normal values, 32 fixed bins."""
    root = tmp_path_factory.mktemp("refpub")
    data = root / "reference.npz"
    rng = np.random.default_rng(3)
    np.savez(data, y=rng.normal(0.0, 1.0, (2000, 4)).astype(np.float32))
    project = make_project(root)
    publish_mlp(project, "m", "1.0.0", ring="ga", reference_data=data)
    publish_mlp(project, "m", "2.0.0", seed=1, percent=10.0, reference_data=data)
    return root


@pytest.fixture
def project(published: Path, tmp_path: Path) -> Project:
    import shutil

    shutil.copytree(published, tmp_path / "w")
    conf = tmp_path / "w" / "proj" / "ota.toml"
    conf.write_text(conf.read_text().replace(str(published / "repo"), str(tmp_path / "w" / "repo")))
    return Project.open(tmp_path / "w" / "proj")


@pytest.fixture
def fleet(fleet_backend: str) -> Iterator[Fleet]:  # noqa: F811
    f = Fleet(fleet_backend)
    yield f
    f.engine.dispose()


def signed_release(project: Project) -> Any:
    """m 2.0.0's release facts as the repository's signed metadata holds them."""
    from ota.repository._index import read_facts
    from ota.repository._txn import Transaction

    txn = Transaction.begin(project.storage, project.signers, project.expiry())
    facts = read_facts(txn, "m", "2.0.0")
    assert facts is not None and facts.release.telemetry is not None
    return facts.release


def the_reference(project: Project) -> OutputSummary:
    [ref] = _store.signed_reference(project, "m", "2.0.0").outputs
    return ref


class Telemetry:
    """Devices' inference summaries over the reference's bins, sent through real ingest."""

    def __init__(self, f: Fleet, spec: Any) -> None:
        self.f, self.spec = f, spec
        self.rng = np.random.default_rng(11)
        self.seq = itertools.count(1000)

    def summary(self, version: str, out_mean: float, n: int = 400) -> dict[str, Any]:
        lat = np.exp(self.rng.normal(np.log(0.02), 0.2, n))
        hist = [0] * LATENCY_BUCKETS
        for x in lat.tolist():
            hist[bisect.bisect_right(LATENCY_EDGES, x)] += 1
        out = OutputCounter(self.spec)
        for r in self.rng.normal(out_mean, 1.0, (n, 4)):
            out.add(r.astype(np.float32))
        now = time.time()
        return {
            "format": TELEMETRY_FORMAT, "model": "m", "version": version, "start": now - 300,
            "end": now, "inferences": n, "errors": 0, "crashes": 0,
            "latency": {"counts": hist, "sum_s": float(lat.sum())},
            "outputs": [out.summary().to_dict()],
        }  # fmt: skip

    def send(self, device: str, version: str, out_mean: float) -> None:
        ring, tier = self.f.facts[device]
        doc = {
            "format": "edge-ota.report/1",
            "device": {
                "id": device, "ring": ring, "tier": tier, "arch": "x86_64",
                "runtime_version": "1.31.1", "client_version": "0.1.0",
                "models": {"m": {"version": version, "counter": 2 if version == "2.0.0" else 1}},
            },
            "queue": "q1", "dropped": 0,
            "events": [{
                "seq": next(self.seq), "time": time.time(), "kind": "telemetry", "model": "m",
                "version": version, "data": {"summary": self.summary(version, out_mean)},
            }],
        }  # fmt: skip
        rep = parse_report(json.loads(json.dumps(doc)), device, self.f.cfg)
        with Session(self.f.engine) as s, s.begin():
            dev = lock_device(s, device)
            assert dev is not None
            got = ingest(s, reporter_of(s, dev), rep, time.time())
        assert got is not None


def run_canary(
    project: Project,
    f: Fleet,
    out_mean: float,
    metric: str = "js",
    *,
    app_spec: Any = None,
    base_mean: float | None = None,
    forgers: int = 0,
) -> tuple[int, Any]:
    """Start the rollout, let DEVICES canary devices take 2.0.0 and DEVICES stay on 1.0.0,
    the new ones producing outputs around ``out_mean``, the baseline around ``base_mean``
    (default: the same); summarised over the reference's bins, or over ``app_spec`` when the
    application chose its own; ``forgers`` more new devices report healthy outputs (mean 0)
    over bins of their own. One judging tick."""
    tel = Telemetry(f, app_spec or the_reference(project).spec)
    forged = Telemetry(f, OutputSpec("y", "hist", -4.0, 8.0, 3))
    ctl = Controller(f.engine, project, holder="A", extra_gates=_health.GATES)
    rid = _store.start(
        f.engine, project, "m", "2.0.0", plan_from_toml(PLAN.format(metric=metric)), "t"
    )
    t0 = time.time()
    assert ctl.tick(t0).actions[0]["stage"] == 0  # canary 100 % signed
    for i in range(DEVICES):
        f.take(f"new-{i}", "canary")
        tel.send(f"new-{i}", "2.0.0", out_mean)
        f.enroll(f"old-{i}", "canary")
        tel.send(f"old-{i}", "1.0.0", out_mean if base_mean is None else base_mean)
    for i in range(forgers):
        f.take(f"forger-{i}", "canary")
        forged.send(f"forger-{i}", "2.0.0", 0.0)
    rep = ctl.tick(time.time() + 1)
    _lease.release(f.engine, "A")
    return rid, rep


def gates_of(verdict: dict[str, Any], gate: str) -> list[dict[str, Any]]:
    return [g for g in verdict["gates"] if g["gate"] == gate]


def test_outputs_drifting_from_the_releases_own_reference_pause_it_with_evidence(
    project: Project, fleet: Fleet
) -> None:
    rid, rep = run_canary(project, fleet, out_mean=1.5)
    [verdict] = rep.verdicts
    assert verdict["action"] == "pause", verdict["reason"]
    # against the baseline nothing moved (it drifted the same way) ...
    base = gates_of(verdict, "health.drift")
    assert base and all(g["status"] == "pass" for g in base), base
    # ... against the release's own signed reference it did, with the evidence
    [ref] = [g for g in gates_of(verdict, "health.drift_reference") if g["tier"] == ""]
    assert ref["status"] == "fail" and ref["value"] > ref["threshold"] == 0.3
    ev = ref["evidence"]
    sha = _store.signed_reference(project, "m", "2.0.0").sha256
    assert ev["reference"] == f"m 2.0.0 signed release facts sha256:{sha}" and len(sha) == 64
    assert ev["metric"] == "js" and ev["output"] == "y"
    assert ev["new_devices"] == DEVICES and ev["reference_values"] == 2000 * 4
    assert ev["new_values"] == DEVICES * 400 * 4
    assert ref["confidence"] >= 0.98 and ev["devices_beyond"] == DEVICES
    assert "drift from the reference" in verdict["reason"]
    # acted on: signed pause, the row paused, the verdict with its evidence in the audit log
    assert signed(project).paused and row(fleet.engine, rid).state == "paused"
    assert [e for e, _ in steering(project)] == ["promote", "pause"]
    logged = [e for e in read_log(project.storage) if e.event == "rollout-verdict"]
    assert any(
        g["gate"] == "health.drift_reference" and g["evidence"]["reference"] == ev["reference"]
        for e in logged
        for g in e.details["gates"]
    )


def test_outputs_matching_the_reference_promote(project: Project, fleet: Fleet) -> None:
    rid, rep = run_canary(project, fleet, out_mean=0.0, metric="psi")
    assert row(fleet.engine, rid).stage == 1
    [verdict] = rep.verdicts
    assert verdict["action"] == "promote", verdict["reason"]
    refs = gates_of(verdict, "health.drift_reference")
    assert refs and all(g["status"] == "pass" for g in refs)
    assert all(g["evidence"]["metric"] == "psi" for g in refs)  # the plan's choice
    assert rep.actions[0]["stage"] == 1 and signed(project).ring == "ga"


def test_a_forged_minority_over_its_own_bins_cannot_take_the_reference_gate_away(
    project: Project, fleet: Fleet
) -> None:
    """The reference is the signed one, never a device's: four forged devices (fewer than the
    plan's five) reporting healthy outputs over bins of their own choosing are not compared
    with it, and the honest devices' drift from the signed reference still pauses."""
    ref = _store.signed_reference(project, "m", "2.0.0")
    assert ref.source == "m 2.0.0 signed release facts" and len(ref.outputs) == 1
    assert ref.outputs == reference_of(signed_release(project).telemetry)
    _, rep = run_canary(project, fleet, out_mean=1.5, forgers=4)
    [verdict] = rep.verdicts
    assert verdict["action"] == "pause", verdict["reason"]
    [g] = [g for g in gates_of(verdict, "health.drift_reference") if g["tier"] == ""]
    assert g["status"] == "fail" and g["evidence"]["devices_with_other_bins"] == 4
    assert g["evidence"]["new_devices"] == DEVICES  # the forgers are not in the sample


def test_an_application_with_its_own_bins_is_judged_against_the_baseline(
    project: Project, fleet: Fleet
) -> None:
    """An application may summarise outputs over bins of its own (``Recorder(specs=…)``):
    then no device's figures are comparable with the reference, which is not judged (as the
    baseline drift gate with unequal bins: no re-binning), and drift is judged against the
    baseline devices that use the same bins."""
    own = OutputSpec("y", "hist", -4.0, 4.0, 32)
    _, rep = run_canary(project, fleet, out_mean=1.5, base_mean=0.0, app_spec=own)
    [verdict] = rep.verdicts
    assert verdict["action"] == "pause", verdict["reason"]
    assert gates_of(verdict, "health.drift_reference") == []
    [g] = [g for g in gates_of(verdict, "health.drift") if g["tier"] == ""]
    assert g["status"] == "fail"
