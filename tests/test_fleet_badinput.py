"""Bad input on every endpoint of the real service (SQLite and PostgreSQL): malformed,
oversized, deeply nested, wrongly typed bodies and odd paths get a 4xx JSON error, never a
5xx, and nothing is written. A database that is down or locked answers 503 with Retry-After
(the device keeps its events), and the service recovers when it is back."""

from __future__ import annotations

import json
import socket
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.fleet_fixtures import (  # noqa: F401
    FleetService,
    Postgres,
    call,
    fleet_backend,
    fleet_service,
    new_db,
    postgres,
    start_service,
)
from tests.test_fleet_authz import fingerprint
from tests.test_fleet_ingest import ev, post_report, report

BAD_BODIES: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("not json", b"{nope"),
    ("invalid utf-8", b'{"a": "\xff\xfe"}'),
    ("nan", b'{"a": NaN}'),
    ("array", b"[1, 2, 3]"),
    ("string", b'"hello"'),
    ("null", b"null"),
    ("deep", b'{"a":' * 3000 + b"1" + b"}" * 3000),
    ("deep list", b"[" * 100_000 + b"]" * 100_000),
    ("huge", b'{"a": "' + b"x" * 2_000_000 + b'"}'),
    ("big int", b'{"seq": ' + b"9" * 5000 + b"}"),
]


def _report_variants(device: str) -> list[tuple[str, Any]]:
    good = report(device, [ev(1)])
    out: list[tuple[str, Any]] = []

    def variant(label: str, **changes: Any) -> None:
        out.append((label, {**good, **changes}))

    def event_variant(label: str, **changes: Any) -> None:
        out.append((label, {**good, "events": [{**good["events"][0], **changes}]}))

    variant("wrong format", format="edge-ota.report/2")
    variant("no format", format=None)
    variant("device not an object", device="dev")
    variant("device id of another", device={**good["device"], "id": "someone-else"})
    variant("models not an object", device={**good["device"], "models": [1]})
    variant(
        "model version not a string", device={**good["device"], "models": {"m": {"version": 1}}}
    )
    variant(
        "model name with a slash..", device={**good["device"], "models": {"../x": {"version": "1"}}}
    )
    variant("queue missing", queue=None)
    variant("queue too long", queue="q" * 65)
    variant("queue with spaces", queue="a b")
    variant("dropped negative", dropped=-1)
    variant("dropped a string", dropped="3")
    variant("events not a list", events={"seq": 1})
    variant("unknown field", extra=1)
    event_variant("seq zero", seq=0)
    event_variant("seq float", seq=1.5)
    event_variant("seq bool", seq=True)
    event_variant("seq huge", seq=2**64)
    event_variant("time string", time="yesterday")
    event_variant("time negative", time=-5)
    event_variant("kind unknown shape", kind="DROP TABLE events")
    event_variant("kind not a string", kind=7)
    event_variant("data not an object", data=[1])
    event_variant("model too long", model="m" * 200)
    event_variant("version with control chars", version="1.0\n0")
    event_variant("event extra field", hacked=True)
    return out


def _no_5xx(r: Any, what: Any) -> None:
    assert 400 <= r.status < 500, (what, r.status, r.raw[:300])
    assert isinstance(r.doc, dict) and r.doc.get("error"), (what, r.raw[:300])


def test_bad_input_everywhere_is_a_4xx_json_error_and_writes_nothing(
    fleet_service: FleetService,
) -> None:
    svc = fleet_service
    cred = svc.enroll("dev-1")
    assert post_report(svc, "dev-1", cred, report("dev-1", [ev(1)])).status == 200
    before = fingerprint(svc.db_url)
    auth = {
        "/v1/enroll": None,
        "/v1/devices/dev-1/events": cred,
        "/v1/devices/dev-1/credential": cred,
        "/v1/enroll-tokens": svc.admin_token,
        "/v1/tokens": svc.admin_token,
    }
    for path, token in auth.items():
        for label, body in BAD_BODIES:
            if path.endswith("/credential") and label == "empty":
                continue  # no body is a valid rotation request (the service picks the secret)
            _no_5xx(call("POST", f"{svc.url}{path}", body=body, token=token), (path, label))
        _no_5xx(
            call(
                "POST",
                f"{svc.url}{path}",
                body=b"{}",
                token=token,
                headers={"Content-Type": "text/plain"},
            ),
            (path, "text/plain"),
        )
    for label, doc in _report_variants("dev-1"):
        _no_5xx(post_report(svc, "dev-1", cred, doc), label)
    bad_docs: list[tuple[str, Any]] = [
        ("/v1/enroll", {"token": 5, "device_id": "x"}),
        ("/v1/enroll", {"token": "otaenr_x", "device_id": "x" * 500}),
        ("/v1/enroll", {"token": "otaenr_x", "device_id": "../../etc"}),
        ("/v1/enroll", {"token": "otaenr_x", "device_id": "a", "facts": {"ring": ["ga"]}}),
        ("/v1/enroll", {"token": "otaenr_x", "device_id": "a", "facts": "ga"}),
        ("/v1/tokens", {"name": "x", "scope": "root"}),
        ("/v1/tokens", {"name": "x y", "scope": "read"}),
        ("/v1/tokens", {"name": "x", "scope": "read", "expires_in": 10**12}),
        ("/v1/tokens", {"name": "x", "scope": "read", "expires_in": "soon"}),
        ("/v1/tokens", {"scope": "read"}),
        ("/v1/enroll-tokens", {"uses": 0}),
        ("/v1/enroll-tokens", {"uses": -1}),
        ("/v1/enroll-tokens", {"ring": "a\u0000b"}),
        ("/v1/enroll-tokens", {"expires_in": 1.5}),
        ("/v1/devices/dev-1/credential", {"credential": "short"}),
        ("/v1/devices/dev-1/credential", {"credential": 123}),
        ("/v1/devices/dev-1/credential", {"credential": "é" * 60}),
    ]
    for path, doc in bad_docs:
        _no_5xx(call("POST", f"{svc.url}{path}", doc, token=auth[path]), (path, doc))
    queries = [
        "limit=0",
        "limit=abc",
        "limit=" + "9" * 30,
        "health=sick",
        "seen_after=nan",
        "seen_before=-1",
        "seen_after=1e400",
        "revoked=maybe",
        "model=%00",
        "after=" + "z" * 300,
        "ring=a%20b",
    ]
    for q in queries:
        _no_5xx(call("GET", f"{svc.url}/v1/devices?{q}", token=svc.admin_token), q)
    for path in [
        "/v1/devices/" + "d" * 300,
        "/v1/devices/%C3%A9",
        "/v1/devices/nobody",
        "/v1/devices/dev-1?events=-1",
        "/v1/devices/dev-1?events=99999",
        "/v1/releases/m/1.0.0?limit=0",
        "/v1/audit?limit=x",
        "/v1/nothing-here",
    ]:
        _no_5xx(call("GET", f"{svc.url}{path}", token=svc.admin_token), path)
    for path in [
        "/v1/devices/%2e%2e/events",
        "/v1/devices/" + "d" * 300 + "/events",
        "/v1/devices/nobody/events",
    ]:
        _no_5xx(call("POST", f"{svc.url}{path}", report("nobody", [ev(1)]), token=cred), path)
    _no_5xx(call("DELETE", f"{svc.url}/v1/fleet", token=svc.admin_token), "method")
    _no_5xx(
        call("POST", f"{svc.url}/v1/tokens/nobody/revoke", token=svc.admin_token),
        "revoke unknown token",
    )
    _no_5xx(
        call("POST", f"{svc.url}/v1/enroll-tokens/nobody/revoke", token=svc.admin_token),
        "revoke unknown enrolment token",
    )
    _no_5xx(
        call("POST", f"{svc.url}/v1/devices/nobody/revoke", token=svc.admin_token),
        "revoke unknown device",
    )
    oversized_header = {"Authorization": "Bearer " + "a" * 100_000}
    r = call("GET", f"{svc.url}/v1/fleet", headers=oversized_header)
    assert 400 <= r.status < 500
    assert fingerprint(svc.db_url) == before, "bad input wrote something"


def test_sqlite_locked_past_the_busy_timeout_answers_503_then_recovers(tmp_path: Path) -> None:
    url = new_db("sqlite", None, tmp_path)
    with start_service(url, "--busy-timeout-ms", "300") as svc:
        cred = svc.enroll("dev-1")
        holder = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            r = post_report(svc, "dev-1", cred, report("dev-1", [ev(1)]))
            assert r.status == 503 and r.doc["error"] == "unavailable"
            assert int(r.headers["retry-after"]) > 0
            # WAL: operators can still read while the writer lock is held elsewhere
            r = call("GET", f"{svc.url}/v1/fleet", token=svc.admin_token)
            assert r.status == 200, r.doc
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        r = post_report(svc, "dev-1", cred, report("dev-1", [ev(1)]))
        assert (r.status, r.doc) == (200, {"ack": 1})


@pytest.mark.slow
def test_postgresql_down_answers_503_then_recovers(postgres: Postgres, tmp_path: Path) -> None:
    url = new_db("postgresql", postgres, tmp_path)
    with start_service(url) as svc:
        cred = svc.enroll("dev-1")
        assert post_report(svc, "dev-1", cred, report("dev-1", [ev(1)])).status == 200
        postgres.stop("fast")
        try:
            for _ in range(3):  # every worker, whatever its pooled connections
                r = post_report(svc, "dev-1", cred, report("dev-1", [ev(2)]))
                assert r.status == 503 and r.doc["error"] == "unavailable", r.raw[:300]
                assert "retry-after" in r.headers
            assert call("GET", f"{svc.url}/v1/health").status == 503
        finally:
            postgres.start()
        r = post_report(svc, "dev-1", cred, report("dev-1", [ev(2)]))
        assert (r.status, r.doc) == (200, {"ack": 2})
        d = call("GET", f"{svc.url}/v1/devices/dev-1?events=10", token=svc.admin_token).doc
        assert sorted(e["seq"] for e in d["timeline"]) == [1, 2]


@pytest.mark.parametrize(
    "head",
    [
        b"GET /v1/health HTTP/1.1\r\nHost: x\r\nContent-Length: nU}]\r\n\r\n",
        b"GET /v1/health HTTP/1.1\r\nHost: x\r\nBad Header Name: 1\r\n\r\n",
        b"GET /v1/health HTTP/9.9\r\nHost: x\r\n\r\n",
    ],
    ids=["content-length", "header-name", "http-version"],
)
def test_a_request_gunicorn_refuses_gets_the_json_error_shape(
    fleet_service: FleetService, head: bytes
) -> None:
    """Refused before the app sees it (by gunicorn's parser), still a JSON 4xx, not HTML."""
    host, port = fleet_service.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head)
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    status_line, _, rest = raw.partition(b"\r\n")
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert status_line.split()[1].startswith(b"4"), raw
    assert b"content-type: application/json" in headers.lower(), raw
    doc = json.loads(body)
    assert set(doc) == {"error", "message"} and doc["error"] == "malformed_http", doc
