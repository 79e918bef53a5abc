"""Webhook notifications of rollout verdicts (issue 9): a real HTTP receiver on 127.0.0.1 that
checks the HMAC signature itself, the outbox on SQLite and PostgreSQL, retries with backoff,
a receiver that is down or hangs, replay and tampering refused, bounded payloads, and a secret
that never shows up in logs, reprs or stored errors."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from ota.errors import ConfigError, SecurityError
from ota.fleet._models import WebhookOutbox
from ota.rollout._verdict import Action, GateResult, GateStatus
from ota.rollout._webhook import (
    DELIVERY_HEADER,
    MAX_BODY_BYTES,
    SIGNATURE_HEADER,
    WebhookConfig,
    deliver_due,
    notify_verdict,
    requeue_dead,
    sign,
    verify,
)
from tests.fleet_fixtures import fleet_backend, free_port, postgres  # noqa: F401


@pytest.fixture
def db(fleet_backend: str) -> str:  # noqa: F811
    """A fresh migrated database URL, SQLite and PostgreSQL."""
    return fleet_backend


SECRET = "s3cr3t-" + "x" * 40
T = 1_800_000_000.0


@dataclass
class Receiver:
    """A webhook receiver: checks each signature with its own HMAC, answers ``status``."""

    url: str = ""
    status: int = 200
    hang: threading.Event | None = None
    got: list[tuple[dict[str, str], bytes, bool]] = field(default_factory=list)
    arrived: int = 0


@contextlib.contextmanager
def receiver(port: int = 0) -> Iterator[Receiver]:
    rec = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            rec.arrived += 1
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if rec.hang is not None:
                rec.hang.wait(30)
            parts = dict(p.split("=", 1) for p in self.headers[SIGNATURE_HEADER].split(","))
            want = hmac.new(SECRET.encode(), parts["t"].encode() + b"." + body, hashlib.sha256)
            ok = hmac.compare_digest(want.hexdigest(), parts["v1"])
            rec.got.append(({k.lower(): v for k, v in self.headers.items()}, body, ok))
            self.send_response(rec.status if ok else 401)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    srv.daemon_threads = True
    rec.url = f"http://127.0.0.1:{srv.server_address[1]}/hook"
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield rec
    finally:
        if rec.hang is not None:
            rec.hang.set()
        srv.shutdown()
        srv.server_close()
        t.join(10)


def results() -> list[GateResult]:
    return [
        GateResult("health.latency_p95", GateStatus.FAIL, "p95 ratio 1.31 beyond 1.2", 1.31,
                   1.2, 1.0, 0.999, "b", {"devices_beyond": 8}),
        GateResult("health.error_rate", GateStatus.PASS, "ok", 0.001, 0.011, 0.001, 0.99, "b"),
    ]  # fmt: skip


def outbox(url: str) -> list[WebhookOutbox]:
    engine = create_engine(url)
    try:
        with Session(engine) as s:
            rows = list(s.scalars(select(WebhookOutbox).order_by(WebhookOutbox.id)))
            s.expunge_all()
            return rows
    finally:
        engine.dispose()


def enqueue_verdict(url: str, *, commit: bool = True, **kw: Any) -> int:
    engine = create_engine(url)
    try:
        with Session(engine) as s:
            s.begin()
            rid = notify_verdict(s, model="det", version="1.1.0", stage=1,
                                 action=Action.ROLLBACK, results=kw.pop("res", results()),
                                 reason="latency", now=T, **kw)  # fmt: skip
            if commit:
                s.commit()
            else:
                s.rollback()
            return rid
    finally:
        engine.dispose()


def deliver(url: str, cfg: WebhookConfig, now: float) -> Any:
    engine = create_engine(url)
    try:
        return deliver_due(engine, cfg, now)
    finally:
        engine.dispose()


def test_a_verdict_is_delivered_signed_and_the_receiver_checks_it(db: str) -> None:
    rid = enqueue_verdict(db)
    with receiver() as rec:
        cfg = WebhookConfig(rec.url, SECRET)
        out = deliver(db, cfg, T + 1)
        assert out.delivered == [rid]
        [(headers, body, ok)] = rec.got
        assert ok
        doc = json.loads(body)
        assert doc["action"] == "rollback" and doc["delivery"] == rid
        assert doc["gates"][0]["evidence"] == {"devices_beyond": 8}
        assert headers[DELIVERY_HEADER.lower()] == str(rid)
        # what a receiver does: signature, and a timestamp within its tolerance
        assert verify(SECRET, body, headers[SIGNATURE_HEADER.lower()], T + 30) == int(T + 1)
        # nothing is sent twice
        assert deliver(db, cfg, T + 9999).delivered == []
    [row] = outbox(db)
    assert row.state == "delivered" and row.attempts == 1


def test_the_notification_commits_with_the_verdict_or_not_at_all(db: str) -> None:
    enqueue_verdict(db, commit=False)
    assert outbox(db) == []
    enqueue_verdict(db)
    assert [r.state for r in outbox(db)] == ["pending"]


def test_replay_tampering_and_a_wrong_secret_are_refused() -> None:
    body = b'{"action":"promote"}'
    header = sign(SECRET, body, int(T))
    assert verify(SECRET, body, header, T) == int(T)
    with pytest.raises(SecurityError, match="outside"):
        verify(SECRET, body, header, T + 301)  # an old notification sent again
    with pytest.raises(SecurityError, match="does not match"):
        verify(SECRET, b'{"action":"rollback"}', header, T)
    with pytest.raises(SecurityError, match="does not match"):
        verify("another-secret-" + "y" * 40, body, header, T)
    forged_time = header.replace(f"t={int(T)}", f"t={int(T) + 600}")
    with pytest.raises(SecurityError, match="does not match"):
        verify(SECRET, body, forged_time, T + 600)
    with pytest.raises(SecurityError, match="malformed"):
        verify(SECRET, body, "v1=abc", T)


def test_a_receiver_that_is_down_delays_nothing_and_loses_nothing(
    db: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    first = enqueue_verdict(db)
    second = enqueue_verdict(db)
    port = free_port()  # nothing listens there yet
    cfg = WebhookConfig(f"http://127.0.0.1:{port}/hook", SECRET, timeout_s=1, backoff_s=10)
    t0 = time.monotonic()
    out = deliver(db, cfg, T)
    assert time.monotonic() - t0 < 20  # bounded by the timeout, not by the receiver
    assert out.retrying == [first, second] and out.delivered == []
    rows = outbox(db)
    assert [(r.state, r.attempts, r.next_at) for r in rows] == [("pending", 1, T + 10)] * 2
    # not due yet: nothing is attempted
    assert deliver(db, cfg, T + 5).retrying == []
    with receiver(port) as rec:
        out = deliver(db, cfg, T + 10)
        assert out.delivered == [first, second]
        assert [json.loads(b)["delivery"] for _, b, ok in rec.got if ok] == [first, second]
    assert SECRET not in caplog.text
    assert all(SECRET not in r.last_error for r in outbox(db))


def test_a_hanging_receiver_costs_one_timeout_per_call(db: str) -> None:
    rids = [enqueue_verdict(db) for _ in range(3)]
    with receiver() as rec:
        rec.hang = threading.Event()
        cfg = WebhookConfig(rec.url, SECRET, timeout_s=0.5)
        t0 = time.monotonic()
        out = deliver(db, cfg, T)
        assert time.monotonic() - t0 < 20
        assert out.retrying == rids
        assert rec.arrived <= 1  # the other two were not sent to a receiver that hangs
        assert {r.last_error for r in outbox(db)} == {"ReadTimeoutError"}
        assert {r.state for r in outbox(db)} == {"pending"}


def test_failures_back_off_then_go_dead_and_can_be_requeued(db: str) -> None:
    rid = enqueue_verdict(db)
    with receiver() as rec:
        rec.status = 500
        cfg = WebhookConfig(rec.url, SECRET, max_attempts=3, backoff_s=2)
        now = T
        waits = []
        for _ in range(3):
            out = deliver(db, cfg, now)
            row = outbox(db)[0]
            waits.append(row.next_at - now)
            now = row.next_at
        assert out.dead == [rid] and row.state == "dead" and row.last_error == "HTTP 500"
        assert waits == [2, 4, 8]
        assert deliver(db, cfg, now + 10**6).dead == []  # dead stays dead
        engine = create_engine(db)
        try:
            with Session(engine) as s, s.begin():
                assert requeue_dead(s, now) == 1
        finally:
            engine.dispose()
        rec.status = 204
        assert deliver(db, cfg, now).delivered == [rid]
        assert len(rec.got) == 4


def test_a_huge_verdict_is_bounded_and_still_valid(db: str) -> None:
    big = [GateResult("health.drift", GateStatus.HOLD, "x" * 500, tier=f"t{i}",
                      evidence={"blob": "y" * 2000}) for i in range(100)]  # fmt: skip
    enqueue_verdict(db, res=big)
    [row] = outbox(db)
    assert len(row.body) <= MAX_BODY_BYTES
    doc = json.loads(row.body)
    assert doc["truncated"] is True and doc["action"] == "rollback"
    assert "delivery" in doc


def test_the_secret_is_required_and_never_shown() -> None:
    with pytest.raises(ConfigError):
        WebhookConfig("http://127.0.0.1/hook", "short")
    with pytest.raises(ConfigError):
        WebhookConfig("ftp://127.0.0.1/hook", SECRET)
    with pytest.raises(ConfigError):
        WebhookConfig("http://user:pw@127.0.0.1/hook", SECRET)
    with pytest.raises(ConfigError):
        WebhookConfig.from_env({"OTA_WEBHOOK_URL": "http://127.0.0.1/hook"})
    assert WebhookConfig.from_env({}) is None
    cfg = WebhookConfig.from_env(
        {"OTA_WEBHOOK_URL": "http://127.0.0.1/hook", "OTA_WEBHOOK_SECRET": SECRET}
    )
    assert cfg is not None and cfg.secret == SECRET
    assert SECRET not in repr(cfg) and SECRET not in str(cfg)


def test_the_controller_hook_enqueues_and_delivers(db: str) -> None:
    from ota.rollout._webhook import hooks_from_env

    assert hooks_from_env({}) == []
    engine = create_engine(db)
    try:
        with receiver() as rec:
            env = {"OTA_WEBHOOK_URL": rec.url, "OTA_WEBHOOK_SECRET": SECRET}
            [hook] = hooks_from_env(env, engine)
            hook({"model": "det", "version": "1.1.0", "action": "promote", "gates": []})
            [(_, body, ok)] = rec.got
            assert ok and json.loads(body)["action"] == "promote"
    finally:
        engine.dispose()
    assert [r.state for r in outbox(db)] == ["delivered"]
