"""A per-worker cache of the dashboard's fleet-wide aggregates, dated by ``as_of``.

The fleet summary is cached in the database (ADR 0007); the few other aggregates whose cost
grows with the fleet (adoption of a model over time, devices by ring and tier, a release's
devices by ring and outcome, the devices whose last outcome failed) are kept here for
``max_age`` seconds (the service's ``summary_max_age_s``, 10 s by default), so a page that
an operator reloads costs the same at any fleet size, and each figure says when it was
counted.

Invariants: a value is served at most ``max_age`` after it was counted (never older); each
entry is counted in its own read transaction (exact as of ``as_of``); the cache is bounded
(``MAX_ENTRIES``, oldest dropped first) and holds only aggregates, never a secret or a
per-operator value, so sharing it between sessions reveals nothing a page would not show.
What changes at once (a rollout's state, a device's row, a revocation) is never read from here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")
MAX_ENTRIES = 256
_lock = threading.Lock()
_entries: dict[Hashable, tuple[float, Any]] = {}


def cached(key: Hashable, max_age: float, count: Callable[[], T]) -> tuple[T, float]:
    """``(value, as_of)``: the cached value if counted less than ``max_age`` ago, else
    ``count()`` now (stored)."""
    now = time.time()
    with _lock:
        hit = _entries.get(key)
    if hit is not None and now - hit[0] < max_age:
        return hit[1], hit[0]
    value = count()
    with _lock:
        _entries[key] = (now, value)
        while len(_entries) > MAX_ENTRIES:
            del _entries[min(_entries, key=lambda k: _entries[k][0])]
    return value, now


def clear() -> None:
    with _lock:
        _entries.clear()
