"""The download progress line decides nothing (review of issue 13): a terminal that goes away
mid-download (an ssh session dropped, a closed pty: writes fail with EIO) must not abort the
staging it only displays; the line just stops being drawn."""

from __future__ import annotations

import errno
import io

from ota.cli._progress import TtyProgress


class _GoneTerminal(io.StringIO):
    def write(self, s: str) -> int:
        raise OSError(errno.EIO, "Input/output error")


def test_a_failing_terminal_never_fails_the_download() -> None:
    progress = TtyProgress(_GoneTerminal())
    progress("det", "1.0.0", 1, 10)
    progress("det", "1.0.0", 10, 10)
    progress.close()


def test_progress_is_drawn_on_a_working_terminal() -> None:
    out = io.StringIO()
    progress = TtyProgress(out)
    progress("det", "1.0.0", 10 * 1024 * 1024, 10 * 1024 * 1024)
    progress.close()
    assert out.getvalue() == "\rdet 1.0.0: 10.0/10.0 MiB (100%)\x1b[K\n"
