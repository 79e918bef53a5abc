"""The polling daemon: jittered interval, bounded exponential backoff, clean stop."""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

from ota.client import DaemonConfig, run_daemon
from ota.client._daemon import next_delay


def test_backoff_is_exponential_capped_and_jittered() -> None:
    cfg = DaemonConfig(interval_s=100, jitter=0.1, backoff_s=1, max_backoff_s=30)
    rng = random.Random(1)
    assert 90 <= next_delay(cfg, 0, rng) <= 110
    assert [
        round(next_delay(DaemonConfig(jitter=0, backoff_s=1, max_backoff_s=30), n, rng))
        for n in (1, 2, 3, 6, 50)
    ] == [1, 2, 4, 30, 30]


def test_failed_cycles_are_counted_and_bounded(tmp_path: Path) -> None:
    cfg = DaemonConfig(interval_s=0, backoff_s=0.001, max_backoff_s=0.002, max_cycles=3)
    assert run_daemon(tmp_path / "not-initialised", cfg, install_signals=False) == 3


def test_sigterm_stops_cleanly(tmp_path: Path) -> None:
    """SIGTERM between cycles ends the daemon with exit 0 and the count of cycles it ran.

    The signal is sent once the child has reported a finished cycle (so its handler is
    installed), never after a fixed sleep: on a loaded machine the child's imports alone can
    take longer than any guess.
    """
    from ota.client import init_device
    from tests.repo_helpers import make_project

    project = make_project(tmp_path, bins=4)
    state = tmp_path / "dev"
    # a real device whose repository refuses connections: every cycle ends, quickly, transient
    init_device(
        state,
        "http://127.0.0.1:1",
        (project.root_dir / "root.json").read_bytes(),
        "dev-1",
        ["m"],
        health_timeout_s=0,
    )
    code = (
        "import sys\nfrom ota.client import DaemonConfig, run_daemon\n"
        "n = run_daemon(sys.argv[1], DaemonConfig(interval_s=0.05, backoff_s=0.05,"
        " max_backoff_s=0.05), on_result=lambda r: print('cycle', r.status, flush=True))\n"
        "print(n, flush=True)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(state)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    out_pipe = proc.stdout
    assert out_pipe is not None
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in out_pipe:
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        first = lines.get(timeout=120)  # a condition with a generous deadline
        assert first.startswith("cycle "), first
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=60)
    out_pipe.close()
    rest = []
    while not lines.empty():
        rest.append(lines.get())
    assert rest and int(rest[-1]) >= 1, rest
