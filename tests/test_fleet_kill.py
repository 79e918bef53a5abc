"""SIGKILL of the whole fleet service (gunicorn master and workers) in the middle of a sustained
ingest, several times, on SQLite and PostgreSQL: after each restart every event that was
acknowledged is stored, and every event is stored exactly once, although devices resend the
batches whose ack they never got (at least once delivery, deduplicated by the service)."""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
import urllib3

from tests.fleet_fixtures import (  # noqa: F401 - fixtures used by name
    FleetService,
    call,
    fleet_backend,
    postgres,
    start_service,
    stop_service,
)

DEVICES = 4
BATCH = 10
KILLS = 3
ACKS_BEFORE_KILL = 15  # reports acknowledged during a run before the service is killed
DEADLINE_S = 120.0


@dataclass
class Dev:
    """One simulated device: the batch it is sending (resent until acked) and what was acked."""

    device_id: str
    credential: str
    next_seq: int = 1
    acked: set[int] = field(default_factory=set)


def body(d: Dev) -> dict[str, Any]:
    seqs = range(d.next_seq, d.next_seq + BATCH)
    return {
        "format": "edge-ota.report/1",
        "device": {
            "id": d.device_id,
            "ring": "ga",
            "tier": "default",
            "arch": "x86_64",
            "runtime_version": "1.31.1",
            "client_version": "0.1.0",
            "models": {"det": {"version": "1.0.0", "counter": 1}},
        },
        "queue": "q-kill",
        "dropped": 0,
        "events": [
            {
                "seq": s,
                "time": 1_700_000_000.0 + s,
                "kind": "checked",
                "model": "det",
                "version": "1.0.0",
                "data": {"i": s},
            }
            for s in seqs
        ],
    }


class Load:
    """A thread per device, posting its batch until acked, then the next one, until stopped."""

    def __init__(self, url: str, devs: list[Dev]) -> None:
        self.url = url
        self.devs = devs
        self.stop = threading.Event()
        self.acks = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(d,), daemon=True) for d in devs]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)
            assert not t.is_alive()

    def _run(self, d: Dev) -> None:
        while not self.stop.is_set():
            try:
                r = call(
                    "POST",
                    f"{self.url}/v1/devices/{d.device_id}/events",
                    body(d),
                    token=d.credential,
                )
            except urllib3.exceptions.HTTPError:
                time.sleep(0.01)  # the service is down: keep the batch, try again
                continue
            if r.status != 200:
                assert r.status in (429, 503), (r.status, r.doc)  # never a 500, never a 4xx
                time.sleep(0.01)
                continue
            ack = r.doc["ack"]
            assert ack == d.next_seq + BATCH - 1, r.doc
            d.acked.update(range(d.next_seq, ack + 1))
            d.next_seq = ack + 1
            with self.lock:
                self.acks += 1


def wait_for(cond: Any, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def stored(db_url: str) -> dict[str, list[int]]:
    """Every stored event's seq, per device (duplicates would show twice)."""
    from sqlalchemy import create_engine, select

    from ota.fleet._models import Device, Event

    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            out: dict[str, list[int]] = {}
            for device_id, seq in conn.execute(
                select(Device.device_id, Event.seq).join(Device, Device.id == Event.device_pk)
            ):
                out.setdefault(device_id, []).append(int(seq))
            return out
    finally:
        engine.dispose()


@pytest.mark.slow
def test_sigkill_during_ingest_loses_no_acknowledged_event(fleet_backend: str) -> None:
    db = fleet_backend
    args = ("--max-reports-per-minute", "100000")
    devs: list[Dev] = []
    for run in range(KILLS + 1):
        with start_service(db, *args) as svc:
            if not devs:
                devs = [Dev(f"kill-{i}", svc.enroll(f"kill-{i}")) for i in range(DEVICES)]
            before = sum(len(d.acked) for d in devs)
            with Load(svc.url, devs) as load:
                wait_for(lambda: load.acks >= ACKS_BEFORE_KILL, f"run {run}: too few acks")
                if run < KILLS:
                    stop_service(svc.proc, signal.SIGKILL)  # master and workers, mid-ingest
            assert sum(len(d.acked) for d in devs) > before
        got = stored(db)
        for d in devs:
            seqs = got.get(d.device_id, [])
            assert len(seqs) == len(set(seqs)), f"{d.device_id}: an event stored twice"
            missing = d.acked - set(seqs)
            assert not missing, f"run {run}: {d.device_id} lost acked events {sorted(missing)}"
            # nothing beyond what was sent, and sent batches are stored whole or not at all
            assert set(seqs) <= set(range(1, d.next_seq + BATCH))
            assert len(seqs) % BATCH == 0
