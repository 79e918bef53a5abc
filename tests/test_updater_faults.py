"""Power-cut and disk-full fault injection for the device updater, over real HTTP.

The kill loop SIGKILLs a real updater process at a random instant of an update, ``OTA_KILL_CYCLES``
times (default 200: about 25 s on 2 idle cores, 114 ms a kill), and checks after every kill that
the device serves a committed model (every file re-hashed) that loads and runs in onnxruntime,
and after each run of kills that the next undisturbed start ends idle: on the new release, or on
the old one with the new one given up when the kills interrupted its staging ``max_attempts``
times (predicted from the state the kills left, and both outcomes must occur).

What makes a kill cheap (it was ~1 s a cycle, so the default was 8):

* one repository state served for the whole loop by ``ota serve`` in its own process;
* no interpreter start and no imports per cycle: a *zygote* process imports the updater once,
  then forks one worker per run; the worker calls ``update_once`` as ``ota device update``
  does. The zygote stops the worker at the drawn instant (SIGSTOP, so it cannot move on), lists
  its children, SIGKILLs it and then its sandboxed smoke child (its own session: a power cut
  takes it too), and reports how the worker ended;
* kills are chained: the next start after a kill is itself killed at a random instant (its
  recovery is part of the run), up to ``OTA_KILL_CHAIN`` (4) kills, then one run goes to the end;
* the kill instant is drawn uniformly over the measured duration of a whole run (median of
  three), so it covers refresh, fetch, staging, smoke and the switch in proportion to their time
  (the instants inside ``switching`` and ``trial`` are a few ms: ``test_crash_phases`` hits
  those exactly);
* the pristine device is restored with a copy of ~35 small files (about 2 ms).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from ota.client import init_device, status, update_once
from ota.client._journal import Journal
from ota.client._state import StateDir
from tests import http_faults
from tests.test_updater import base  # noqa: F401 - the shared published world
from tests.updater_world import FAST, Base, World, current_version

_CHAIN = int(os.environ.get("OTA_KILL_CHAIN", "4"))  # kills in a row before a run may finish

# The zygote: imports once, then per line on stdin ("<seconds>", negative: no kill) forks a worker
# running update_once, kills it at that instant unless it ended first, and prints one JSON line.
_ZYGOTE = r"""
import json, os, select, signal, sys, time
import ota.client._install, ota.client._smoke, ota.client._tuf, ota.client._updater
import ota.signing, tuf.ngclient
from ota.client import update_once
from ota.client._fetch import FetchConfig

device = sys.argv[1]
cfg = FetchConfig(connect_timeout=2.0, read_timeout=2.0, retries=1, backoff=0.01,
                  backoff_max=0.05)

def children(pid):
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(k) for k in f.read().split()]
        except OSError:
            pass
    return kids

def kill_group(pid):
    for kill in (os.killpg, os.kill):  # the smoke child calls setsid() right after fork
        try:
            kill(pid, signal.SIGKILL)
            return
        except OSError:
            pass

for line in sys.stdin:
    delay = float(line)
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if update_once(device, fetch_config=cfg).exit_code in (0, 10) else 2
        finally:
            os._exit(code)
    fd = os.pidfd_open(pid)
    ready, _, _ = select.select([fd], [], [], delay if delay >= 0 else 120.0)
    if not ready:
        signal.pidfd_send_signal(fd, signal.SIGSTOP)
        kids = children(pid)
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        for kid in kids:
            kill_group(kid)
    _, wstatus = os.waitpid(pid, 0)
    os.close(fd)
    killed = os.WIFSIGNALED(wstatus) and os.WTERMSIG(wstatus) == signal.SIGKILL
    code = os.WEXITSTATUS(wstatus) if os.WIFEXITED(wstatus) else -1
    print(json.dumps({"killed": killed, "code": code, "seconds": time.monotonic() - t0}),
          flush=True)
"""


class _Zygote:
    """The zygote process for one state directory."""

    def __init__(self, device: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        self.err: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE, str(device)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err)

    def run(self, kill_after: float) -> dict[str, Any]:
        """One worker run, SIGKILLed after ``kill_after`` s (negative: never)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{kill_after!r}\n".encode())
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"zygote died: {self.stderr()}"
        result: dict[str, Any] = json.loads(line)
        return result

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read().decode(errors="replace")[-3000:]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.err.close()


@contextlib.contextmanager
def _ota_serve(root: Path) -> Iterator[str]:
    """``ota serve``'s server in its own process, as in production (the werkzeug server leaks
    the file of a response whose client was killed: a ResourceWarning, harmless there, would
    fail this process). Yields its base URL."""
    code = ("import sys\nfrom pathlib import Path\n"
            "from ota.repository._serve import serve_forever\n"
            "serve_forever(Path(sys.argv[1]), '127.0.0.1', 0)\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", code, str(root)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert " on http://" in line, line
        yield line.split(" on ", 1)[1].strip()
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture
def world(base: Base, tmp_path: Path) -> Iterator[World]:  # noqa: F811
    with http_faults.serve(tmp_path / "repo") as fs:
        yield World(tmp_path, base, fs)


def _loads(device: Path) -> None:
    """The committed model as an app gets it: loads and runs in onnxruntime."""
    import numpy as np
    import onnxruntime as ort

    model = device / "models/det/current/model/model.onnx"
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    with np.load(device / "models/det/current/smoke/inputs.npz") as feed:
        out = session.run(None, {k: feed[k] for k in feed.files})
    assert all(np.isfinite(o).all() for o in out)


@pytest.mark.slow
def test_sigkill_at_random_points_always_leaves_a_committed_model(
    base: Base, tmp_path: Path  # noqa: F811
) -> None:
    served = tmp_path / "repo"
    shutil.copytree(base.root / "repo_v1", served)
    with _ota_serve(served) as url:
        device = tmp_path / "dev"
        init_device(device, url, base.trusted_root, "dev-1", ["det"], ring="canary",
                    health_timeout_s=0)
        assert update_once(device, fetch_config=FAST).status == "updated"
        shutil.rmtree(served)
        shutil.copytree(base.root / "repo_v2", served)
        pristine = tmp_path / "dev-pristine"
        shutil.copytree(device, pristine, symlinks=True)
        zygote = _Zygote(device)
        try:
            _kill_loop(zygote, device, pristine)
        finally:
            zygote.close()


def _kill_loop(zygote: _Zygote, device: Path, pristine: Path) -> None:
    sd = StateDir(device)
    max_attempts = sd.load_config().max_attempts

    def restore() -> None:
        shutil.rmtree(device)
        shutil.copytree(pristine, device, symlinks=True)

    def phase() -> str:
        return Journal(device / "journal.json").load().phase.value

    def ended(given_up: bool) -> None:
        """After an undisturbed start: idle, on 1.1.0; or on 1.0.0 with 1.1.0 given up."""
        assert phase() == "idle"
        st = status(device)
        if given_up:
            assert current_version(device) == "1.0.0"
            assert st.failed == (("det", "1.1.0"),)
            events = json.loads((device / "events.json").read_bytes())["events"]
            assert any(e["kind"] == "failed" and e["version"] == "1.1.0" for e in events)
        else:
            assert current_version(device) == "1.1.0"
            assert st.failed == () and st.models["det"]["committed_counter"] == 2
        _loads(device)

    runs = []
    for _ in range(3):  # the duration of a whole run, undisturbed
        restore()
        r = zygote.run(-1.0)
        assert (r["killed"], r["code"]) == (False, 0), (r, zygote.stderr())
        ended(given_up=False)
        runs.append(r["seconds"])
    full = statistics.median(runs)

    rng = random.Random(int(os.environ.get("OTA_KILL_SEED", "7")))
    cycles = int(os.environ.get("OTA_KILL_CYCLES", "200"))
    phases: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    kills = 0
    t0 = time.monotonic()
    restore()
    while kills < cycles:
        chain, given_up = 0, False
        while chain < _CHAIN and kills < cycles:
            r = zygote.run(rng.uniform(0.0, full))
            if not r["killed"]:
                break
            kills += 1
            chain += 1
            at = phase()
            phases[at] += 1
            # right after the kill: a committed model (every file re-hashed) that runs
            assert current_version(device) in ("1.0.0", "1.1.0")
            _loads(device)
            # the next start gives 1.1.0 up iff it did already, or it will count the
            # max_attempts-th interrupted staging
            state = sd.load_state()
            given_up = ("det", "1.1.0") in state.failed or (
                at in ("staging", "staged")
                and state.attempts.get("det@1.1.0", 0) + 1 >= max_attempts)
        else:
            r = zygote.run(-1.0)  # the next start, undisturbed: recovery, then the update
        assert (r["killed"], r["code"]) == (False, 0), (r, zygote.stderr())
        ended(given_up)
        outcomes["given up" if given_up else "new release"] += 1
        restore()
    took = time.monotonic() - t0
    print(f"{kills} kills, {took:.1f} s ({took / kills * 1000:.0f} ms a kill; a whole run "
          f"{full * 1000:.0f} ms); journal phase at the kill: {dict(phases)}; runs of kills "
          f"ended: {dict(outcomes)}")
    assert sum(phases.values()) == kills == cycles
    if cycles >= 100:  # the instants must spread over the update, not only its start
        assert {"idle", "staging", "staged"} <= set(phases), phases
        if max_attempts <= _CHAIN:  # both ends of a run of kills happen
            assert set(outcomes) == {"new release", "given up"}, outcomes


def test_disk_full_during_staging_is_a_clean_local_error(world: World) -> None:
    """RLIMIT_FSIZE makes every write past the limit fail with EFBIG, like a full disk, and
    works unprivileged (CI). The staged model file is the only file over the limit."""
    from ota.repository import PublishRequest, publish
    from tests.onnx_models import write_mlp

    world.committed_at("v1")
    model = write_mlp(world.tmp / "big.onnx", seed=5, hidden=256)  # ~140 KB of weights
    publish(world.project(), PublishRequest(source=model, name="det", version="2.0.0"))
    code = (
        "import resource, signal, sys, json\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (48 * 1024, 48 * 1024))\n"
        "from ota.client import update_once\n"
        "from ota.client._fetch import FetchConfig\n"
        "r = update_once(sys.argv[1], fetch_config=FetchConfig(retries=0))\n"
        "print(json.dumps(r.to_dict()))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", code, str(world.device)], env=env,
                         capture_output=True, timeout=60, check=True)
    res = json.loads(out.stdout.splitlines()[-1])
    assert res["status"] == "local_error", res
    assert res["exit_code"] == 6
    assert current_version(world.device) == "1.0.0"
    assert status(world.device).phase == "idle"
    # with room again the same release installs, reusing what was staged
    assert update_once(world.device, fetch_config=FAST).status == "updated"
    assert current_version(world.device) == "2.0.0"
