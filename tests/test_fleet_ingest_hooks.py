"""The per-kind ingestion hook (``ota.fleet._ingest.on_new_events``) on SQLite and PostgreSQL,
and the unique index on credential digests, through the real app (Flask's WSGI client: a hook
is registered in the process that serves, which a gunicorn service started by a test is not).

The hook's contract: called in the report's transaction with the events of its kind that the
report stored, each event once in its life (a resend, a late event already stored or a pruned
one never again); what it raises refuses the whole report (nothing stored, nothing acked)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy.orm import Session

from ota.fleet import FleetConfig, _ingest
from ota.fleet._app import create_app
from ota.fleet._local import create_token
from ota.fleet._report import ReportEvent
from ota.fleet._validate import Rejected
from tests.fleet_fixtures import fleet_backend, postgres  # noqa: F401 - fixtures used by name
from tests.test_fleet_ingest import ev, report


@contextlib.contextmanager
def _client(db_url: str) -> Iterator[tuple[FlaskClient, str]]:
    cfg = FleetConfig(db_url=db_url)
    admin = str(create_token(cfg, "admin-hooks", "admin", 3600)["token"])
    app = create_app(cfg)
    try:
        yield app.test_client(), admin
    finally:
        app.extensions["ota_fleet"]["engine"].dispose()


def _enroll(c: FlaskClient, admin: str, device_id: str, proposal: str | None = None) -> str:
    tok = c.post("/v1/enroll-tokens", json={}, headers={"Authorization": f"Bearer {admin}"})
    assert tok.status_code == 201, tok.data
    body: dict[str, Any] = {"token": tok.get_json()["token"], "device_id": device_id}
    if proposal:
        body["credential_proposal"] = proposal
    r = c.post("/v1/enroll", json=body)
    assert r.status_code == 201, r.data
    return str(r.get_json()["credential"])


def _post(c: FlaskClient, device_id: str, cred: str, doc: dict[str, Any]) -> Any:
    return c.post(
        f"/v1/devices/{device_id}/events",
        json=doc,
        headers={"Authorization": f"Bearer {cred}"},
    )


def test_a_kind_hook_sees_each_stored_event_once_and_can_refuse_the_report(
    fleet_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_ingest, "_HOOKS", {})
    seen: list[tuple[str, list[int]]] = []

    def on_smoke(s: Session, dev: _ingest.Reporter, events: Any) -> None:
        assert isinstance(s, Session) and all(isinstance(e, ReportEvent) for e in events)
        if any(e.data.get("refuse") for e in events):
            raise Rejected(400, "malformed", "refused by a hook")
        seen.append((dev.device_id, [e.seq for e in events]))

    _ingest.on_new_events("smoke_failed", on_smoke)
    with pytest.raises(ValueError, match="not an event kind"):
        _ingest.on_new_events("Not A Kind", on_smoke)
    with _client(fleet_backend) as (c, admin):
        cred = _enroll(c, admin, "dev-1")

        def smoke(seq: int, **data: Any) -> dict[str, Any]:
            return {**ev(seq, **data), "kind": "smoke_failed"}

        r = _post(c, "dev-1", cred, report("dev-1", [ev(1), smoke(2), ev(3), smoke(5)]))
        assert (r.status_code, r.get_json()) == (200, {"ack": 5})
        assert seen == [("dev-1", [2, 5])]  # only its kind, in seq order
        # a resend and a late event: the late one (4) is new, the others were seen already
        r = _post(c, "dev-1", cred, report("dev-1", [smoke(2), ev(3), smoke(4), smoke(5)]))
        assert (r.status_code, r.get_json()) == (200, {"ack": 5})
        assert seen == [("dev-1", [2, 5]), ("dev-1", [4])]
        # a hook's refusal refuses the whole report: nothing stored, nothing acked
        r = _post(c, "dev-1", cred, report("dev-1", [ev(6), smoke(7, refuse=True)]))
        assert r.status_code == 400 and r.get_json()["message"] == "refused by a hook"
        d = c.get("/v1/devices/dev-1?events=20", headers={"Authorization": f"Bearer {admin}"})
        assert sorted(e["seq"] for e in d.get_json()["timeline"]) == [1, 2, 3, 4, 5]
        assert d.get_json()["events_total"] == 5
        r = _post(c, "dev-1", cred, report("dev-1", [ev(6), smoke(7)]))  # sent again, accepted
        assert (r.status_code, r.get_json()) == (200, {"ack": 7})
        assert seen[-1] == ("dev-1", [7])


def test_a_credential_names_one_device(fleet_backend: str) -> None:
    """The unique index on credential digests: a device cannot rotate to (nor enrol with)
    another device's credential; the refusal is a 409 and both devices keep working."""
    with _client(fleet_backend) as (c, admin):
        mine = "otadev_" + "A" * 43
        cred_1 = _enroll(c, admin, "dev-1", proposal=mine)
        cred_2 = _enroll(c, admin, "dev-2")
        assert cred_1 == mine
        r = c.post(
            "/v1/devices/dev-2/credential",
            json={"credential": mine},
            headers={"Authorization": f"Bearer {cred_2}"},
        )
        assert r.status_code == 409 and r.get_json()["error"] == "conflict", r.data
        tok = c.post("/v1/enroll-tokens", json={}, headers={"Authorization": f"Bearer {admin}"})
        r = c.post(
            "/v1/enroll",
            json={
                "token": tok.get_json()["token"],
                "device_id": "dev-3",
                "credential_proposal": mine,
            },
        )
        assert r.status_code == 409 and r.get_json()["error"] == "credential_taken", r.data
        for device, cred in (("dev-1", cred_1), ("dev-2", cred_2)):
            r = _post(c, device, cred, report(device, [ev(1)]))
            assert (r.status_code, r.get_json()) == (200, {"ack": 1}), device
        assert _post(c, "dev-2", cred_1, report("dev-2", [ev(2)])).status_code == 401
