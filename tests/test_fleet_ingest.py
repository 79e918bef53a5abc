"""Report ingestion through the real service (gunicorn, 2 workers) on SQLite and PostgreSQL:
dedupe by (device, queue epoch, seq), acks, bounds, rate limits, enrolment and rotation."""

from __future__ import annotations

from typing import Any

from tests.fleet_fixtures import (  # noqa: F401
    FleetService,
    call,
    fleet_backend,
    fleet_service,
    postgres,
    start_service,
)


def report(
    device: str,
    events: list[dict[str, Any]],
    *,
    queue: str = "q1",
    dropped: int = 0,
    models: dict[str, Any] | None = None,
    ring: str = "ga",
    tier: str = "default",
    arch: str = "x86_64",
) -> dict[str, Any]:
    return {
        "format": "edge-ota.report/1",
        "device": {
            "id": device,
            "ring": ring,
            "tier": tier,
            "arch": arch,
            "runtime_version": "1.31.1",
            "client_version": "0.1.0",
            "models": models if models is not None else {},
        },
        "queue": queue,
        "dropped": dropped,
        "events": events,
    }


def ev(
    seq: int, kind: str = "downloaded", model: str = "m", version: str = "1.0.0", **data: Any
) -> dict[str, Any]:
    return {
        "seq": seq,
        "time": 1_700_000_000.0 + seq,
        "kind": kind,
        "model": model,
        "version": version,
        "data": data,
    }


def post_report(svc: FleetService, device: str, cred: str, doc: Any) -> Any:
    return call("POST", f"{svc.url}/v1/devices/{device}/events", doc, token=cred)


def timeline(svc: FleetService, device: str) -> list[tuple[str, int, str]]:
    r = call("GET", f"{svc.url}/v1/devices/{device}?events=1000", token=svc.admin_token)
    assert r.status == 200, r.doc
    return sorted((e["queue"], e["seq"], e["kind"]) for e in r.doc["timeline"])


def test_report_is_stored_once_and_acked_with_its_highest_seq(fleet_service: FleetService) -> None:
    svc = fleet_service
    cred = svc.enroll("dev-1")
    doc = report("dev-1", [ev(1), ev(2, "staged"), ev(3, "smoke_passed")])
    r = post_report(svc, "dev-1", cred, doc)
    assert (r.status, r.doc) == (200, {"ack": 3})
    # the same batch again (a lost reply): acked, nothing stored twice
    r = post_report(svc, "dev-1", cred, doc)
    assert (r.status, r.doc) == (200, {"ack": 3})
    # overlapping resend plus new events
    r = post_report(
        svc, "dev-1", cred, report("dev-1", [ev(3, "smoke_passed"), ev(4, "committed")])
    )
    assert (r.status, r.doc) == (200, {"ack": 4})
    assert timeline(svc, "dev-1") == [
        ("q1", 1, "downloaded"),
        ("q1", 2, "staged"),
        ("q1", 3, "smoke_passed"),
        ("q1", 4, "committed"),
    ]


def test_a_new_queue_epoch_restarts_seqs_without_being_deduplicated_away(
    fleet_service: FleetService,
) -> None:
    svc = fleet_service
    cred = svc.enroll("dev-1")
    assert post_report(svc, "dev-1", cred, report("dev-1", [ev(1), ev(2)])).doc == {"ack": 2}
    r = post_report(svc, "dev-1", cred, report("dev-1", [ev(1, "confirmed")], queue="q2"))
    assert (r.status, r.doc) == (200, {"ack": 1})
    assert timeline(svc, "dev-1") == [
        ("q1", 1, "downloaded"),
        ("q1", 2, "downloaded"),
        ("q2", 1, "confirmed"),
    ]


def test_an_empty_batch_with_only_a_drop_count_is_acked_zero(fleet_service: FleetService) -> None:
    svc = fleet_service
    cred = svc.enroll("dev-1")
    r = post_report(svc, "dev-1", cred, report("dev-1", [], dropped=7))
    assert (r.status, r.doc) == (200, {"ack": 0})
    d = call("GET", f"{svc.url}/v1/devices/dev-1", token=svc.admin_token).doc
    assert d["dropped_total"] == 7 and d["events_total"] == 0


def test_bounds_refuse_the_whole_report_and_store_nothing(fleet_service: FleetService) -> None:
    svc = fleet_service
    cred = svc.enroll("dev-1")
    too_many = report("dev-1", [ev(i) for i in range(1, 202)])
    assert post_report(svc, "dev-1", cred, too_many).status == 400
    huge = report("dev-1", [ev(1, blob="x" * 70_000)])
    assert post_report(svc, "dev-1", cred, huge).status == 400
    r = call("POST", f"{svc.url}/v1/devices/dev-1/events", body=b"[" * 2_000_000, token=cred)
    assert r.status == 413 and r.doc["error"] == "too_large"
    r = call(
        "POST", f"{svc.url}/v1/devices/dev-1/events", body=b"[" * 5000 + b"]" * 5000, token=cred
    )
    assert r.status == 400 and r.doc["error"] == "too_deep"
    unordered = report("dev-1", [ev(2), ev(1)])
    assert post_report(svc, "dev-1", cred, unordered).status == 400
    assert timeline(svc, "dev-1") == []


def test_a_device_reporting_too_often_gets_429_with_retry_after(fleet_backend: str) -> None:
    with start_service(fleet_backend, "--max-reports-per-minute", "3") as svc:
        cred = svc.enroll("dev-1")
        for seq in (1, 2, 3):
            assert post_report(svc, "dev-1", cred, report("dev-1", [ev(seq)])).status == 200
        r = post_report(svc, "dev-1", cred, report("dev-1", [ev(4)]))
        assert r.status == 429 and r.doc["error"] == "rate_limited"
        assert 1 <= int(r.headers["retry-after"]) <= 60
        # another device is not held back, and the refused event was not stored
        other = svc.enroll("dev-2")
        assert post_report(svc, "dev-2", other, report("dev-2", [ev(1)])).status == 200
        assert [s for _, s, _ in timeline(svc, "dev-1")] == [1, 2, 3]


def test_enrolment_token_uses_expiry_and_binding(fleet_service: FleetService) -> None:
    svc = fleet_service
    tok = svc.enroll_token(uses=2, ring="canary", tier="jetson")
    facts = {"ring": "ga", "tier": "default", "arch": "aarch64"}
    r1 = call("POST", f"{svc.url}/v1/enroll", {"token": tok, "device_id": "a", "facts": facts})
    assert r1.status == 201
    assert (r1.doc["device_id"], r1.doc["ring"], r1.doc["tier"]) == ("a", "canary", "jetson")
    assert len(r1.doc["credential"]) >= 43
    # the same id again: 409 (the token's second use is not spent on it)
    r = call("POST", f"{svc.url}/v1/enroll", {"token": tok, "device_id": "a", "facts": facts})
    assert r.status == 409
    assert (
        call(
            "POST", f"{svc.url}/v1/enroll", {"token": tok, "device_id": "b", "facts": facts}
        ).status
        == 201
    )
    r = call("POST", f"{svc.url}/v1/enroll", {"token": tok, "device_id": "c", "facts": facts})
    assert r.status == 401  # used up
    r = call(
        "POST",
        f"{svc.url}/v1/enroll",
        {"token": "otaenr_" + "A" * 43, "device_id": "c", "facts": facts},
    )
    assert r.status == 401
    # the device claims ga/default but was enrolled as canary/jetson: flagged, not refused
    d = call("GET", f"{svc.url}/v1/devices/a", token=svc.admin_token).doc
    assert d["ring"] == "canary" and d["claims_changed"] and "canary" in d["claims_note"]


def test_rotation_kills_the_old_credential_at_once(fleet_service: FleetService) -> None:
    svc = fleet_service
    old = svc.enroll("dev-1")
    r = call("POST", f"{svc.url}/v1/devices/dev-1/credential", token=old)
    assert r.status == 200
    new = r.doc["credential"]
    assert new != old
    assert post_report(svc, "dev-1", old, report("dev-1", [ev(1)])).status == 401
    assert post_report(svc, "dev-1", new, report("dev-1", [ev(1)])).status == 200
    # a credential the device proposes (so a lost reply can be retried with it)
    proposed = "P" * 50
    r = call("POST", f"{svc.url}/v1/devices/dev-1/credential", {"credential": proposed}, token=new)
    assert (r.status, r.doc) == (200, {"credential": proposed})
    r = call(
        "POST", f"{svc.url}/v1/devices/dev-1/credential", {"credential": proposed}, token=proposed
    )  # the retry after a lost reply
    assert (r.status, r.doc) == (200, {"credential": proposed})
    assert (
        call(
            "POST",
            f"{svc.url}/v1/devices/dev-1/credential",
            {"credential": "short"},
            token=proposed,
        ).status
        == 400
    )
    assert post_report(svc, "dev-1", new, report("dev-1", [ev(2)])).status == 401


def test_revoked_device_gets_401_and_may_re_enrol_with_a_fresh_token(
    fleet_service: FleetService,
) -> None:
    svc = fleet_service
    cred = svc.enroll("dev-1")
    assert post_report(svc, "dev-1", cred, report("dev-1", [ev(1)])).status == 200
    r = call("POST", f"{svc.url}/v1/devices/dev-1/revoke", token=svc.admin_token)
    assert r.status == 200 and r.doc["revoked"]
    r = post_report(svc, "dev-1", cred, report("dev-1", [ev(2)]))
    assert r.status == 401
    assert call("POST", f"{svc.url}/v1/devices/dev-1/credential", token=cred).status == 401
    again = svc.enroll("dev-1")
    assert post_report(svc, "dev-1", cred, report("dev-1", [ev(2)])).status == 401
    assert post_report(svc, "dev-1", again, report("dev-1", [ev(2)])).doc == {"ack": 2}
    assert [s for _, s, _ in timeline(svc, "dev-1")] == [1, 2]  # history kept
    audit = call("GET", f"{svc.url}/v1/audit", token=svc.admin_token).doc["records"]
    actions = [(a["action"], a["target"]) for a in audit]
    assert ("device.revoke", "dev-1") in actions
    assert any(
        a["action"] == "device.revoke" and a["actor"].startswith("token:admin-") for a in audit
    )


def test_late_events_are_stored_but_never_turn_the_state_back(fleet_service: FleetService) -> None:
    """A device that sends out of order (not ours, but possible) gets every event stored
    before it is acked; events older than what was seen do not move derived state."""
    svc = fleet_service
    cred = svc.enroll("dev-1")
    assert post_report(svc, "dev-1", cred, report("dev-1", [ev(5, "confirmed")])).doc == {"ack": 5}
    late = report("dev-1", [ev(3, "committed"), ev(4, "reverted")])
    assert post_report(svc, "dev-1", cred, late).doc == {"ack": 4}
    assert post_report(svc, "dev-1", cred, late).doc == {"ack": 4}  # and a resend of them
    assert [s for _, s, _ in timeline(svc, "dev-1")] == [3, 4, 5]
    d = call("GET", f"{svc.url}/v1/devices/dev-1", token=svc.admin_token).doc
    assert d["health"] == "ok" and d["last_outcome"]["kind"] == "confirmed"
    assert d["events_total"] == 3
    assert d["releases"][0]["state"] == "confirmed"
