"""Download progress of ``ota device update`` on a terminal (stderr, one rewritten line).

Shown only when stderr is a TTY and the output is not ``--json``: scripts, systemd and pipes
get no control characters. Progress is display only; it decides nothing: a terminal that
fails (EIO once an ssh session drops) stops the drawing, never the download.
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
        self._broken = False

    def __call__(self, model: str, version: str, done: int, total: int) -> None:
        now = time.monotonic()
        if self._broken or (done < total and now - self._last < self._every):
            return
        self._last = now
        pct = 100 * done // total if total else 100
        self._write(f"\r{model} {version}: {done / _MIB:.1f}/{total / _MIB:.1f} MiB ({pct}%)\x1b[K")
        self._shown = not self._broken

    def close(self) -> None:
        """End the progress line, if one was drawn."""
        if self._shown:
            self._write("\n")
            self._shown = False

    def _write(self, text: str) -> None:
        try:
            self._out.write(text)
            self._out.flush()
        except (OSError, ValueError):  # the terminal went away (or stderr was closed)
            self._broken = True
