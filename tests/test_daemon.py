"""The polling daemon: jittered interval, bounded exponential backoff, clean stop."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from ota.client import DaemonConfig, run_daemon
from ota.client._daemon import next_delay


def test_backoff_is_exponential_capped_and_jittered() -> None:
    cfg = DaemonConfig(interval_s=100, jitter=0.1, backoff_s=1, max_backoff_s=30)
    rng = random.Random(1)
    assert 90 <= next_delay(cfg, 0, rng) <= 110
    assert [round(next_delay(DaemonConfig(jitter=0, backoff_s=1, max_backoff_s=30), n, rng))
            for n in (1, 2, 3, 6, 50)] == [1, 2, 4, 30, 30]


def test_failed_cycles_are_counted_and_bounded(tmp_path: Path) -> None:
    cfg = DaemonConfig(interval_s=0, backoff_s=0.001, max_backoff_s=0.002, max_cycles=3)
    assert run_daemon(tmp_path / "not-initialised", cfg, install_signals=False) == 3


def test_sigterm_stops_cleanly(tmp_path: Path) -> None:
    code = ("import sys\nfrom ota.client import DaemonConfig, run_daemon\n"
            "n = run_daemon(sys.argv[1], DaemonConfig(interval_s=0.05, backoff_s=0.05,"
            " max_backoff_s=0.05))\nprint(n)\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0 and int(out) >= 1
