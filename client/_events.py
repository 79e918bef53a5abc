"""Bounded, on-disk, store-and-forward queue of update events.

Every transition of an update (downloaded, staged, smoke passed or failed, committed,
confirmed, reverted, security refusal) becomes one :class:`Event`. Events wait here until a
reporter acknowledges them (:meth:`EventQueue.ack`); with no fleet service configured they simply
accumulate up to the bound.

Invariants: the queue file is rewritten atomically (``ota._atomic``), so a crash loses at most
the event being appended; it never holds more than ``max_events`` events; when full, the
oldest events are dropped and ``dropped`` counts them (reported with the next batch, so the
server knows it missed some). Sequence numbers increase strictly, across drops and acks.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ota._atomic import write_bytes

QUEUE_FORMAT = "edge-ota.events/1"
_UNSET_EPOCH = "0"  # queues written before epochs existed
MAX_EVENT_DATA_BYTES = 16 * 1024  # per event; with max_events=512 the file stays under 9 MB
KINDS = frozenset({
    "checked", "downloaded", "staged", "smoke_passed", "smoke_failed", "committed",
    "confirmed", "reverted", "security", "refused", "failed", "resumed",
    "failure_forgotten",  # an operator cleared a failed release (ota device forget-failure)
})


@dataclass(frozen=True)
class Event:
    seq: int
    time: float
    kind: str
    model: str = ""
    version: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "time": self.time, "kind": self.kind, "model": self.model,
                "version": self.version, "data": dict(self.data)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Event:
        return cls(int(d["seq"]), float(d["time"]), str(d["kind"]), str(d["model"]),
                   str(d["version"]), dict(d["data"]))


@dataclass(frozen=True)
class Snapshot:
    """What a reporter reads under the lock: a batch, the drop count, and the queue's epoch
    (a random id chosen when the queue file is created, so that sequence numbers that restart
    after a lost or corrupt queue are never mistaken for ones already delivered)."""

    events: list[Event]
    dropped: int
    epoch: str


class EventQueue:
    """The event queue of one state directory. Single writer (the updater's lock)."""

    def __init__(self, path: Path, *, max_events: int = 512,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.max_events = max_events
        self._clock = clock

    def _load(self) -> tuple[list[Event], int, int, str]:
        try:
            doc = json.loads(self.path.read_bytes())
            events = [Event.from_dict(e) for e in doc["events"]]
            epoch = doc.get("epoch") or _UNSET_EPOCH  # queues written before epochs
            return events, int(doc["next_seq"]), int(doc["dropped"]), str(epoch)[:64]
        except FileNotFoundError:
            return [], 1, 0, secrets.token_hex(8)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            # A queue is diagnostics, not state: start over (a new epoch), but say so.
            return [], 1, 1, secrets.token_hex(8)

    def _store(self, events: list[Event], next_seq: int, dropped: int, epoch: str) -> None:
        doc = {"format": QUEUE_FORMAT, "next_seq": next_seq, "dropped": dropped,
               "epoch": epoch, "events": [e.to_dict() for e in events]}
        write_bytes(self.path, json.dumps(doc, sort_keys=True).encode())

    def append(self, kind: str, model: str = "", version: str = "",
               **data: Any) -> Event:
        """Persist one event, dropping the oldest if full.

        Raises:
            ValueError: unknown event kind.
            LocalError: the queue file cannot be written.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        events, next_seq, dropped, epoch = self._load()
        ev = Event(next_seq, self._clock(), kind, model, version, _jsonable(data))
        events.append(ev)
        overflow = len(events) - self.max_events
        if overflow > 0:
            events = events[overflow:]
            dropped += overflow
        self._store(events, next_seq + 1, dropped, epoch)
        return ev

    def pending(self, limit: int | None = None) -> list[Event]:
        """Events not yet acknowledged, oldest first."""
        events = self._load()[0]
        return events if limit is None else events[:limit]

    def snapshot(self, limit: int) -> Snapshot:
        """The oldest ``limit`` events, the drop count and the epoch, read at once."""
        events, _, dropped, epoch = self._load()
        return Snapshot(events[:limit], dropped, epoch)

    @property
    def dropped(self) -> int:
        """How many events were dropped (queue full or unreadable) since the last ack."""
        return self._load()[2]

    def ack(self, up_to_seq: int, *, dropped_reported: int | None = None,
            epoch: str | None = None) -> int:
        """Forget events with ``seq <= up_to_seq`` and take ``dropped_reported`` off the drop
        counter (all of it when None). With ``epoch``, nothing happens unless the queue is
        still the one that was read (it was not lost and recreated meanwhile). Returns how
        many events were removed."""
        events, next_seq, dropped, current = self._load()
        if epoch is not None and epoch != current:
            return 0
        keep = [e for e in events if e.seq > up_to_seq]
        left = 0 if dropped_reported is None else max(0, dropped - dropped_reported)
        if len(keep) != len(events) or left != dropped:
            self._store(keep, next_seq, left, current)
        return len(events) - len(keep)


def _jsonable(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` as plain JSON, cut to ``MAX_EVENT_DATA_BYTES`` (an error message may quote
    remote data: the queue is bounded in bytes as well as in events)."""
    text = json.dumps(dict(data), default=str, sort_keys=True)
    if len(text) > MAX_EVENT_DATA_BYTES:
        return {"truncated": True, "head": text[: MAX_EVENT_DATA_BYTES // 2]}
    out = json.loads(text)
    assert isinstance(out, dict)
    return out
