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
    # moto honours conditional writes: the probe passed (its marker is there, no canary left).
    probe_keys = set(project.storage.list("_ota/"))
    assert probe_keys == {"_ota/conditional-writes.json"}


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


# -- a store that ignores conditional writes (s3rver) ----------------------------------------


def _s3rver_projects(tmp_path: Path, url: str, endpoint: str, publishers: str) -> list[Path]:
    """One repository on s3rver and two copies of its project (two CI checkouts)."""
    import shutil

    from ota.repository import init_project

    init_project(tmp_path / "proj0", url, bins=16, s3_endpoint=endpoint, single_publisher=True)
    config = tmp_path / "proj0" / "ota.toml"
    text = config.read_text().replace('publishers = "single"', f'publishers = "{publishers}"')
    config.write_text(text)
    shutil.copytree(tmp_path / "proj0", tmp_path / "proj1")
    return [tmp_path / "proj0", tmp_path / "proj1"]


def _cli_publish(
    proj: Path, model: Path, version: str, env: dict[str, str]
) -> subprocess.Popen[str]:
    args = ["publish", str(model), "--project", str(proj), "--name", "m", "--version", version]
    # Racing publishers of one model: whichever commits second may carry the lower version.
    args.append("--allow-lower-version")
    return subprocess.Popen(
        [sys.executable, "-m", "ota.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )


@pytest.mark.slow
def test_concurrent_publishers_on_a_store_without_conditional_writes_are_refused(
    tmp_path: Path, s3rver_url: str, s3rver_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 12 item 1: on s3rver two `ota publish` at once used to exit 0 and lose releases.
    Now both refuse (exit 9, naming the requirement) and publish nothing."""
    from ota.repository import Project, releases
    from tests.onnx_models import write_mlp
    from tests.s3server import child_env

    monkeypatch.setenv("OTA_LOCK_DIR", str(tmp_path))
    projects = _s3rver_projects(tmp_path, s3rver_url, s3rver_endpoint, "concurrent")
    model = write_mlp(tmp_path / "m.onnx")
    env = child_env(s3rver_endpoint)
    procs = [_cli_publish(p, model, f"1.0.{i}", env) for i, p in enumerate(projects)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 9, err[-2000:]
        assert "must honour conditional writes" in err and "Traceback" not in err
    assert releases(Project.open(projects[0])) == []


@pytest.mark.slow
def test_single_publisher_mode_serialises_publishers_on_one_host(
    tmp_path: Path, s3rver_url: str, s3rver_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same race in single-publisher mode: the host lock runs them one at a time, so no
    release, counter or audit-log entry is lost, and each run says what the mode promises."""
    from ota.repository import Project, releases
    from tests.onnx_models import write_mlp
    from tests.s3server import child_env

    monkeypatch.setenv("OTA_LOCK_DIR", str(tmp_path))
    projects = _s3rver_projects(tmp_path, s3rver_url, s3rver_endpoint, "single")
    model = write_mlp(tmp_path / "m.onnx")
    env = child_env(s3rver_endpoint) | {"OTA_LOCK_DIR": str(tmp_path)}
    versions = []
    for r in range(2):
        round_versions = [f"1.{r}.{i}" for i in range(len(projects))]
        procs = [
            _cli_publish(p, model, v, env) for p, v in zip(projects, round_versions, strict=True)
        ]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-2000:]
            assert "no other host may publish" in err
        versions += round_versions
    project = Project.open(projects[0])
    rows = releases(project, "m")
    project.storage.close()  # this process held the host lock since its first read
    assert sorted(r.state.version for r in rows) == sorted(versions)
    assert sorted(r.state.counter for r in rows) == list(range(1, len(versions) + 1))
    verify = subprocess.run(
        [sys.executable, "-m", "ota.cli", "log", "verify", "--project", str(projects[1])],
        check=False,
        capture_output=True,
        env=env,
        text=True,
        timeout=300,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
