"""Download progress of ``ota device update`` on a terminal (stderr, one rewritten line).

Shown only when stderr is a TTY and the output is not ``--json``: scripts, systemd and pipes
get no control characters. Progress is display only; it decides nothing.
"""

from __future__ import annotations

import time
from typing import TextIO

_MIB = 1024 * 1024


class TtyProgress:
    """Callable as the updater's ``progress`` hook: rewrites one stderr line at most
    ``rate_hz`` times a second, and always at 100%."""

    def __init__(self, out: TextIO, *, rate_hz: float = 5.0) -> None:
        self._out = out
        self._every = 1.0 / rate_hz
        self._last = 0.0
        self._shown = False

    def __call__(self, model: str, version: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < self._every:
            return
        self._last = now
        pct = 100 * done // total if total else 100
        self._out.write(
            f"\r{model} {version}: {done / _MIB:.1f}/{total / _MIB:.1f} MiB ({pct}%)\x1b[K"
        )
        self._out.flush()
        self._shown = True

    def close(self) -> None:
        """End the progress line, if one was drawn."""
        if self._shown:
            self._out.write("\n")
            self._out.flush()
            self._shown = False
