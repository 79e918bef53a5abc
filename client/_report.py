"""Forward the event queue to the fleet service: the "forward" half of store-and-forward.

Protocol (``edge-ota.report/1``, the contract the fleet service implements)::

    POST <report_url>/v1/devices/<device id, URL-quoted>/events
    Content-Type: application/json
    Authorization: Bearer <token>          (when the device has a token file)

    {"format": "edge-ota.report/1",
     "device": {"id", "ring", "tier", "arch", "runtime_version", "client_version",
                "models": {name: {"version", "counter"}}},
     "queue": <the queue's epoch: a random id, new whenever the queue file is recreated>,
     "dropped": <events lost to the queue bound since the last ack>,
     "events": [{"seq", "time", "kind", "model", "version", "data"}, ...]}   (oldest first)

    -> 200/202 {"ack": <highest seq stored>}

Events are delivered at least once (a lost reply means a resend; the fleet service dedupes by
``(device id, queue, seq)``); ``seq`` increases strictly within a queue epoch.

Invariants (the fleet service is trusted with diagnostics only, never with the device):

* nothing here can change what the device runs: a report failure never fails an update, and no
  reply is interpreted beyond its ``ack``;
* an ``ack`` is honoured only up to the highest ``seq`` this request carried; anything else
  (not JSON, not an integer, beyond what was sent, a body over ``MAX_REPLY_BYTES``) is a
  failed report and acks nothing;
* every request is bounded: ``MAX_BATCH`` events and ``MAX_BODY_BYTES`` per request,
  ``MAX_BATCHES`` requests and ``FLUSH_DEADLINE_S`` per flush (a dripped reply is cut), the
  fetch config's timeouts and bounded retries (5xx, 408, 429 and network errors, with jittered
  backoff); other 4xx are not retried;
* the state-dir lock is held only to read a batch and to ack it, never during a request, so a
  slow fleet service cannot delay ``ota device confirm`` (and expire a health window);
* a credential rotation left pending is finished before the token is read (best effort,
  under the fleet lock, never losing the working credential: ``_enroll``).
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.parse
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3

from ota.errors import ConfigError, OtaError

from ._events import Event, Snapshot
from ._fetch import FetchConfig, backoff_delay

REPORT_FORMAT = "edge-ota.report/1"
MAX_BATCH = 100
MAX_BATCHES = 20
MAX_BODY_BYTES = 512 * 1024
MAX_REPLY_BYTES = 16 * 1024
MAX_TOKEN_BYTES = 4096
FLUSH_DEADLINE_S = 20.0  # one flush, all batches and retries
_RETRY = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class ReportOutcome:
    """What one flush did. ``status``: disabled (no report URL), nothing (queue empty), sent
    (everything pending acknowledged), partial (some acknowledged), failed."""

    status: str
    sent: int = 0
    acked: int = 0
    pending: int = 0
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "sent": self.sent, "acked": self.acked,
                "pending": self.pending, "error": self.error}


class _ReportError(Exception):
    pass


def flush_events(dev: Any, fcfg: FetchConfig | None = None, *,
                 lock: Callable[[], AbstractContextManager[None]] | None = None,
                 pool: urllib3.PoolManager | None = None,
                 deadline_s: float = FLUSH_DEADLINE_S) -> ReportOutcome:
    """Send pending events of ``dev`` (an opened :class:`~ota.client._device.Device`) in
    batches until the queue is empty, a request fails, ``MAX_BATCHES`` were sent or
    ``deadline_s`` has passed.

    ``lock`` (the state directory's, with a short timeout) is held only to read a batch and
    to acknowledge it, never while talking to the fleet service: a slow or hostile service
    can delay reports, never the device's own transactions (``ota device confirm``).
    """
    url = dev.cfg.report_url
    if not url:
        return ReportOutcome("disabled", pending=len(dev.events.pending()))
    cfg = fcfg or FetchConfig()
    guard = lock or contextlib.nullcontext
    deadline = time.monotonic() + deadline_s
    own_pool = pool is None
    if pool is None:  # the device's TLS client certificate, when it has one
        from ._enroll import fleet_pool

        pool = fleet_pool(cfg)
    _finish_rotation(dev, cfg)
    headers = {"Content-Type": "application/json"}
    token = _token(dev.cfg.report_token_file)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    endpoint = f"{url}/v1/devices/{urllib.parse.quote(dev.cfg.device_id, safe='')}/events"
    sent = acked = 0
    try:
        for _ in range(MAX_BATCHES):
            with guard():
                batch = dev.events.snapshot(MAX_BATCH)
            if not batch.events and not batch.dropped:
                break
            body, carried = _body(dev, batch)
            try:
                ack = _post(pool, endpoint, body, headers, cfg, carried, deadline)
            except _ReportError as e:
                return _stopped(dev, sent, acked, str(e))
            sent += len(carried)
            if carried and ack < carried[0].seq:
                return _stopped(dev, sent, acked,
                                "the fleet service acknowledged none of the events sent")
            try:
                with guard():
                    removed = dev.events.ack(ack, dropped_reported=batch.dropped,
                                             epoch=batch.epoch)
            except OtaError as e:  # the lock is busy: the batch is sent again next time
                return _stopped(dev, sent, acked, f"not acknowledged locally: {e}")
            acked += removed
            if not removed and not carried:
                break  # only a drop count went out, and the queue changed meanwhile
    finally:
        if own_pool:
            pool.clear()
    left = len(dev.events.pending())
    status = "nothing" if sent == 0 and acked == 0 else ("sent" if left == 0 else "partial")
    return ReportOutcome(status, sent, acked, left)


def _finish_rotation(dev: Any, cfg: FetchConfig) -> None:
    """Finish a credential rotation left pending (``credential.next``) before the token is
    read, so the report carries the credential the service holds. Best effort: a failure
    leaves the working credential and the pending proposal in place for the next flush."""
    from ._enroll import finish_pending_rotation

    with contextlib.suppress(OtaError):
        finish_pending_rotation(dev.sd.root, dev.cfg.report_url, dev.cfg.device_id,
                                dev.cfg.report_token_file, cfg)


def _stopped(dev: Any, sent: int, acked: int, error: str) -> ReportOutcome:
    return ReportOutcome("partial" if acked else "failed", sent, acked,
                         len(dev.events.pending()), error)


def _token(path: str) -> str:
    if not path:
        return ""
    try:
        with Path(path).open("rb") as fh:
            raw = fh.read(MAX_TOKEN_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read the report token {path}: {e}") from e
    token = raw.decode("ascii", errors="replace").strip()
    if len(raw) > MAX_TOKEN_BYTES or not token or not token.isprintable() or " " in token:
        raise ConfigError(f"the report token in {path} is not one printable word")
    return token


def _body(dev: Any, batch: Snapshot) -> tuple[bytes, list[Event]]:
    """The request body, with as many of the batch's events as fit ``MAX_BODY_BYTES`` (at
    least the first one: an event too large on its own is sent as a stub)."""
    state = dev.sd.load_state()
    device = {
        "id": dev.cfg.device_id, "ring": dev.cfg.ring, "tier": dev.cfg.tier,
        "arch": dev.cfg.arch, "runtime_version": dev.cfg.runtime_version,
        "client_version": _client_version(),
        "models": _running(dev, state),
    }
    docs = [e.to_dict() for e in batch.events]

    def encode(events: list[dict[str, Any]]) -> bytes:
        return json.dumps({"format": REPORT_FORMAT, "device": device, "queue": batch.epoch,
                           "dropped": batch.dropped, "events": events},
                          sort_keys=True, default=str).encode()

    body = encode(docs)
    while len(body) > MAX_BODY_BYTES and len(docs) > 1:
        docs = docs[: max(1, len(docs) // 2)]
        body = encode(docs)
    if len(body) > MAX_BODY_BYTES:  # one huge event: send what it was, not its data
        docs = [{**docs[0], "data": {"truncated": True}}]
        body = encode(docs)
    return body, batch.events[: len(docs)]


def _running(dev: Any, state: Any) -> dict[str, dict[str, Any]]:
    """What the device runs: each model's current slot (after a revert that is the earlier
    release, not the highest one committed, which stays the downgrade floor), else what its
    committed state says."""
    from . import _slots

    out: dict[str, dict[str, Any]] = {}
    for name in sorted(set(dev.cfg.models) | set(state.models)):
        rel = None
        with contextlib.suppress(OtaError, OSError, ValueError):
            slot = _slots.current_slot(dev.mdir(name))
            rel = _slots.read_release(dev.mdir(name), slot) if slot else None
        if rel is not None:
            out[name] = {"version": rel.version, "counter": rel.counter}
        elif name in state.models:
            m = state.models[name]
            out[name] = {"version": m.version, "counter": m.counter}
    return out


def _client_version() -> str:
    from ._state import client_version

    return client_version()


def _post(pool: urllib3.PoolManager, endpoint: str, body: bytes, headers: dict[str, str],
          cfg: FetchConfig, carried: list[Event], deadline: float) -> int:
    """POST one batch; return the acknowledged seq (0 when the batch carried no event)."""
    attempt = 0
    while True:
        attempt += 1
        left = deadline - time.monotonic()
        if left <= 0:
            raise _ReportError("the fleet service did not answer in time")
        timeout = urllib3.Timeout(connect=min(cfg.connect_timeout, left),
                                  read=min(cfg.read_timeout, left))
        try:
            resp = pool.request("POST", endpoint, body=body, headers=headers,
                                preload_content=False, redirect=False, timeout=timeout)
            try:
                reply = _read_reply(resp, deadline)
            finally:
                resp.release_conn()
        except urllib3.exceptions.HTTPError as e:
            if attempt > cfg.retries:
                raise _ReportError(f"cannot reach the fleet service: {e}") from e
            time.sleep(min(backoff_delay(cfg, attempt), max(0.0, deadline - time.monotonic())))
            continue
        if resp.status in _RETRY and attempt <= cfg.retries:
            time.sleep(min(backoff_delay(cfg, attempt), max(0.0, deadline - time.monotonic())))
            continue
        if resp.status == 401:  # revoked, or a rotation cut short: never fatal to updates
            raise _ReportError("the fleet service refused the device's credential (HTTP 401); "
                               "`ota device rotate-credential` finishes an interrupted "
                               "rotation, else re-enrol")
        if resp.status not in (200, 202):
            raise _ReportError(f"the fleet service answered HTTP {resp.status}")
        return _ack(reply, carried)


def _read_reply(resp: Any, deadline: float) -> bytes:
    """At most ``MAX_REPLY_BYTES + 1`` bytes, and no read past ``deadline`` (a reply dripped
    a byte at a time is cut, not waited for)."""
    reply = bytearray()
    while len(reply) <= MAX_REPLY_BYTES:
        if time.monotonic() > deadline:
            raise _ReportError("the fleet service's reply is too slow")
        piece = resp.read1(MAX_REPLY_BYTES + 1 - len(reply))
        if not piece:
            break
        reply += piece
    return bytes(reply)


def _ack(reply: bytes, carried: list[Event]) -> int:
    if len(reply) > MAX_REPLY_BYTES:
        raise _ReportError("the fleet service's reply is too large")
    try:
        doc = json.loads(reply)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError too; deep nesting
        raise _ReportError("the fleet service's reply is not JSON") from e
    ack = doc.get("ack") if isinstance(doc, dict) else None
    if not isinstance(ack, int) or isinstance(ack, bool) or ack < 0:
        raise _ReportError(f"the fleet service's ack is not a sequence number: {ack!r:.40}")
    highest = max((e.seq for e in carried), default=0)
    if ack > highest:
        raise _ReportError(f"the fleet service acked {ack}, beyond the {highest} sent")
    return ack
