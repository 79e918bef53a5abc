"""Pruning against a concurrent report of the same device (PostgreSQL: SQLite serialises every
writer with ``BEGIN IMMEDIATE``, so the interleaving below cannot happen there).

The attack: a device resends events that are about to be pruned. Its report reads the queue's
``pruned_seq`` (nothing pruned yet), then the prune deletes those events and commits, then the
report inserts them: gone from the table, they look new and are stored (and counted) a second
time. The fix is that pruning locks the device rows first, as a report does; this test forces
exactly that interleaving through the real service: a trigger on ``events`` (added for the
test) makes the report's insert wait on an advisory lock the test holds, *after* it read the
queue, and the prune is started while it waits. Conditions are waited for, never slept on.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.fleet_fixtures import Postgres, call, new_db, postgres, start_service  # noqa: F401

PAUSE_KEY = 0x6F7461_5052  # advisory lock id the trigger waits on ("ota", "PR")
DEADLINE_S = 60.0


def report(device_id: str, seqs: list[int]) -> dict[str, Any]:
    return {
        "format": "edge-ota.report/1",
        "device": {
            "id": device_id,
            "ring": "ga",
            "tier": "default",
            "arch": "x86_64",
            "runtime_version": "1.31.1",
            "client_version": "0.1.0",
            "models": {"det": {"version": "1.0.0", "counter": 1}},
        },
        "queue": "q-1",
        "dropped": 0,
        "events": [
            {
                "seq": s,
                "time": 1_700_000_000.0 + s,
                "kind": "checked",
                "model": "det",
                "version": "1.0.0",
                "data": {},
            }
            for s in seqs
        ],
    }


def _libpq(url: str) -> str:
    """psycopg's connection string for the service's SQLAlchemy URL."""
    return url.replace("postgresql+psycopg://", "postgresql://")


def _wait_for(what: str, cond: Any) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _waiting(conn: psycopg.Connection[Any], event: str) -> int:
    """Backends of this database waiting on a lock of kind ``event`` (``advisory``) or on
    a row/transaction lock (``row``)."""
    kinds = ("advisory",) if event == "advisory" else ("transactionid", "tuple")
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND wait_event = ANY(%s)",
        (list(kinds),),
    ).fetchone()
    return int(row[0]) if row else 0


@pytest.mark.slow
def test_prune_waits_for_a_concurrent_report_of_the_device_and_nothing_is_stored_twice(
    postgres: Postgres, tmp_path: Path
) -> None:
    from ota.fleet import FleetConfig
    from ota.fleet._local import prune

    url = new_db("postgresql", postgres, tmp_path)
    with start_service(url) as svc:
        cred = svc.enroll("dev-1")
        ev_url = f"{svc.url}/v1/devices/dev-1/events"
        r = call("POST", ev_url, report("dev-1", [1, 2, 3]), token=cred)
        assert (r.status, r.doc) == (200, {"ack": 3})

        with psycopg.connect(_libpq(url), autocommit=True) as ctl:
            ctl.execute(
                "CREATE FUNCTION test_pause_insert() RETURNS trigger LANGUAGE plpgsql AS "
                f"$$ BEGIN PERFORM pg_advisory_xact_lock({PAUSE_KEY}); RETURN NULL; END $$"
            )
            ctl.execute(
                "CREATE TRIGGER test_pause BEFORE INSERT ON events "
                "FOR EACH STATEMENT EXECUTE FUNCTION test_pause_insert()"
            )
            ctl.execute("SELECT pg_advisory_lock(%s)", (PAUSE_KEY,))
            replies: list[Any] = []
            pruned: list[int] = []
            # the device resends 1-3 (stored, about to be pruned) with new events 4-5
            sender = threading.Thread(
                target=lambda: replies.append(
                    call("POST", ev_url, report("dev-1", [1, 2, 3, 4, 5]), token=cred)
                )
            )
            sender.start()
            try:
                # the report has locked the device and read the queue; its insert waits
                _wait_for("the report to wait in its insert", lambda: _waiting(ctl, "advisory"))
                pruner = threading.Thread(
                    target=lambda: pruned.append(prune(FleetConfig(db_url=url), 0.0))
                )
                pruner.start()
                # fixed: the prune waits for the report's device lock; broken: it commits
                _wait_for(
                    "the prune to wait for the device lock, or to finish",
                    lambda: _waiting(ctl, "row") > 0 or not pruner.is_alive(),
                )
            finally:
                ctl.execute("SELECT pg_advisory_unlock(%s)", (PAUSE_KEY,))
            sender.join(DEADLINE_S)
            pruner.join(DEADLINE_S)
            assert not sender.is_alive() and not pruner.is_alive()
            ctl.execute("DROP TRIGGER test_pause ON events")

            assert len(replies) == 1 and (replies[0].status, replies[0].doc) == (200, {"ack": 5})
            assert pruned == [3]  # 1-3 were old enough; 4-5 committed after the prune looked
            seqs = [
                s
                for (s,) in ctl.execute(
                    "SELECT e.seq FROM events e JOIN devices d ON d.id = e.device_pk "
                    "WHERE d.device_id = 'dev-1' ORDER BY e.seq"
                )
            ]
            assert seqs == [4, 5], "a pruned event was stored again"
            row = ctl.execute(
                "SELECT d.events_total, q.high_seq, q.pruned_seq FROM devices d "
                "JOIN queues q ON q.device_pk = d.id WHERE d.device_id = 'dev-1'"
            ).fetchone()
            assert row == (5, 5, 3), "every event counted once; the pruned mark kept"

        # a later resend of everything is a duplicate, pruned or not
        r = call("POST", ev_url, report("dev-1", [1, 2, 3, 4, 5]), token=cred)
        assert (r.status, r.doc) == (200, {"ack": 5})
        d = call("GET", f"{svc.url}/v1/devices/dev-1?events=10", token=svc.admin_token).doc
        assert d["events_total"] == 5
        assert sorted(e["seq"] for e in d["timeline"]) == [4, 5]
