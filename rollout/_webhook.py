"""Webhook notifications of rollout verdicts (issue 9): HMAC-SHA256-signed JSON, delivered
at least once from a database outbox.

The controller enqueues each new verdict's notification (:class:`WebhookHook`, through
:func:`enqueue_verdict_doc`) in the transaction that records the verdict, so a verdict and its
notification commit together or not at all; :func:`notify_verdict` does the same for other
callers. A
deliverer (any service instance, any number at once) calls :func:`deliver_due`: it claims due
rows in a short transaction (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite serialises
writers), posts each one with a timeout and no database lock held, then records the outcome.

Wire format (what a receiver checks, :func:`verify` does it):

* ``POST <url>``, ``Content-Type: application/json``, body at most ``MAX_BODY_BYTES``;
* ``X-OTA-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>`` — the
  timestamp is signed with the body, so a receiver refuses a replay older than its tolerance
  (default 300 s) and dedupes within it by ``X-OTA-Delivery`` (the outbox id, stable across
  retries) — the body also carries it as ``delivery``.

Invariants:

* the secret comes from the configuration or ``OTA_WEBHOOK_SECRET`` (at least 32 characters,
  else :class:`ConfigError`); it is never logged, never in a ``repr``, never in an error
  stored in the outbox;
* a notification is never lost: a failed attempt is retried with exponential backoff
  (``backoff_s * 2**(attempts-1)``, at most ``max_backoff_s``) up to ``max_attempts``; then it
  is ``dead``, kept, and :func:`requeue_dead` puts it back;
* a receiver that is down or hangs costs one ``timeout_s`` per :func:`deliver_due` call (the
  rest of the batch is retried later without being sent) and blocks neither the verdict
  (enqueued, not sent, in its transaction) nor other notifications;
* a claimed row carries a lease (``next_at`` pushed past the attempt's timeout), so a
  deliverer that dies mid-attempt leaves the row to be retried, never stuck.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from ota.errors import ConfigError, SecurityError
from ota.fleet._models import WebhookOutbox

from ._verdict import Action, GateResult

URL_ENV = "OTA_WEBHOOK_URL"
SECRET_ENV = "OTA_WEBHOOK_SECRET"  # noqa: S105 (the name of a variable)
SIGNATURE_HEADER = "X-OTA-Signature"
DELIVERY_HEADER = "X-OTA-Delivery"
EVENT_HEADER = "X-OTA-Event"
MAX_BODY_BYTES = 64 * 1024
MIN_SECRET_CHARS = 32
DEFAULT_TOLERANCE_S = 300.0

log = logging.getLogger("ota.rollout")


@dataclass(frozen=True)
class WebhookConfig:
    """Where and how notifications go. ``secret`` is excluded from ``repr``."""

    url: str
    secret: str = field(repr=False)
    timeout_s: float = 5.0
    max_attempts: int = 10
    backoff_s: float = 5.0
    max_backoff_s: float = 900.0
    batch: int = 50

    def __post_init__(self) -> None:
        u = urlsplit(self.url)
        if u.scheme not in ("http", "https") or not u.hostname or u.username or u.password:
            raise ConfigError("webhook URL must be http(s)://host/... without credentials")
        if len(self.secret) < MIN_SECRET_CHARS:
            raise ConfigError(
                f"webhook secret must be at least {MIN_SECRET_CHARS} characters",
                remedy=f"set {SECRET_ENV} to a long random string",
            )
        if not (
            0.1 <= self.timeout_s <= 60
            and 1 <= self.max_attempts <= 100
            and 0 < self.backoff_s <= self.max_backoff_s <= 86400
            and 1 <= self.batch <= 1000
        ):
            raise ConfigError("webhook timeout, attempts, backoff or batch out of range")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **kw: Any) -> WebhookConfig | None:
        """From ``OTA_WEBHOOK_URL`` and ``OTA_WEBHOOK_SECRET``; None when no URL is set. A URL
        without a (long enough) secret is a :class:`ConfigError`: never send unsigned."""
        env = os.environ if env is None else env
        url = env.get(URL_ENV, "").strip()
        if not url:
            return None
        return cls(url, env.get(SECRET_ENV, ""), **kw)


# -- signatures -------------------------------------------------------------------------------


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``X-OTA-Signature`` value of ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(
    secret: str, body: bytes, header: str, now: float, tolerance_s: float = DEFAULT_TOLERANCE_S
) -> int:
    """Check a received notification (for receivers and tests); return its timestamp.

    Raises:
        SecurityError: malformed header, wrong signature, or a timestamp outside
            ``now ± tolerance_s`` (a replay).
    """
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        ts = int(parts["t"])
        given = parts["v1"]
    except (KeyError, ValueError) as e:
        raise SecurityError("webhook signature header is malformed") from e
    want = sign(secret, body, ts).split("v1=", 1)[1]
    if not hmac.compare_digest(given.encode(), want.encode()):
        raise SecurityError("webhook signature does not match")
    if abs(now - ts) > tolerance_s:
        raise SecurityError(f"webhook timestamp {ts} is outside ±{tolerance_s:g} s: a replay?")
    return ts


# -- the outbox -------------------------------------------------------------------------------


def _bounded(payload: Mapping[str, Any]) -> str:
    """``payload`` as JSON within ``MAX_BODY_BYTES`` (minus room for the delivery id): gate
    evidence is dropped first, then the gates, marking ``truncated``."""
    limit = MAX_BODY_BYTES - 64
    body = json.dumps(payload, sort_keys=True, allow_nan=False, separators=(",", ":"))
    if len(body) <= limit:
        return body
    slim = dict(payload)
    if isinstance(slim.get("gates"), list):
        slim["gates"] = [
            {k: v for k, v in g.items() if k != "evidence"}
            for g in slim["gates"]
            if isinstance(g, dict)
        ]
    slim["truncated"] = True
    body = json.dumps(slim, sort_keys=True, allow_nan=False, separators=(",", ":"))
    if len(body) <= limit:
        return body
    keep = {k: v for k, v in slim.items() if isinstance(v, str | int | float | bool) or v is None}
    keep = {k: (v[:512] if isinstance(v, str) else v) for k, v in keep.items()}
    keep["gates_omitted"] = len(payload.get("gates", []) or [])
    return json.dumps(keep, sort_keys=True, allow_nan=False, separators=(",", ":"))[:limit]


def enqueue(
    session: Session, event: str, payload: Mapping[str, Any], now: float | None = None
) -> int:
    """Add a notification to the outbox in the caller's transaction; its id.

    Raises:
        ValueError: the payload is not plain JSON (NaN, non-JSON types).
    """
    now = time.time() if now is None else now
    body = _bounded(payload)  # checked before anything is written
    row = WebhookOutbox(
        created_at=now,
        event=event[:64],
        body="{}",
        state="pending",
        attempts=0,
        next_at=now,
        last_error="",
    )
    session.add(row)
    session.flush()
    row.body = _bounded({**payload, "delivery": int(row.id)}) if body else body
    session.flush()
    return int(row.id)


def notify_verdict(
    session: Session,
    *,
    model: str,
    version: str,
    stage: int | str,
    action: Action,
    results: Sequence[GateResult],
    reason: str = "",
    now: float | None = None,
) -> int:
    """Enqueue the ``rollout.verdict`` notification of one evaluation (every verdict:
    promote, hold, pause, rollback), with each gate's result and evidence."""
    now = time.time() if now is None else now
    return enqueue(
        session,
        "rollout.verdict",
        {
            "event": "rollout.verdict",
            "model": model,
            "version": version,
            "stage": stage,
            "action": action.value,
            "reason": reason,
            "at": now,
            "gates": [r.to_json() for r in results],
        },
        now,
    )


def enqueue_verdict_doc(session: Session, doc: Mapping[str, Any], now: float | None = None) -> int:
    """Enqueue the controller's verdict JSON (``rollout.verdict``) as it is, in the caller's
    transaction: call it inside the transaction that stores the verdict."""
    return enqueue(session, "rollout.verdict", {"event": "rollout.verdict", **doc}, now)


class WebhookHook:
    """The controller's webhook hook: the notification is enqueued in the verdict's own
    transaction (:meth:`in_transaction`), so the verdict row and its outbox row commit
    together or not at all, and delivered after the commit (:meth:`deliver`, also called at
    the end of every controller tick, so what a crashed controller left queued is sent by the
    next one). Calling it (``hook(doc)``) enqueues in a transaction of its own and delivers:
    for callers outside a verdict's transaction."""

    def __init__(self, engine: Engine, cfg: WebhookConfig) -> None:
        self.engine = engine
        self.cfg = cfg

    def __repr__(self) -> str:
        return f"WebhookHook({urlsplit(self.cfg.url).hostname!r})"  # never the secret

    def in_transaction(self, session: Session, doc: dict[str, Any]) -> None:
        enqueue_verdict_doc(session, doc)

    def deliver(self) -> None:
        deliver_due(self.engine, self.cfg)

    def __call__(self, doc: dict[str, Any]) -> None:
        with Session(self.engine) as s, s.begin():
            enqueue_verdict_doc(s, doc)
        self.deliver()


def hooks_from_env(
    env: Mapping[str, str] | None = None, engine: Engine | None = None
) -> list[Callable[[dict[str, Any]], None]]:
    """What ``ota.rollout._plugins.verdict_hooks`` loads: with ``OTA_WEBHOOK_URL`` set, one
    :class:`WebhookHook` on the fleet database (``engine``, else one on ``OTA_FLEET_DB``, kept
    for the process); none without a URL. A URL without a valid secret raises
    :class:`ConfigError` here, at start-up (never send unsigned). The controller enqueues
    through it in the verdict's transaction (a crash loses neither or both)."""
    cfg = WebhookConfig.from_env(env)
    if cfg is None:
        return []
    if engine is None:
        from ota.fleet._config import FleetConfig, default_db_url
        from ota.fleet._db import make_engine

        engine = make_engine(FleetConfig(db_url=default_db_url()))
    return [WebhookHook(engine, cfg)]


@dataclass
class Delivered:
    """What one :func:`deliver_due` call did."""

    delivered: list[int] = field(default_factory=list)
    retrying: list[int] = field(default_factory=list)
    dead: list[int] = field(default_factory=list)


def _claim(engine: Engine, cfg: WebhookConfig, now: float) -> list[tuple[int, str, str, int]]:
    lease = now + 2 * cfg.timeout_s + 30
    with Session(engine) as s, s.begin():
        q = (
            select(WebhookOutbox)
            .where(WebhookOutbox.state == "pending", WebhookOutbox.next_at <= now)
            .order_by(WebhookOutbox.next_at, WebhookOutbox.id)
            .limit(cfg.batch)
            .with_for_update(skip_locked=True)
        )
        rows = list(s.scalars(q))
        for r in rows:
            r.attempts += 1
            r.next_at = lease
        return [(int(r.id), r.event, r.body, r.attempts) for r in rows]


def _post(pool: Any, cfg: WebhookConfig, rid: int, event: str, body: str, now: float) -> str:
    """One attempt; ``""`` on a 2xx, else a short error (never the secret)."""
    import urllib3

    data = body.encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "edge-ota-webhook/1",
        SIGNATURE_HEADER: sign(cfg.secret, data, int(now)),
        DELIVERY_HEADER: str(rid),
        EVENT_HEADER: event,
    }
    try:
        r = pool.request(
            "POST",
            cfg.url,
            body=data,
            headers=headers,
            redirect=False,
            retries=False,
            preload_content=False,
            timeout=urllib3.Timeout(connect=cfg.timeout_s, read=cfg.timeout_s),
        )
        try:
            r.read(1024, decode_content=False)
        finally:
            r.release_conn()
    except urllib3.exceptions.HTTPError as e:
        return f"{type(e).__name__}"[:300]
    if 200 <= r.status < 300:
        return ""
    return f"HTTP {r.status}"


def deliver_due(
    engine: Engine, cfg: WebhookConfig, now: float | None = None, pool: Any = None
) -> Delivered:
    """Send the notifications due at ``now`` (at most ``cfg.batch``), record each outcome.
    Never raises for a receiver's failure; each attempt is bounded by ``cfg.timeout_s``."""
    import urllib3

    now = time.time() if now is None else now
    pool = pool or urllib3.PoolManager(num_pools=4, maxsize=2)
    out = Delivered()
    unreachable = ""
    for rid, event, body, attempts in _claim(engine, cfg, now):
        # a receiver that did not answer (refused, timed out) is not tried again in this call:
        # the rest of the batch is retried later with the same error, so a call costs at
        # most one timeout however many notifications wait
        err = unreachable or _post(pool, cfg, rid, event, body, now)
        if err and not err.startswith("HTTP "):
            unreachable = err
        with Session(engine) as s, s.begin():
            if not err:
                s.execute(
                    update(WebhookOutbox)
                    .where(WebhookOutbox.id == rid)
                    .values(state="delivered", delivered_at=time.time(), last_error="")
                )
                out.delivered.append(rid)
                continue
            dead = attempts >= cfg.max_attempts
            wait = min(cfg.max_backoff_s, cfg.backoff_s * 2 ** (attempts - 1))
            s.execute(
                update(WebhookOutbox)
                .where(WebhookOutbox.id == rid)
                .values(state="dead" if dead else "pending", next_at=now + wait, last_error=err)
            )
            (out.dead if dead else out.retrying).append(rid)
            log.warning(
                "webhook %s (attempt %d) to %s failed: %s%s",
                rid,
                attempts,
                urlsplit(cfg.url).hostname,
                err,
                "; giving up" if dead else "",
            )
    return out


def requeue_dead(session: Session, now: float | None = None) -> int:
    """Put every ``dead`` notification back in the queue (attempts reset); how many."""
    now = time.time() if now is None else now
    res = session.execute(
        update(WebhookOutbox)
        .where(WebhookOutbox.state == "dead")
        .values(state="pending", attempts=0, next_at=now)
    )
    return int(getattr(res, "rowcount", 0) or 0)
