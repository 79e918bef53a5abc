"""Runtime bundles through the device updater: smoke-tested with the committed model, then
committed or refused.

A real repository (served over HTTP) holds ``det`` (an ONNX MLP) and a runtime ``ort-cpu``: the
onnxruntime package of this venv, published as a runtime bundle (``ota publish --kind
runtime``). A device follows both. Before a runtime release is committed the updater runs the
committed ``det`` in the sandboxed smoke child with the *new* runtime first on its path; the
child reports which onnxruntime it loaded, so the tests can tell the new runtime really ran.

The failing runtime is the classic edge mistake: a build for another CPU architecture (aarch64)
shipped to an x86-64 device under a label that lets it through. Its native libraries carry
``e_machine = EM_AARCH64`` in their ELF headers, the field the dynamic loader checks first, so
importing it fails on this device exactly as a real aarch64 build would.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ota.client import current_model, init_device, status, update_once
from ota.client._install import SELFTEST
from ota.client._journal import Journal, Phase
from ota.errors import ExitCode
from ota.repository import Project, PublishRequest, publish
from tests.repo_helpers import make_project, publish_mlp, serve_dir
from tests.updater_world import FAST

RUNTIME = "ort-cpu"
EM_X86_64, EM_AARCH64 = 62, 183


@dataclass(frozen=True)
class Published:
    """Repository snapshots: ``1`` det 1.0.0 and ort-cpu 1.0.0; ``2`` adds ort-cpu 1.1.0 (a good
    rebuild); ``3`` adds ort-cpu 2.0.0 (the aarch64 build); ``2m`` is ``2`` plus det 1.1.0."""

    root: Path
    trusted_root: bytes

    def state(self, n: int | str) -> Path:
        return self.root / f"repo_{n}"


def _runtime_folder(dest: Path, build: str) -> Path:
    """The venv's onnxruntime package as a runtime folder (``onnxruntime/…``)."""
    import onnxruntime

    src = Path(onnxruntime.__file__).parent
    shutil.copytree(src, dest / "onnxruntime", ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "BUILD").write_text(build)
    return dest


def _retarget_elf(folder: Path, machine: int) -> int:
    """Set ``e_machine`` in the ELF header of every native library under ``folder`` (64-bit,
    little-endian, as built for x86-64). Returns how many were changed."""
    changed = 0
    for lib in folder.rglob("*.so*"):
        with lib.open("r+b") as f:
            head = f.read(20)
            if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                continue
            assert int.from_bytes(head[18:20], "little") == EM_X86_64, lib
            f.seek(18)
            f.write(machine.to_bytes(2, "little"))
            changed += 1
    return changed


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Published:
    root = tmp_path_factory.mktemp("runtime")
    project = make_project(root)
    publish_mlp(project, "det", "1.0.0", seed=0)

    def runtime(version: str, folder: Path) -> None:
        publish(
            project, PublishRequest(source=folder, name=RUNTIME, version=version, kind="runtime")
        )

    runtime("1.0.0", _runtime_folder(root / "rt-1.0.0", "build 1"))
    shutil.copytree(root / "repo", root / "repo_1")
    runtime("1.1.0", _runtime_folder(root / "rt-1.1.0", "build 2"))
    shutil.copytree(root / "repo", root / "repo_2")
    # a side branch of state 2: det 1.1.0 published into a copy (project and repository)
    shutil.copytree(root / "proj", root / "side" / "proj")
    shutil.copytree(root / "repo", root / "repo_2m")
    side = Project.open(root / "side" / "proj", storage_override=str(root / "repo_2m"))
    publish_mlp(side, "det", "1.1.0", seed=1)
    arm = _runtime_folder(root / "rt-2.0.0", "build 3, aarch64")
    assert _retarget_elf(arm, EM_AARCH64) >= 1
    runtime("2.0.0", arm)
    shutil.copytree(root / "repo", root / "repo_3")
    return Published(root, (project.root_dir / "root.json").read_bytes())


@dataclass
class Device:
    state_dir: Path
    served: Path

    def serve(self, pub: Published, n: int | str) -> None:
        """Serve snapshot ``n`` (hard links: the server only reads)."""
        shutil.rmtree(self.served, ignore_errors=True)
        shutil.copytree(pub.state(n), self.served, copy_function=os.link)

    def update(self) -> Any:
        return update_once(self.state_dir, fetch_config=FAST)

    def events(self, kind: str, model: str = RUNTIME) -> list[dict[str, Any]]:
        doc = json.loads((self.state_dir / "events.json").read_bytes())
        return [e for e in doc["events"] if e["kind"] == kind and e["model"] == model]


@pytest.fixture
def device(published: Published, tmp_path: Path) -> Iterator[Device]:
    with _device(published, tmp_path, ["det", RUNTIME]) as dev:
        yield dev


@contextlib.contextmanager
def _device(published: Published, tmp_path: Path, follows: list[str]) -> Iterator[Device]:
    served = tmp_path / "repo"
    served.mkdir()
    with serve_dir(served) as url:
        dev = Device(tmp_path / "dev", served)
        init_device(
            dev.state_dir,
            url,
            published.trusted_root,
            "cam-1",
            follows,
            ring="canary",
            health_timeout_s=0,
        )
        yield dev


def _current(state_dir: Path, name: str) -> tuple[str, Path]:
    """(version, slot folder) of ``name``'s current slot, after re-hashing every file of the
    slot against its manifest."""
    slot = current_model(state_dir, name)
    while slot.parent.name != "slots":
        slot = slot.parent
    manifest = json.loads(slot.with_name(f"{slot.name}.manifest.json").read_bytes())
    for f in manifest["files"]:
        digest = hashlib.sha256((slot / f["path"]).read_bytes()).hexdigest()
        assert digest == f["sha256"], f["path"]
    return json.loads((slot / "release.json").read_bytes())["version"], slot


_APP = r"""
import os, sys
import numpy as np
runtime, model, inputs = sys.argv[1:4]
sys.path.insert(0, runtime)
import onnxruntime as ort
assert os.path.realpath(ort.__file__).startswith(os.path.realpath(runtime) + os.sep), ort.__file__
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
with np.load(inputs) as feed:
    out = session.run(None, {k: feed[k] for k in feed.files})
assert all(np.isfinite(o).all() for o in out)
print(ort.__version__)
"""


def _app_runs_det_with_the_committed_runtime(state_dir: Path) -> None:
    """What an app does: the committed runtime first on ``sys.path``, the committed model."""
    import onnxruntime

    runtime = current_model(state_dir, RUNTIME)
    model = current_model(state_dir, "det")
    inputs = model.parent.parent / "smoke" / "inputs.npz"
    proc = subprocess.run(
        [sys.executable, "-I", "-c", _APP, str(runtime), str(model), str(inputs)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout.decode().strip() == onnxruntime.__version__


def test_good_runtime_runs_the_committed_model_in_smoke_then_is_committed(
    published: Published, device: Device
) -> None:
    device.serve(published, 1)
    res = device.update()
    assert [(o.model, o.status, o.version) for o in res.outcomes] == [
        ("det", "updated", "1.0.0"),
        (RUNTIME, "updated", "1.0.0"),
    ], res.to_dict()
    old_version, old_slot = _current(device.state_dir, RUNTIME)
    assert old_version == "1.0.0"

    device.serve(published, 2)
    res = device.update()
    assert res.status == "updated" and res.exit_code == ExitCode.OK, res.to_dict()
    assert [(o.model, o.status) for o in res.outcomes] == [
        ("det", "up_to_date"),
        (RUNTIME, "updated"),
    ]
    out = res.outcomes[1]
    assert out.version == "1.1.0"
    # the smoke ran det (its golden outputs, its budgets) with the NEW runtime's onnxruntime:
    # loaded from the slot being installed, not the committed runtime nor the system one
    new_version, new_slot = _current(device.state_dir, RUNTIME)
    assert new_version == "1.1.0" and new_slot != old_slot
    report = out.figures["smoke"]["det"]
    assert report["runtime_file"] == str(new_slot.resolve() / "runtime/onnxruntime/__init__.py")
    assert report["runs"] >= 1 and report["max_abs_err"] is not None
    [passed] = [e for e in device.events("smoke_passed") if e["version"] == "1.1.0"]
    assert passed["data"]["report"]["det"]["runtime_file"] == report["runtime_file"]
    assert [e["version"] for e in device.events("confirmed")] == ["1.0.0", "1.1.0"]
    st = status(device.state_dir)
    assert st.models[RUNTIME]["committed_counter"] == 2 and st.failed == ()
    assert _current(device.state_dir, "det")[0] == "1.0.0"
    _app_runs_det_with_the_committed_runtime(device.state_dir)


def test_runtime_that_cannot_run_the_committed_model_is_refused_and_not_retried(
    published: Published, device: Device
) -> None:
    device.serve(published, 2)
    res = device.update()
    assert [(o.model, o.version) for o in res.outcomes] == [("det", "1.0.0"), (RUNTIME, "1.1.0")]
    assert res.status == "updated", res.to_dict()
    _, runtime_slot = _current(device.state_dir, RUNTIME)

    device.serve(published, 3)
    res = device.update()
    assert res.status == "smoke_failed" and res.exit_code == ExitCode.SMOKE_FAILED, res.to_dict()
    assert [(o.model, o.status) for o in res.outcomes] == [
        ("det", "up_to_date"),
        (RUNTIME, "smoke_failed"),
    ]
    out = res.outcomes[1]
    assert out.version == "2.0.0"
    assert "crash" in out.reason and "cannot import the runtime" in out.reason, out.reason
    # the device keeps the old runtime and the model, both intact, and they still work
    assert _current(device.state_dir, RUNTIME) == ("1.1.0", runtime_slot)
    assert _current(device.state_dir, "det")[0] == "1.0.0"
    assert Journal(device.state_dir / "journal.json").load().phase is Phase.IDLE
    _app_runs_det_with_the_committed_runtime(device.state_dir)
    st = status(device.state_dir)
    assert st.failed == ((RUNTIME, "2.0.0"),)
    assert st.models[RUNTIME]["committed_version"] == "1.1.0"
    [event] = device.events("smoke_failed")
    assert event["version"] == "2.0.0" and event["data"]["report"]["reason"] == "crash"
    assert "onnxruntime_pybind11_state" in event["data"]["report"]["message"]
    assert not [e for e in device.events("committed") if e["version"] == "2.0.0"]
    # remembered as failed: never fetched or tried again
    res = device.update()
    assert res.status == "up_to_date", res.to_dict()
    skipped = {s["version"]: s["reason"] for o in res.outcomes for s in o.skipped}
    assert skipped["2.0.0"] == "failed on this device before"
    assert len(device.events("smoke_failed")) == 1


def test_model_update_is_smoke_tested_with_the_committed_runtime(
    published: Published, device: Device
) -> None:
    """The app runs models with the committed runtime bundle, so that is what the smoke of a
    new model must use (not whatever onnxruntime the system has)."""
    device.serve(published, 2)
    assert device.update().status == "updated"
    _, runtime_slot = _current(device.state_dir, RUNTIME)
    device.serve(published, "2m")
    res = device.update()
    assert [(o.model, o.status, o.version) for o in res.outcomes] == [
        ("det", "updated", "1.1.0"),
        (RUNTIME, "up_to_date", None),
    ], res.to_dict()
    report = res.outcomes[0].figures["smoke"]
    assert report["runtime_file"] == str(runtime_slot.resolve() / "runtime/onnxruntime/__init__.py")
    assert _current(device.state_dir, "det")[0] == "1.1.0"


@pytest.mark.parametrize("follows", [[RUNTIME], [RUNTIME, "det"]])
def test_runtime_with_no_committed_model_runs_the_builtin_self_test(
    published: Published, tmp_path: Path, follows: list[str]
) -> None:
    """A first install (or the runtime listed before the model): there is no committed model to
    run, so the built-in self-test model (golden outputs computed by numpy) runs with the new
    runtime: the good build is committed, the aarch64 build is refused."""
    with _device(published, tmp_path, follows) as dev:
        dev.serve(published, 2)
        res = dev.update()
        rt = next(o for o in res.outcomes if o.model == RUNTIME)
        assert (rt.status, rt.version) == ("updated", "1.1.0"), res.to_dict()
        report = rt.figures["smoke"][SELFTEST]
        _, slot = _current(dev.state_dir, RUNTIME)
        assert report["runtime_file"] == str(slot.resolve() / "runtime/onnxruntime/__init__.py")
        assert report["runs"] == 3 and report["max_abs_err"] < 1e-5

    shutil.rmtree(tmp_path / "dev")
    shutil.rmtree(tmp_path / "repo")
    with _device(published, tmp_path, [RUNTIME]) as dev:
        dev.serve(published, 3)  # newest runtime: the aarch64 build, nothing committed yet
        res = dev.update()
        assert res.status == "smoke_failed", res.to_dict()
        [out] = res.outcomes
        assert out.version == "2.0.0" and "cannot import the runtime" in out.reason
        [event] = dev.events("smoke_failed")
        assert event["data"]["report"]["reason"] == "crash"
        assert status(dev.state_dir).failed == ((RUNTIME, "2.0.0"),)


# -- issue 12 item 14: runtime bundles made as the publish runbook says ---------------------


def _dist_info_dir() -> Path:
    import onnxruntime

    site = Path(onnxruntime.__file__).parent.parent
    (found,) = site.glob(f"onnxruntime-{onnxruntime.__version__}.dist-info")
    return found


def _record_line(rel: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{rel},sha256={digest},{len(data)}"


def _wheel_from_venv(folder: Path, *, extra: dict[str, bytes] | None = None,
                     tamper: str | None = None) -> Path:  # fmt: skip
    """A real PEP 427 wheel of this venv's onnxruntime (its package and dist-info, a fresh
    RECORD), as `pip download onnxruntime` would give for this platform. ``extra`` adds
    members (listed in RECORD); ``tamper`` names a member whose bytes change after RECORD."""
    import onnxruntime

    pkg = Path(onnxruntime.__file__).parent
    dist = _dist_info_dir()
    folder.mkdir(parents=True, exist_ok=True)
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    wheel = folder / f"onnxruntime-{onnxruntime.__version__}-{tag}-{tag}-linux_x86_64.whl"
    members: dict[str, bytes] = {}
    for p in sorted(pkg.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            members[p.relative_to(pkg.parent).as_posix()] = p.read_bytes()
    for n in ("METADATA", "WHEEL", "entry_points.txt"):
        if (dist / n).is_file():
            members[f"{dist.name}/{n}"] = (dist / n).read_bytes()
    members.update(extra or {})
    record = [_record_line(rel, data) for rel, data in members.items()]
    record.append(f"{dist.name}/RECORD,,")
    if tamper is not None:
        changed = bytearray(members[tamper])  # same size, other bytes
        changed[-1] ^= 0x01
        members[tamper] = bytes(changed)
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as zf:
        for rel, data in members.items():
            info = zipfile.ZipInfo(rel, date_time=(2026, 1, 1, 0, 0, 0))
            info.external_attr = (0o100755 if rel.endswith(".so") else 0o100644) << 16
            zf.writestr(info, data)
        zf.writestr(f"{dist.name}/RECORD", "\n".join(record) + "\n")
    return wheel


def _cli(*args: str) -> tuple[int, str]:
    from click.testing import CliRunner

    from ota.cli._main import _register, cli

    _register()
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_runtime_wheel_folder_publishes_installs_and_runs_the_smoke(tmp_path: Path) -> None:
    """The publish runbook's runtime bundle: a folder holding the onnxruntime wheel, published
    with `ota publish DIR --kind runtime`. The device unpacks the verified wheel beside the
    slot, the smoke runs the committed model with it, apps get its import root, and the slot
    itself still verifies."""
    import onnxruntime

    project = make_project(tmp_path)
    publish_mlp(project, "det", "1.0.0", seed=0)
    folder = tmp_path / "ort-1.31-x86_64"
    wheel = _wheel_from_venv(folder)
    code, out = _cli("publish", str(folder), "--project", str(project.root_dir), "--kind",
                     "runtime", "--name", RUNTIME, "--version", "1.31.1")  # fmt: skip
    assert code == 0, out
    code, out = _cli("sbom", "show", RUNTIME, "1.31.1", "--project", str(project.root_dir))
    assert f"pkg:pypi/onnxruntime@{onnxruntime.__version__}" in out, out
    trusted = (project.root_dir / "root.json").read_bytes()
    pub = Published(tmp_path, trusted)
    shutil.copytree(tmp_path / "repo", pub.state("w"))
    (tmp_path / "d").mkdir()
    with _device(pub, tmp_path / "d", ["det", RUNTIME]) as dev:
        dev.serve(pub, "w")
        res = dev.update()
        assert [(o.model, o.status) for o in res.outcomes] == [
            ("det", "updated"), (RUNTIME, "updated")], res.to_dict()  # fmt: skip
        version, slot = _current(dev.state_dir, RUNTIME)  # the slot is exactly its manifest
        assert version == "1.31.1" and (slot / "runtime" / wheel.name).is_file()
        unpacked = slot.with_name(f"{slot.name}.unpacked").resolve()
        report = res.outcomes[1].figures["smoke"]["det"]
        assert report["runtime_file"] == str(unpacked / "onnxruntime" / "__init__.py")
        assert report["max_abs_err"] is not None
        code, out = _cli("device", "current", "--state-dir", str(dev.state_dir), "--model",
                         RUNTIME)  # fmt: skip
        assert code == 0 and Path(out.strip()).resolve() == unpacked, out
        model = current_model(dev.state_dir, "det")
        proc = subprocess.run([sys.executable, "-I", "-c", _APP, out.strip(), str(model),
                               str(model.parent.parent / "smoke" / "inputs.npz")],
                              capture_output=True, timeout=120, check=False)  # fmt: skip
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        code, out = _cli("verify", str(slot), "--signer-key",
                         str(project.root_dir / project.config.release_pub))  # fmt: skip
        assert code == 0 and "RESULT: PASS" in out, out
        # what apps import is the unpacked tree: `ota verify` of the slot covers it too
        init = unpacked / "onnxruntime" / "__init__.py"
        init.write_bytes(init.read_bytes() + b"\nimport os  # planted\n")
        code, out = _cli("verify", str(slot), "--signer-key",
                         str(project.root_dir / project.config.release_pub))  # fmt: skip
        assert code == ExitCode.SECURITY and "onnxruntime/__init__.py" in out, out


def test_unpacked_runtime_sbom_names_its_distributions(tmp_path: Path) -> None:
    """An unpacked runtime (pip --target layout) carries pkg:pypi components read from its
    dist-info METADATA, so `ota vulns` sees it."""
    import onnxruntime

    project = make_project(tmp_path)
    folder = _runtime_folder(tmp_path / "rt", "unpacked")
    shutil.copytree(_dist_info_dir(), folder / _dist_info_dir().name)
    publish(project, PublishRequest(source=folder, name=RUNTIME, version="1.0.0",
                                    kind="runtime"))  # fmt: skip
    osv = tmp_path / "osv"
    osv.mkdir()
    (osv / "GHSA-t3st-rt00-0001.json").write_text(json.dumps({
        "schema_version": "1.6.0", "id": "GHSA-t3st-rt00-0001", "modified": "2026-04-01T00:00:00Z",
        "affected": [{"package": {"ecosystem": "PyPI", "name": "onnxruntime"},
                      "versions": [onnxruntime.__version__]}],
        "database_specific": {"severity": "HIGH"}}))  # fmt: skip
    code, out = _cli("vulns", "--osv", str(osv), "--project", str(project.root_dir))
    assert code == ExitCode.SECURITY, out
    assert f"{RUNTIME}@1.0.0: GHSA-t3st-rt00-0001 HIGH pkg:pypi/onnxruntime@" in out


@pytest.mark.parametrize(
    ("extra", "tamper", "message"),
    [
        ({"../escape.py": b"x = 1\n"}, None, "unsafe path"),
        ({"/abs.py": b"x = 1\n"}, None, "unsafe path"),
        (None, "onnxruntime/__init__.py", "differs from its RECORD"),
        ({"onnxruntime-1.31.1.data/scripts/../../x": b""}, None, "unsafe path"),
        ({"onnxruntime/./__init__.py": b"x = 1\n"}, None, "appears twice|clashes"),
        ({"onnxruntime/__init__.py/x": b"x = 1\n"}, None, "clashes"),
    ],
)
def test_a_bad_runtime_wheel_is_refused_and_nothing_escapes(
    tmp_path: Path, extra: dict[str, bytes] | None, tamper: str | None, message: str
) -> None:
    from ota.client._runtime import RuntimeBundleError, import_root

    slot = tmp_path / "slots" / "a"
    _wheel_from_venv(slot / "runtime", extra=extra, tamper=tamper)
    with pytest.raises(RuntimeBundleError, match=message):
        import_root(slot / "runtime")
    assert not (tmp_path / "slots" / "a.unpacked").exists()
    assert not list(tmp_path.rglob("escape.py")) and not Path("/abs.py").exists()
    assert sorted(p.name for p in (tmp_path / "slots").iterdir()) == ["a"]


def test_a_reused_slot_is_unpacked_again(tmp_path: Path) -> None:
    from ota.client._runtime import STAMP, import_root

    slot = tmp_path / "slots" / "a"
    wheel = _wheel_from_venv(slot / "runtime")
    root = import_root(slot / "runtime")
    assert (root / "onnxruntime" / "__init__.py").is_file()
    assert import_root(slot / "runtime") == root  # unchanged wheels: reused
    (root / "stale.txt").write_text("from the release that used this slot before")
    wheel.unlink()
    _wheel_from_venv(slot / "runtime", extra={"onnxruntime/added.py": b"y = 2\n"})
    again = import_root(slot / "runtime")
    assert (again / "onnxruntime" / "added.py").is_file()
    assert not (again / "stale.txt").exists() and (again / STAMP).is_file()


def test_smoke_with_an_unsafe_runtime_wheel_fails_as_runtime_mismatch(tmp_path: Path) -> None:
    """What the updater sees: the release fails its smoke (``runtime_mismatch``, the reason
    named) instead of a traceback, and a good wheel in the same place runs the self-test."""
    from ota.client._install import _SELFTEST_DIR, _SELFTEST_SPEC
    from ota.client._smoke import SmokeFailed, run_smoke

    bad = tmp_path / "bad" / "slots" / "a"
    _wheel_from_venv(bad / "runtime", extra={"../escape.py": b"x = 1\n"})
    with pytest.raises(SmokeFailed) as e:
        run_smoke(_SELFTEST_DIR / "model.onnx", _SELFTEST_DIR, _SELFTEST_SPEC, tier="default",
                  runtime_path=bad)  # fmt: skip
    assert e.value.reason == "runtime_mismatch" and "unsafe path" in str(e.value)
    good = tmp_path / "good" / "slots" / "a"
    _wheel_from_venv(good / "runtime")
    report = run_smoke(_SELFTEST_DIR / "model.onnx", _SELFTEST_DIR, _SELFTEST_SPEC,
                       tier="default", runtime_path=good)  # fmt: skip
    unpacked = (good.parent / "a.unpacked").resolve()
    assert report.runtime_file == str(unpacked / "onnxruntime" / "__init__.py")


@pytest.mark.parametrize("where", ["members", "record"])
def test_a_runtime_wheel_with_too_many_entries_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Security review of issue 12: the file count bound applied only to extracted members.
    Members of the ``.data`` folders that are skipped (scripts, headers, data) and RECORD rows
    were unbounded: RECORD is read up to 16 MiB, about a million rows held in the updater's
    memory, and every member is walked. Both count against MAX_FILES (lowered here so the
    test builds a small wheel; the code reads it at each call)."""
    import ota.client._runtime as rt

    monkeypatch.setattr(rt, "MAX_FILES", 400)
    slot = tmp_path / "slots" / "a"
    wheel = _wheel_from_venv(slot / "runtime")
    with zipfile.ZipFile(wheel) as zf:
        record = next(i.filename for i in zf.infolist() if i.filename.endswith("/RECORD"))
        n = len(zf.infolist())
    assert n < 400
    data = record.replace(".dist-info/RECORD", ".data")
    if where == "members":
        with zipfile.ZipFile(wheel, "a") as zf:
            for i in range(401 - n):
                zf.writestr(f"{data}/scripts/s{i}", b"")
    else:  # RECORD rows for files that are not in the wheel
        with zipfile.ZipFile(wheel) as zf:
            members = {i.filename: zf.read(i) for i in zf.infolist()}
        rows = "".join(f"ghost/{i}.py,sha256=AAAA,1\n" for i in range(401))
        members[record] += rows.encode()
        with zipfile.ZipFile(wheel, "w") as zf:
            for name, body in members.items():
                zf.writestr(name, body)
    with pytest.raises(rt.RuntimeBundleError, match="more than 400"):
        rt.import_root(slot / "runtime")
    assert sorted(p.name for p in (tmp_path / "slots").iterdir()) == ["a"]


def test_ota_verify_checks_a_runtime_slots_unpacked_tree(tmp_path: Path) -> None:
    """Security review of issue 12 item 14: apps and the smoke import the runtime from
    ``<slot>.unpacked``, which was checked once, when unpacked. ``ota verify`` of the slot
    re-hashed only the slot, so an altered, added or removed file there went unseen. Each
    file must be one a wheel of the slot lists in its RECORD, with its sha256 and size."""
    from ota.client._runtime import check_unpacked, import_root

    slot = tmp_path / "slots" / "a"
    _wheel_from_venv(slot / "runtime")
    root = import_root(slot / "runtime")
    assert check_unpacked(slot) == (root, [])
    init = root / "onnxruntime" / "__init__.py"
    init.write_bytes(init.read_bytes() + b"\n# planted\n")
    (root / "sitecustomize.py").write_text("import os\n")
    (root / "onnxruntime" / "capi" / "_pybind_state.py").unlink()
    found = check_unpacked(slot)
    assert found is not None
    problems = "\n".join(found[1])
    assert "onnxruntime/__init__.py: differs from" in problems, problems
    assert "sitecustomize.py: not in any wheel" in problems, problems
    assert "onnxruntime/capi/_pybind_state.py: missing" in problems, problems
    assert check_unpacked(tmp_path / "nothing") is None
