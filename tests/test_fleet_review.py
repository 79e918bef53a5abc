"""Security review of the fleet service (issue 8): attacks through real HTTP on gunicorn,
on SQLite and PostgreSQL. Each test reproduces one finding and pins its fix."""

from __future__ import annotations

import json
from typing import Any

from tests.fleet_fixtures import (  # noqa: F401
    FleetService,
    Postgres,
    call,
    fleet_backend,
    fleet_service,
    postgres,
)


def test_non_ascii_digits_in_an_integer_query_argument_get_400_not_500(
    fleet_service: FleetService,
) -> None:
    """``'²'.isdigit()`` is true but ``int('²')`` raises: the check let it through to a 500.
    Only ASCII digits are an integer argument (nor is an Arabic-Indic digit a number)."""
    svc = fleet_service
    read = svc.operator_token("read")
    svc.enroll("review-int-1")
    for url in (
        f"{svc.url}/v1/devices?limit=%C2%B2",
        f"{svc.url}/v1/devices?limit=%D9%A1",
        f"{svc.url}/v1/devices/review-int-1?events=%C2%B3",
        f"{svc.url}/v1/releases/m/1.0.0?limit=%C2%B9",
        f"{svc.url}/v1/audit?limit=%C2%B2",
    ):
        token = svc.admin_token if "/audit" in url else read
        r = call("GET", url, token=token)
        assert r.status == 400, (url, r.status, r.doc)
        assert r.doc["error"] == "malformed"
    assert "Traceback" not in svc.log_text()


def test_rotation_never_accepts_a_credential_the_service_cannot_authenticate(
    fleet_service: FleetService,
) -> None:
    """The rotation route took any 43-512 character proposal, but a bearer header longer than
    the service reads is treated as absent: the device was answered 200 with its new
    credential, its old one was dead, and every later report got 401 (locked out until an
    operator re-enrolled it). A proposal is now refused (400, old credential kept) unless the
    service can authenticate it, and the longest accepted one works."""
    from tests.test_fleet_ingest import ev, post_report, report

    svc = fleet_service
    cred = svc.enroll("review-rot-1")
    url = f"{svc.url}/v1/devices/review-rot-1/credential"
    r = call("POST", url, {"credential": "A" * 300}, token=cred)
    assert r.status == 400, r.doc
    assert post_report(svc, "review-rot-1", cred, report("review-rot-1", [ev(1)])).status == 200
    longest = "B" * 128
    r = call("POST", url, {"credential": longest}, token=cred)
    assert r.status == 200, r.doc
    assert r.doc["credential"] == longest
    assert post_report(svc, "review-rot-1", cred, report("review-rot-1", [ev(2)])).status == 401
    r = post_report(svc, "review-rot-1", longest, report("review-rot-1", [ev(3)]))
    assert r.status == 200, r.doc


def test_drop_counts_saturate_instead_of_overflowing_the_database_column(
    fleet_service: FleetService,
) -> None:
    """``dropped`` may be up to 2**53 per report, summed into BIGINT columns: about a thousand
    such reports (or one device's long life) overflow them. SQLite's driver then raised
    OverflowError (a 500), PostgreSQL refused the row (400): either way every later report of
    that device was refused and its events never acked. The totals now saturate."""
    from sqlalchemy import create_engine, text

    from tests.test_fleet_ingest import ev, post_report, report

    svc = fleet_service
    cred = svc.enroll("review-drop-1")
    r = post_report(svc, "review-drop-1", cred, report("review-drop-1", [ev(1)], dropped=5))
    assert r.status == 200, r.doc
    near = 2**63 - 10  # what a long run of large drop counts adds up to
    engine = create_engine(svc.db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE devices SET dropped_total = :n"), {"n": near})
            conn.execute(text("UPDATE queues SET dropped = :n"), {"n": near})
    finally:
        engine.dispose()
    doc = report("review-drop-1", [ev(2)], dropped=2**53)
    r = post_report(svc, "review-drop-1", cred, doc)
    assert r.status == 200, r.doc
    assert r.doc == {"ack": 2}
    r = call("GET", f"{svc.url}/v1/devices/review-drop-1?events=10", token=svc.admin_token)
    assert r.status == 200, r.doc
    assert sorted(e["seq"] for e in r.doc["timeline"]) == [1, 2]
    assert "Traceback" not in svc.log_text()


def test_a_number_that_overflows_to_infinity_is_refused_like_nan(
    fleet_service: FleetService,
) -> None:
    """``1e400`` is valid JSON text, but Python reads it as ``inf``: NaN/Infinity literals were
    refused, the overflowing number was not. SQLite stored it and every operator read of that
    device (its timeline) or release (its failure figures) then answered ``Infinity``, which is
    not JSON (browsers' JSON.parse and strict parsers fail); PostgreSQL refused the row. Every
    body is now refused with 400 when a number is not finite, on both backends alike."""
    from tests.test_fleet_authz import fingerprint
    from tests.test_fleet_ingest import ev, report

    svc = fleet_service
    cred = svc.enroll("review-inf-1")
    doc = report("review-inf-1", [ev(1, kind="smoke_failed", latency_ms=1.5)])
    raw = json.dumps(doc).replace("1.5", "1e400").encode()
    assert b"1e400" in raw
    before = fingerprint(svc.db_url)
    r = call("POST", f"{svc.url}/v1/devices/review-inf-1/events", body=raw, token=cred)
    assert r.status == 400, r.doc
    assert r.doc["error"] == "malformed"
    assert fingerprint(svc.db_url) == before
    for path in ("/v1/devices/review-inf-1?events=10", "/v1/releases/m/1.0.0"):
        r = call("GET", f"{svc.url}{path}", token=svc.admin_token)
        assert r.status == 200
        json.loads(r.raw, parse_constant=_no_constant)  # strict JSON


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
