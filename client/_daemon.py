"""The polling daemon: one update cycle per interval, jittered, with bounded backoff.

Invariants: consecutive failed cycles back off exponentially (capped at ``max_backoff_s``),
with jitter so a fleet does not poll in lockstep; after ``max_failures`` consecutive failures
the daemon waits a full ``max_backoff_s`` and keeps going - it never spins, and a single
cycle never loops on its own (each resume is bounded by the journal's attempt counter).
SIGTERM and SIGINT stop it cleanly between cycles; a cycle in progress is finished or, if the
process is killed, recovered by the next start.
"""

from __future__ import annotations

import random
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from ota.errors import ExitCode

from ._updater import UpdateResult, update_once

_RETRY_STATUSES = frozenset({"transient", "conflict", "local_error"})


@dataclass(frozen=True)
class DaemonConfig:
    interval_s: float = 300.0
    jitter: float = 0.2  # fraction of the interval, both ways
    backoff_s: float = 10.0
    max_backoff_s: float = 3600.0
    max_cycles: int | None = None  # for tests and one-shot runs


def next_delay(cfg: DaemonConfig, failures: int, rng: random.Random) -> float:
    """Seconds until the next cycle after ``failures`` consecutive failures (0: success)."""
    if failures == 0:
        base = cfg.interval_s
    else:
        base = min(cfg.max_backoff_s, cfg.backoff_s * 2 ** (failures - 1))
    return max(0.0, base * (1 + rng.uniform(-cfg.jitter, cfg.jitter)))


def run_daemon(state_dir: Path | str, cfg: DaemonConfig | None = None, *,
               stop: threading.Event | None = None,
               on_result: Callable[[UpdateResult], None] | None = None,
               install_signals: bool = True, **update_kw: Any) -> int:
    """Poll until stopped. Returns the number of cycles run.

    ``update_kw`` is passed to :func:`update_once` (verifier, smoke, fetch_config...).
    Errors that are not outcomes (a held lock, a bad config) count as failed cycles.
    """
    cfg = cfg or DaemonConfig()
    stop = stop or threading.Event()
    rng = random.Random()  # noqa: S311 - jitter only
    if install_signals and threading.current_thread() is threading.main_thread():
        def _handler(signum: int, frame: FrameType | None) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, _handler)
        signal.signal(signal.SIGINT, _handler)
    failures = 0
    cycles = 0
    while not stop.is_set():
        try:
            result = update_once(state_dir, **update_kw)
            if on_result:
                on_result(result)
            failed = result.status in _RETRY_STATUSES or result.exit_code == ExitCode.SECURITY
        except Exception:
            failed = True
        cycles += 1
        failures = failures + 1 if failed else 0
        if cfg.max_cycles is not None and cycles >= cfg.max_cycles:
            break
        stop.wait(next_delay(cfg, failures, rng))
    return cycles
