"""The authorisation matrix, on the real service (SQLite and PostgreSQL): every endpoint x
{no credential, another device's credential, a revoked one, an expired, revoked or
under-scoped operator token, a secret of the wrong kind} is refused with 401/403, and the
database is byte-for-byte what it was. Each endpoint is then called with enough rights, so
the matrix cannot pass by refusing everything."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import create_engine, inspect, text

from ota.fleet import FleetConfig
from ota.fleet._app import local_actor
from ota.fleet._local import run
from ota.fleet._openapi import openapi_document
from ota.fleet._store import create_operator_token
from tests.fleet_fixtures import (  # noqa: F401
    FleetService,
    call,
    fleet_backend,
    fleet_service,
    postgres,
)
from tests.test_fleet_ingest import ev, post_report, report


def fingerprint(db_url: str) -> dict[str, list[str]]:
    """Every row of every table, as text: equal fingerprints mean nothing was written."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            out = {}
            for table in sorted(inspect(conn).get_table_names()):
                rows = conn.execute(text(f'SELECT * FROM "{table}"')).all()  # our tables
                out[table] = sorted(json.dumps(list(r), default=str) for r in rows)
            return out
    finally:
        engine.dispose()


def _expired_token(db_url: str, scope: str) -> str:
    """An operator token that expired an hour ago (made with a clock an hour back)."""

    def go(s: Any, now: float) -> str:
        return create_operator_token(s, f"old-{scope}", scope, 60, local_actor(), now - 3600)[0]

    return run(FleetConfig(db_url=db_url), go)


# (method, path template, body, scope): every operation of the operator API
OPERATOR_CALLS: list[tuple[str, str, Any, str]] = [
    ("GET", "/v1/fleet", None, "read"),
    ("GET", "/v1/devices", None, "read"),
    ("GET", "/v1/devices/victim", None, "read"),
    ("GET", "/v1/releases/m/1.0.0", None, "read"),
    ("POST", "/v1/devices/victim/revoke", None, "admin"),
    ("GET", "/v1/enroll-tokens", None, "admin"),
    ("POST", "/v1/enroll-tokens", {"name": "new-enrol", "uses": 2}, "admin"),
    ("POST", "/v1/enroll-tokens/spare/revoke", None, "admin"),
    ("GET", "/v1/tokens", None, "admin"),
    ("POST", "/v1/tokens", {"name": "new-op", "scope": "admin"}, "admin"),
    ("POST", "/v1/tokens/spare-op/revoke", None, "admin"),
    ("GET", "/v1/audit", None, "admin"),
]
DEVICE_CALLS = ["/v1/devices/victim/events", "/v1/devices/victim/credential"]
PUBLIC = {"/v1/health", "/v1/openapi.json", "/v1/enroll"}


def test_the_matrix_covers_every_documented_operation() -> None:
    covered = {(m, p) for m, p, _, _ in OPERATOR_CALLS} | {("POST", p) for p in DEVICE_CALLS}
    for path, ops in openapi_document()["paths"].items():
        for method in ops:
            if path in PUBLIC:
                continue
            concrete = (
                path.replace("{device_id}", "victim")
                .replace("{model}", "m")
                .replace("{version}", "1.0.0")
                .replace("{name}", "spare")
            )
            if path == "/v1/tokens/{name}/revoke":
                concrete = "/v1/tokens/spare-op/revoke"
            assert (method.upper(), concrete) in covered, (method, path)


def test_every_endpoint_refuses_the_wrong_credential_and_writes_nothing(
    fleet_service: FleetService,
) -> None:
    svc = fleet_service
    victim = svc.enroll("victim")
    assert post_report(svc, "victim", victim, report("victim", [ev(1)])).status == 200
    attacker = svc.enroll("attacker")
    revoked_dev = svc.enroll("gone")
    assert call("POST", f"{svc.url}/v1/devices/gone/revoke", token=svc.admin_token).status == 200
    enrol_secret = svc.enroll_token(name="spare", uses=5)
    reader = svc.operator_token("read")
    roller = svc.operator_token("rollout")
    r = call(
        "POST", f"{svc.url}/v1/tokens", {"name": "spare-op", "scope": "read"}, token=svc.admin_token
    )
    assert r.status == 201
    r = call(
        "POST",
        f"{svc.url}/v1/tokens",
        {"name": "dead-admin", "scope": "admin"},
        token=svc.admin_token,
    )
    dead_admin = r.doc["token"]
    assert (
        call("POST", f"{svc.url}/v1/tokens/dead-admin/revoke", token=svc.admin_token).status == 200
    )
    expired_admin = _expired_token(svc.db_url, "admin")
    before = fingerprint(svc.db_url)

    refused: list[tuple[str, str, int]] = []
    # device endpoints
    victim_report = report("victim", [ev(2, "confirmed")])
    for path in DEVICE_CALLS:
        body = victim_report if path.endswith("/events") else None
        for label, cred in [
            ("none", None),
            ("other device", attacker),
            ("revoked device", revoked_dev),
            ("operator admin", svc.admin_token),
            ("enrolment token", enrol_secret),
            ("garbage", "x" * 600),
        ]:
            r = call("POST", f"{svc.url}{path}", body, token=cred)
            assert r.status == 401, (path, label, r.status, r.doc)
            assert r.doc["error"] == "unauthorized"
            refused.append((path, label, r.status))
        # the attacker's own credential with the victim's name inside the body too
        r = call("POST", f"{svc.url}/v1/devices/attacker/events", victim_report, token=attacker)
        assert r.status == 400 and r.doc["error"] == "wrong_device"
    # operator endpoints
    for method, path, body, scope in OPERATOR_CALLS:
        creds: list[tuple[str, str | None, set[int]]] = [
            ("none", None, {401}),
            ("device credential", victim, {401}),
            ("enrolment token", enrol_secret, {401}),
            ("expired admin", expired_admin, {401}),
            ("revoked admin", dead_admin, {401}),
            ("garbage", "otaop_" + "A" * 43, {401}),
        ]
        if scope == "admin":
            creds += [("read", reader, {403}), ("rollout", roller, {403})]
        for label, cred, want in creds:
            r = call(method, f"{svc.url}{path}", body, token=cred)
            assert r.status in want, (method, path, label, r.status, r.doc)
            assert r.doc["error"] in ("unauthorized", "forbidden")
            refused.append((path, label, r.status))
    assert len(refused) == 12 + 4 * 6 + 8 * 8
    assert fingerprint(svc.db_url) == before, "a refused request wrote something"

    # with enough rights every one of them works (the refusals above were not blanket)
    for method, path, body, scope in OPERATOR_CALLS:
        cred = {"read": reader, "admin": svc.admin_token}[scope]
        r = call(method, f"{svc.url}{path}", body, token=cred)
        assert r.status in (200, 201), (method, path, r.status, r.doc)
    again = svc.enroll("victim")  # revoked above by the admin call: it may re-enrol
    assert post_report(svc, "victim", again, victim_report).status == 200
    assert call("POST", f"{svc.url}/v1/devices/victim/credential", token=again).status == 200
