"""Power-cut and disk-full fault injection for the device updater, over real HTTP.

The kill loop SIGKILLs an updater subprocess at a random instant of an update (``OTA_KILL_CYCLES``
cycles, default 8 to keep the suite fast; the report quotes a 200-cycle run), then checks after
recovery that the device has a committed model that loads and a consistent journal.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ota.client import status, update_once
from ota.client._journal import Journal, Phase
from tests import http_faults
from tests.test_updater import base  # noqa: F401 - the shared published world
from tests.updater_world import FAST, Base, World, current_version

_CHILD = """
import sys
from ota.client import update_once
from ota.client._fetch import FetchConfig
update_once(sys.argv[1], fetch_config=FetchConfig(retries=1, backoff=0.01))
"""


@pytest.fixture
def world(base: Base, tmp_path: Path) -> Iterator[World]:  # noqa: F811
    with http_faults.serve(tmp_path / "repo") as fs:
        yield World(tmp_path, base, fs)


def _child(device: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(device)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_sigkill_at_random_points_always_leaves_a_committed_model(world: World) -> None:
    import onnxruntime as ort

    world.committed_at("v1")
    world.use("v2")
    pristine = world.tmp / "dev-pristine"
    shutil.copytree(world.device, pristine, symlinks=True)
    t0 = time.monotonic()
    proc = _child(world.device)
    proc.wait(timeout=60)
    full = time.monotonic() - t0
    assert current_version(world.device) == "1.1.0"
    rng = random.Random(int(os.environ.get("OTA_KILL_SEED", "7")))
    cycles = int(os.environ.get("OTA_KILL_CYCLES", "8"))
    phases: dict[str, int] = {}
    for _ in range(cycles):
        shutil.rmtree(world.device)
        shutil.copytree(pristine, world.device, symlinks=True)
        proc = _child(world.device)
        time.sleep(rng.uniform(0.0, full))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        phase = Journal(world.device / "journal.json").load().phase.value
        phases[phase] = phases.get(phase, 0) + 1
        # the model right after the kill: committed and loadable
        version = current_version(world.device)
        assert version in ("1.0.0", "1.1.0")
        ort.InferenceSession(str(world.device / "models/det/current/model/model.onnx"))
        # next start: recovery then a full cycle ends on the new release, journal idle
        res = update_once(world.device, fetch_config=FAST)
        assert res.status in ("updated", "up_to_date"), res.to_dict()
        assert Journal(world.device / "journal.json").load().phase is Phase.IDLE
        assert current_version(world.device) == "1.1.0"
    print(f"kill phases over {cycles} cycles: {phases}; full cycle {full:.2f} s")


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
