"""Fleet state derived from events, read through the operator API of the real service on
SQLite and PostgreSQL: per device, per release (success = confirmed), per model by ring/tier;
device filters and keyset pagination."""

from __future__ import annotations

from typing import Any

from tests.fleet_fixtures import (  # noqa: F401
    FleetService,
    call,
    fleet_backend,
    fleet_service,
    postgres,
)
from tests.test_fleet_ingest import ev, post_report, report


def _fleet(svc: FleetService) -> dict[str, Any]:
    r = call("GET", f"{svc.url}/v1/fleet?max_age=0", token=svc.admin_token)
    assert r.status == 200, r.doc
    return dict(r.doc)


def _ids(svc: FleetService, query: str) -> list[str]:
    r = call("GET", f"{svc.url}/v1/devices?{query}", token=svc.admin_token)
    assert r.status == 200, r.doc
    return [d["device_id"] for d in r.doc["devices"]]


def _populate(svc: FleetService) -> None:
    """Five devices at different points of m@2.0.0, two rings, two tiers."""
    v1 = {"m": {"version": "1.0.0", "counter": 1}}
    v2 = {"m": {"version": "2.0.0", "counter": 2}}
    plan: list[tuple[str, str, str, list[dict[str, Any]], dict[str, Any]]] = [
        (
            "a",
            "canary",
            "cpu",
            [
                ev(1, "downloaded", version="2.0.0"),
                ev(2, "staged", version="2.0.0"),
                ev(3, "smoke_passed", version="2.0.0"),
                ev(4, "committed", version="2.0.0"),
                ev(5, "confirmed", version="2.0.0", by="app"),
            ],
            v2,
        ),
        ("b", "canary", "cpu", [ev(1, "committed", version="2.0.0")], v2),
        (
            "c",
            "canary",
            "gpu",
            [
                ev(
                    1,
                    "smoke_failed",
                    version="2.0.0",
                    reason="too slow",
                    report={"latency_ms": 812.5, "budget_ms": 200},
                )
            ],
            v1,
        ),
        (
            "d",
            "ga",
            "cpu",
            [
                ev(1, "committed", version="2.0.0"),
                ev(2, "reverted", version="2.0.0", reason="health"),
            ],
            v1,
        ),
        ("e", "ga", "cpu", [ev(1, "security", version="2.0.0", reason="bad signature")], v1),
    ]
    for dev, ring, tier, events, models in plan:
        cred = svc.enroll(dev, ring=ring, tier=tier)
        r = post_report(svc, dev, cred, report(dev, events, models=models, ring=ring, tier=tier))
        assert r.status == 200, r.doc


def test_release_states_count_devices_and_success_means_confirmed(
    fleet_service: FleetService,
) -> None:
    svc = fleet_service
    _populate(svc)
    doc = _fleet(svc)
    rel = {(r["model"], r["version"]): r for r in doc["releases"]}[("m", "2.0.0")]
    assert rel["states"] == {
        "confirmed": 1,
        "committed": 1,
        "smoke_failed": 1,
        "reverted": 1,
        "security": 1,
    }
    assert rel["confirmed"] == 1  # b committed but never confirmed: not a success
    assert doc["devices"]["total"] == 5 and doc["devices"]["active"] == 5
    assert doc["devices"]["by_health"] == {"unknown": 1, "ok": 1, "failing": 2, "security": 1}
    assert doc["events_received"] == 10
    models = {(m["model"], m["version"], m["ring"], m["tier"]): m["devices"] for m in doc["models"]}
    assert models == {
        ("m", "1.0.0", "canary", "gpu"): 1,
        ("m", "1.0.0", "ga", "cpu"): 2,
        ("m", "2.0.0", "canary", "cpu"): 2,
    }
    detail = call("GET", f"{svc.url}/v1/releases/m/2.0.0", token=svc.admin_token).doc
    assert detail["running"] == 2 and detail["confirmed"] == 1
    smoke = [f for f in detail["failures"] if f["state"] == "smoke_failed"]
    assert smoke[0]["device_id"] == "c"
    assert smoke[0]["detail"]["report"] == {"latency_ms": 812.5, "budget_ms": 200}


def test_device_view_has_facts_models_outcome_and_timeline(fleet_service: FleetService) -> None:
    svc = fleet_service
    _populate(svc)
    d = call("GET", f"{svc.url}/v1/devices/d", token=svc.admin_token).doc
    assert (d["ring"], d["tier"], d["arch"], d["health"]) == ("ga", "cpu", "x86_64", "failing")
    assert d["models"] == {"m": {"version": "1.0.0", "counter": 1}}
    assert d["last_outcome"]["kind"] == "reverted"
    assert d["last_outcome"]["version"] == "2.0.0"
    assert [e["kind"] for e in d["timeline"]] == ["reverted", "committed"]  # newest first
    assert d["timeline"][0]["device_time"] == 1_700_000_002.0
    assert d["timeline"][0]["received_at"] > 1_700_000_002.0  # both clocks kept
    assert d["last_seen"] is not None and not d["claims_changed"]
    assert call("GET", f"{svc.url}/v1/devices/nobody", token=svc.admin_token).status == 404


def test_device_list_filters_and_pages(fleet_service: FleetService) -> None:
    svc = fleet_service
    _populate(svc)
    assert _ids(svc, "model=m&version=2.0.0") == ["a", "b"]
    assert _ids(svc, "version=1.0.0") == ["c", "d", "e"]
    assert _ids(svc, "ring=canary&tier=cpu") == ["a", "b"]
    assert _ids(svc, "health=failing") == ["c", "d"]
    assert _ids(svc, "health=security") == ["e"]
    assert _ids(svc, "seen_before=1000") == []
    assert _ids(svc, "seen_after=1000") == ["a", "b", "c", "d", "e"]
    pages, after = [], ""
    while True:
        r = call("GET", f"{svc.url}/v1/devices?limit=2{after}", token=svc.admin_token).doc
        pages.append([d["device_id"] for d in r["devices"]])
        if r["next"] is None:
            break
        after = f"&after={r['next']}"
    assert pages == [["a", "b"], ["c", "d"], ["e"]]
    call("POST", f"{svc.url}/v1/devices/e/revoke", token=svc.admin_token)
    assert _ids(svc, "revoked=true") == ["e"]
    doc = _fleet(svc)
    assert doc["devices"]["revoked"] == 1 and doc["devices"]["by_health"]["security"] == 0
    # a revoked device leaves the release and model figures too, and re-enrolment restores it
    rel = {(r["model"], r["version"]): r["states"] for r in doc["releases"]}[("m", "2.0.0")]
    assert "security" not in rel
    ga = {(m["ring"], m["tier"]): m["devices"] for m in doc["models"] if m["version"] == "1.0.0"}
    assert ga[("ga", "cpu")] == 1
    svc.enroll("e", ring="ga", tier="cpu")
    doc = _fleet(svc)
    rel = {(r["model"], r["version"]): r["states"] for r in doc["releases"]}[("m", "2.0.0")]
    assert rel["security"] == 1
    ga = {(m["ring"], m["tier"]): m["devices"] for m in doc["models"] if m["version"] == "1.0.0"}
    assert ga[("ga", "cpu")] == 2
    detail = call("GET", f"{svc.url}/v1/releases/m/1.0.0", token=svc.admin_token).doc
    assert detail["running"] == 3


def test_a_device_whose_hardware_claim_changes_is_flagged(fleet_service: FleetService) -> None:
    svc = fleet_service
    cred = svc.enroll("x", arch="x86_64")
    assert post_report(svc, "x", cred, report("x", [ev(1)], arch="x86_64")).status == 200
    assert post_report(svc, "x", cred, report("x", [ev(2)], arch="aarch64")).status == 200
    d = call("GET", f"{svc.url}/v1/devices/x", token=svc.admin_token).doc
    assert d["claims_changed"] and "arch changed" in d["claims_note"]
    assert _fleet(svc)["devices"]["flagged"] == 1
