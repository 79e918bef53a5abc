"""The fleet summary cache (ADR 0007, performance): ``GET /v1/fleet`` serves a count at most
``max_age`` seconds old and says when it was counted (``as_of``); after a burst of concurrent
reports through gunicorn, a fresh summary equals a recount of the database and what the
devices were sent; a stale one is the previous count, honestly dated."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy.orm import Session

from ota.fleet import FleetConfig
from ota.fleet._db import make_engine
from ota.fleet._store import summary
from tests.fleet_fixtures import (  # noqa: F401
    FleetService,
    call,
    fleet_backend,
    fleet_service,
    postgres,
)
from tests.test_fleet_ingest import ev, post_report, report

DEVICES = 24
OUTCOME = ["confirmed", "reverted", "security", "downloaded"]  # health ok/failing/security/-
HEALTH = {"confirmed": "ok", "reverted": "failing", "security": "security"}


def _fleet(svc: FleetService, max_age: int | None) -> dict[str, Any]:
    q = "" if max_age is None else f"?max_age={max_age}"
    r = call("GET", f"{svc.url}/v1/fleet{q}", token=svc.admin_token)
    assert r.status == 200, r.doc
    return dict(r.doc)


def _recount(svc: FleetService) -> dict[str, Any]:
    engine = make_engine(FleetConfig(db_url=svc.db_url))
    try:
        with Session(engine) as s, s.begin():
            return summary(s, time.time(), FleetConfig(db_url=svc.db_url).silent_after_s)
    finally:
        engine.dispose()


def _figures(doc: dict[str, Any]) -> dict[str, Any]:
    """The counted part of a summary (not its times)."""
    return {k: v for k, v in doc.items() if k not in ("generated_at", "as_of")}


def test_summary_after_a_concurrent_burst_equals_a_recount_and_stale_reads_say_so(
    fleet_service: FleetService,
) -> None:
    svc = fleet_service
    creds = {f"dev-{i:02d}": svc.enroll(f"dev-{i:02d}") for i in range(DEVICES)}
    before = _fleet(svc, 0)  # counted now, and cached
    assert before["devices"]["total"] == DEVICES
    assert before["devices"]["by_health"].get("ok", 0) == 0

    def send(i: int) -> int:
        dev = f"dev-{i:02d}"
        kinds = ["downloaded", "staged", OUTCOME[i % len(OUTCOME)]]
        doc = report(dev, [ev(n + 1, k, version="2.0.0") for n, k in enumerate(kinds)])
        return int(post_report(svc, dev, creds[dev], doc).status)

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(send, range(DEVICES))) == [200] * DEVICES
    burst_end = time.time()

    # A read allowing a day's staleness is the cached count, dated before the burst.
    stale = _fleet(svc, 86400)
    assert stale["as_of"] == before["as_of"] < burst_end
    assert _figures(stale) == _figures(before)

    # A fresh read counts every acknowledged report, exactly as a recount does.
    fresh = _fleet(svc, 0)
    assert fresh["as_of"] >= burst_end
    assert _figures(fresh) == _figures(_recount(svc))
    expected = {"ok": 0, "failing": 0, "security": 0}
    for i in range(DEVICES):
        h = HEALTH.get(OUTCOME[i % len(OUTCOME)])
        if h:
            expected[h] += 1
    by_health = fresh["devices"]["by_health"]
    assert {h: by_health.get(h, 0) for h in expected} == expected
    assert fresh["events_received"] == 3 * DEVICES
    assert fresh["devices"]["total"] == DEVICES

    # ... and is cached: the default max_age serves it (same as_of), without a recount.
    again = _fleet(svc, None)
    assert again["as_of"] == fresh["as_of"]
    assert _figures(again) == _figures(fresh)


def test_concurrent_fresh_reads_all_count_every_report(fleet_service: FleetService) -> None:
    """Many workers asking for a fresh count at once: one holds the lease and stores its
    count, the others count for themselves; none answers with an older count."""
    svc = fleet_service
    cred = svc.enroll("dev-a")
    assert post_report(svc, "dev-a", cred, report("dev-a", [ev(1, "confirmed")])).status == 200
    t0 = time.time()
    with ThreadPoolExecutor(8) as pool:
        docs = list(pool.map(lambda _: _fleet(svc, 0), range(16)))
    for d in docs:
        assert d["as_of"] >= t0
        assert d["devices"]["by_health"]["ok"] == 1
        assert d["events_received"] == 1


def test_max_age_is_bounded(fleet_service: FleetService) -> None:
    svc = fleet_service
    for bad in ("-1", "x", "86401", "1e3"):
        r = call("GET", f"{svc.url}/v1/fleet?max_age={bad}", token=svc.admin_token)
        assert r.status == 400, (bad, r.doc)


def _set_lease(svc: FleetService, lease_until: float, as_of: float | None = None) -> None:
    from sqlalchemy import update

    from ota.fleet._models import FleetSummaryCache

    engine = make_engine(FleetConfig(db_url=svc.db_url))
    try:
        with Session(engine) as s, s.begin():
            values: dict[str, float] = {"lease_until": lease_until}
            if as_of is not None:
                values["as_of"] = as_of
            s.execute(update(FleetSummaryCache).values(**values))
    finally:
        engine.dispose()


def test_while_one_worker_holds_the_lease_others_serve_the_dated_count_and_a_dead_lease_lapses(
    fleet_service: FleetService,
) -> None:
    svc = fleet_service
    cred = svc.enroll("dev-a")
    first = _fleet(svc, 0)
    assert first["devices"]["by_health"].get("ok", 0) == 0
    assert post_report(svc, "dev-a", cred, report("dev-a", [ev(1, "confirmed")])).status == 200
    # Another worker is recounting (its lease runs for a minute) and the count is an hour old:
    # a reader allowing 1 s serves that count, dated, rather than recounting alongside it.
    old = first["as_of"] - 3600
    _set_lease(svc, time.time() + 60, as_of=old)
    served = _fleet(svc, 1)
    assert served["as_of"] == old
    assert served["devices"]["by_health"].get("ok", 0) == 0
    # The leaseholder died: once its lease has lapsed the next stale read recounts and stores.
    _set_lease(svc, time.time() - 1)
    t0 = time.time()
    fresh = _fleet(svc, 1)
    assert fresh["as_of"] >= t0
    assert fresh["devices"]["by_health"]["ok"] == 1
    assert _fleet(svc, 3600)["as_of"] == fresh["as_of"]  # stored for the others
