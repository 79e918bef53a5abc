"""Publishing is a transaction: concurrent publishers lose nothing, a killed one breaks nothing."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ota.bundle import ModelIndex, index_target_path, manifest_target_path
from tests.repo_helpers import make_project, serve_dir, stock_updater

_PUBLISHER = """
import sys
from pathlib import Path
from ota.repository import Project, PublishRequest, publish
project = Project.open(Path(sys.argv[1]))
for spec in sys.argv[3:]:
    name, version = spec.split("@")
    # racing publishers land in any order: version order (issue 12) is not under test here
    publish(project, PublishRequest(source=Path(sys.argv[2]), name=name, version=version,
                                    allow_lower_version=True))
print("done", flush=True)
"""


def _spawn(
    proj: Path, model: Path, specs: list[str], env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _PUBLISHER, str(proj), str(model), *specs],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )


def _verify_all(repo: Path, root: bytes, work: Path, expected: dict[str, set[str]]) -> None:
    """The stock python-tuf client refreshes and downloads every expected release manifest."""
    with serve_dir(repo) as base:
        updater = stock_updater(base, root, work)
        updater.refresh()
        for name, versions in expected.items():
            info = updater.get_targetinfo(index_target_path(name))
            index = ModelIndex.from_custom(info.custom)
            assert {r.version for r in index.releases} >= versions
            counters = [r.counter for r in index.releases]
            assert len(set(counters)) == len(counters), "two releases share a counter"
            for v in versions:
                target = updater.get_targetinfo(manifest_target_path(name, v))
                assert target is not None, f"{name} {v} lost"
                updater.download_target(target, str(work / f"{name}-{v}.json"))


@pytest.mark.slow
def test_concurrent_publishers_lose_no_release(tmp_path: Path) -> None:
    from tests.onnx_models import write_mlp

    project = make_project(tmp_path)
    model = write_mlp(tmp_path / "m.onnx")
    jobs = {
        "p0": ["shared@1.0.0", "alpha@1.0.0", "shared@1.0.3"],
        "p1": ["shared@1.0.1", "beta@1.0.0", "shared@1.0.4"],
        "p2": ["shared@1.0.2", "gamma@1.0.0", "shared@1.0.5"],
    }
    procs = [_spawn(project.root_dir, model, specs) for specs in jobs.values()]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    expected: dict[str, set[str]] = {}
    for specs in jobs.values():
        for spec in specs:
            name, version = spec.split("@")
            expected.setdefault(name, set()).add(version)
    root = (project.root_dir / "root.json").read_bytes()
    _verify_all(tmp_path / "repo", root, tmp_path / "device", expected)


@pytest.mark.slow
def test_concurrent_publishers_on_s3(tmp_path: Path, s3_endpoint: str, s3_url: str) -> None:
    from tests.onnx_models import write_mlp
    from tests.s3server import child_env

    project = make_project(tmp_path, s3_url, s3_endpoint=s3_endpoint)
    model = write_mlp(tmp_path / "m.onnx")
    env = child_env(s3_endpoint)
    procs = [
        _spawn(project.root_dir, model, [f"shared@2.0.{i}", f"own{i}@1.0.0"], env) for i in range(3)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    from ota.repository import releases

    rows = releases(project)
    versions = {(r.name, r.state.version) for r in rows}
    assert versions == {("shared", f"2.0.{i}") for i in range(3)} | {
        (f"own{i}", "1.0.0") for i in range(3)
    }
    assert sorted(r.state.counter for r in rows if r.name == "shared") == [1, 2, 3]


@pytest.mark.slow
def test_killed_publisher_leaves_a_valid_repository(tmp_path: Path) -> None:
    from tests.onnx_models import big_mlp, save

    project = make_project(tmp_path)
    model = save(big_mlp(4), tmp_path / "big.onnx")
    root = (project.root_dir / "root.json").read_bytes()
    rng = random.Random(1234)
    published: dict[str, set[str]] = {"m": set()}
    # Time one full publish so the kills land all along it (chunks, signing, metadata commit).
    start = time.monotonic()
    p = _spawn(project.root_dir, model, ["m@0.0.1"])
    assert p.communicate(timeout=300) and p.returncode == 0
    full = time.monotonic() - start
    published["m"].add("0.0.1")
    for i in range(6):
        version = f"0.1.{i}"
        p = _spawn(project.root_dir, model, [f"m@{version}"])
        time.sleep(rng.uniform(0.05, full * 1.1))
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate(timeout=60)
        if p.returncode == 0:
            published["m"].add(version)  # finished before the kill
        _verify_all(tmp_path / "repo", root, tmp_path / f"device{i}", published)
    # The repository still accepts new releases after every crash.
    p = _spawn(project.root_dir, model, ["m@1.0.0"])
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()[-2000:]
    published["m"].add("1.0.0")
    _verify_all(tmp_path / "repo", root, tmp_path / "device-final", published)
