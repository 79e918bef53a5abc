"""Security review of the fleet service (issue 8): attacks through real HTTP on gunicorn,
on SQLite and PostgreSQL. Each test reproduces one finding and pins its fix."""

from __future__ import annotations

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
