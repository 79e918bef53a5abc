"""Races across gunicorn workers on one database (SQLite and PostgreSQL): the same batch sent
at once by many connections is stored once and acked to all; an N-use enrolment token is
spent exactly N times; one device id is enrolled once however many race for it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tests.fleet_fixtures import (  # noqa: F401
    FleetService,
    Reply,
    call,
    fleet_backend,
    fleet_service,
    postgres,
)
from tests.test_fleet_ingest import ev, post_report, report, timeline

THREADS = 8


def _race(n: int, fn: Any) -> list[Reply]:
    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(fn, range(n)))


def test_the_same_batch_raced_is_stored_once_and_acked_to_every_sender(
    fleet_service: FleetService,
) -> None:
    svc = fleet_service
    cred = svc.enroll("dev-1")
    batches = [
        report("dev-1", [ev(s) for s in range(1, 11)]),
        report("dev-1", [ev(s) for s in range(6, 16)]),
        report("dev-1", [ev(s) for s in range(1, 21)]),
    ]
    replies = _race(24, lambda i: post_report(svc, "dev-1", cred, batches[i % 3]))
    assert sorted((r.status, r.doc["ack"]) for r in replies) == sorted(
        (200, [10, 15, 20][i % 3]) for i in range(24)
    )
    assert [s for _, s, _ in timeline(svc, "dev-1")] == list(range(1, 21))
    d = call("GET", f"{svc.url}/v1/devices/dev-1", token=svc.admin_token).doc
    assert d["events_total"] == 20


def test_an_n_use_token_is_spent_exactly_n_times_under_a_race(fleet_service: FleetService) -> None:
    svc = fleet_service
    tok = svc.enroll_token(uses=3)
    replies = _race(
        12,
        lambda i: call(
            "POST",
            f"{svc.url}/v1/enroll",
            {"token": tok, "device_id": f"d{i}", "facts": {"ring": "ga", "tier": "t"}},
        ),
    )
    assert sorted(r.status for r in replies) == [201] * 3 + [401] * 9
    tokens = call("GET", f"{svc.url}/v1/enroll-tokens", token=svc.admin_token).doc["tokens"]
    assert [(t["uses"], t["active"]) for t in tokens] == [(3, False)]


def test_one_device_id_raced_by_many_tokens_is_enrolled_once(fleet_service: FleetService) -> None:
    svc = fleet_service
    tokens = [svc.enroll_token() for _ in range(8)]
    replies = _race(
        8,
        lambda i: call(
            "POST",
            f"{svc.url}/v1/enroll",
            {"token": tokens[i], "device_id": "same", "facts": {"ring": "ga", "tier": "t"}},
        ),
    )
    assert sorted(r.status for r in replies) == [201] + [409] * 7
    winner = next(r.doc["credential"] for r in replies if r.status == 201)
    assert post_report(svc, "same", winner, report("same", [ev(1)])).status == 200
    used = [
        t["uses"]
        for t in call("GET", f"{svc.url}/v1/enroll-tokens", token=svc.admin_token).doc["tokens"]
    ]
    assert sorted(used) == [0] * 7 + [1]  # a refused enrolment spends no use
