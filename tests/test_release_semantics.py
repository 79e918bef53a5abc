"""Release semantics end to end (issue 12, items 4, 5, 7, 8, 9): security floors that an
attacker holding the online keys cannot take back, rollbacks judged by their content,
percentages that apply to the ring being entered, version order at publish, and the device
statuses that ``up_to_date`` used to hide.

Real parts only: a real repository, real HTTP (``tests.http_faults``), the real updater with
its real signature check and smoke test. The attacker is a :class:`Transaction` that holds
exactly the online keys (timestamp, snapshot, bins) and nothing else.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from ota.bundle import ModelIndex, manifest_target_path
from ota.client import forget_failure, init_device, revert, update_once
from ota.client._policy import bucket
from ota.errors import ConfigError, ExitCode, InputError
from ota.repository import Project, pause, promote, rollback
from ota.repository._auditlog import read_log
from ota.repository._index import read_index, write_index
from ota.repository._project import _LazySigners
from ota.repository._txn import Transaction
from tests import http_faults
from tests.repo_helpers import make_project, publish_mlp
from tests.updater_world import FAST, current_version


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[tuple[Project, str]]:
    project = make_project(tmp_path)
    with http_faults.serve(tmp_path / "repo") as fs:
        yield project, fs.url


def _device(project: Project, url: str, where: Path, device_id: str = "dev-1",
            models: tuple[str, ...] = ("det",), **kw: Any) -> Path:
    opts: dict[str, Any] = {"ring": "canary", "health_timeout_s": 0}
    opts.update(kw)
    init_device(where, url, (project.root_dir / "root.json").read_bytes(), device_id,
                list(models), **opts)
    return where


def _update(dev: Path) -> Any:
    return update_once(dev, fetch_config=FAST)


def _ota(*args: str) -> tuple[int, str]:
    from ota.cli._main import _register, cli

    _register()
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def _online_attacker(project: Project) -> Transaction:
    """A transaction signed with exactly the keys an online machine holds."""
    online = {k: u for k, u in project.config.signers.items() if "/online/" in u}
    assert len(online) == 3  # timestamp, snapshot, bins: nothing offline, no release key
    return Transaction.begin(project.storage, _LazySigners(project.root_dir, online),
                             project.expiry())


def _forge(project: Project, keep: set[str], yanked: frozenset[str] = frozenset()) -> None:
    """The attacker re-signs the index with floor 0, keeps only the ``keep`` versions (the
    newer ones hidden: gone from the index and their targets gone from the bins) and yanks
    ``yanked``."""
    txn = _online_attacker(project)
    index = read_index(txn, "det")
    assert index is not None
    for r in index.releases:
        if r.version not in keep:
            path = manifest_target_path("det", r.version)
            del txn.edit(txn.bin_for(path)).targets[path]
    live = tuple(r if r.version not in yanked else type(r)(**{**r.__dict__, "yanked": True})
                 for r in index.releases if r.version in keep)
    write_index(project, txn, ModelIndex("det", live, security_floor=0))
    txn.commit()


def test_the_attacker_holds_no_offline_key(repo: tuple[Project, str]) -> None:
    """The fixture's attacker really is limited to the online keys: it cannot sign the
    top-level targets role (whose key is offline)."""
    project, _ = repo
    publish_mlp(project, "det", "1.0.0", seed=0)
    txn = _online_attacker(project)
    txn.edit("targets")
    with pytest.raises(ConfigError, match="cannot sign targets"):
        txn.commit()


# -- item 4: the floor is carried forward and kept -----------------------------------------


def test_floor_is_carried_in_every_later_release(repo: tuple[Project, str]) -> None:
    project, _ = repo
    publish_mlp(project, "det", "1.0.0", seed=0)
    publish_mlp(project, "det", "1.1.0", seed=1, security_floor=2)
    publish_mlp(project, "det", "1.2.0", seed=2)  # no --security-floor: carried anyway
    txn = Transaction.begin(project.storage, project.signers, project.expiry())
    from ota.repository._index import load_manifest, read_facts

    facts = read_facts(txn, "det", "1.2.0")
    assert facts is not None and facts.release.security_floor == 2
    # and signed by the release key: release.json in the bundle says the same
    manifest = load_manifest(project.storage, txn, "det", "1.2.0")
    assert manifest.file("release.json").sha256 == facts.digests["release.json"]


def test_device_that_skipped_the_floor_release_is_not_yanked_back_below_it(
    repo: tuple[Project, str], tmp_path: Path
) -> None:
    """The device ran 1.0.0 (vulnerable), skipped 1.1.0 (the fix, floor 2: paused for it),
    installed 1.2.0 (published without a floor). The attacker re-signs the index with floor
    0, hides 1.1.0 and yanks 1.2.0: the device must not revert to 1.0.0's bytes."""
    project, url = repo
    publish_mlp(project, "det", "1.0.0", seed=0)
    dev = _device(project, url, tmp_path / "dev")
    assert _update(dev).status == "updated"
    publish_mlp(project, "det", "1.1.0", seed=1, security_floor=2)
    pause(project, "det", "1.1.0")
    publish_mlp(project, "det", "1.2.0", seed=2)
    res = _update(dev)
    assert (res.status, current_version(dev)) == ("updated", "1.2.0"), res.to_dict()

    _forge(project, keep={"1.0.0", "1.2.0"}, yanked=frozenset({"1.2.0"}))
    for _ in range(2):
        res = _update(dev)
        assert res.status == "security", res.to_dict()
        assert current_version(dev) == "1.2.0"
    state = json.loads((dev / "state.json").read_bytes())
    assert state["models"]["det"]["floor"] == 2


def test_device_below_the_floor_keeps_it_when_the_index_is_forged(
    repo: tuple[Project, str], tmp_path: Path
) -> None:
    """A fresh device and one still on 1.0.0 saw the index with floor 3 (the fix 1.2.0 was
    not rolled out to them yet). The attacker then signs an index with floor 0 that lists
    only 1.0.0 and 1.1.0 (vulnerable): neither device installs them."""
    project, url = repo
    publish_mlp(project, "det", "1.0.0", seed=0, ring="ga")
    below = _device(project, url, tmp_path / "below", "dev-below", ring="ga")
    assert _update(below).status == "updated"
    publish_mlp(project, "det", "1.1.0", seed=1, ring="canary")  # not for ring ga yet
    publish_mlp(project, "det", "1.2.0", seed=2, ring="canary", security_floor=3)
    fresh = _device(project, url, tmp_path / "fresh", "dev-fresh", ring="ga")
    for dev in (below, fresh):
        res = _update(dev)
        assert res.status == "not_in_rollout", res.to_dict()
        assert res.exit_code == ExitCode.NOT_IN_ROLLOUT

    _forge(project, keep={"1.0.0", "1.1.0"})
    promote_forged(project, "1.1.0")
    for dev, running in ((below, "1.0.0"), (fresh, None)):
        res = _update(dev)
        assert res.status == "security", res.to_dict()
        assert current_version(dev) == running
        assert "forged" in res.outcomes[0].reason


def test_a_never_polled_device_with_a_provisioned_floor_refuses_the_forged_index(
    repo: tuple[Project, str], tmp_path: Path
) -> None:
    """A device initialised after the compromise never saw a genuine index; the floor
    provisioned at enrolment (like its trusted root) is what protects it."""
    project, url = repo
    publish_mlp(project, "det", "1.0.0", seed=0)
    publish_mlp(project, "det", "1.1.0", seed=1)
    publish_mlp(project, "det", "1.2.0", seed=2, security_floor=3)
    _forge(project, keep={"1.0.0", "1.1.0"})
    dev = tmp_path / "dev"
    code, out = _ota("device", "init", "--state-dir", str(dev), "--repo-url", url, "--root",
                     str(project.root_dir / "root.json"), "--device-id", "cam-9", "--model",
                     "det", "--ring", "canary", "--health-timeout", "0",
                     "--security-floor", "det=3")
    assert code == 0, out
    res = _update(dev)
    assert res.status == "security" and "forged" in res.outcomes[0].reason, res.to_dict()
    assert current_version(dev) is None
    code, out = _ota("device", "init", "--state-dir", str(dev), "--repo-url", url, "--root",
                     str(project.root_dir / "root.json"), "--device-id", "cam-9", "--model",
                     "det", "--security-floor", "other=3")
    assert code == ExitCode.INPUT, out


def promote_forged(project: Project, version: str) -> None:
    """The attacker also rolls the vulnerable 1.1.0 out to everyone (online key only)."""
    txn = _online_attacker(project)
    index = read_index(txn, "det")
    assert index is not None
    live = tuple(type(r)(**{**r.__dict__, "ring": "ga", "percent": 100.0})
                 if r.version == version else r for r in index.releases)
    write_index(project, txn, ModelIndex("det", live, index.security_floor))
    txn.commit()


def test_a_floor_above_the_release_counter_is_refused(repo: tuple[Project, str]) -> None:
    project, _ = repo
    publish_mlp(project, "det", "1.0.0", seed=0)
    with pytest.raises(InputError, match="above this release's counter"):
        publish_mlp(project, "det", "1.1.0", seed=1, security_floor=5)


# -- item 5: rollback and the floor --------------------------------------------------------


def test_rollback_below_the_floor_is_refused(repo: tuple[Project, str]) -> None:
    project, _ = repo
    publish_mlp(project, "det", "1.0.0", seed=0)
    publish_mlp(project, "det", "1.1.0", seed=1, security_floor=2)
    code, out = _ota("rollback", "det", "--to", "1.0.0", "--project", str(project.root_dir))
    assert code == ExitCode.SECURITY, out
    assert "below the security floor 2" in out
    index = read_index(Transaction.begin(project.storage, project.signers, project.expiry()),
                       "det")
    assert index is not None and [r.version for r in index.releases] == ["1.0.0", "1.1.0"]
    # a rollback to content at the floor is fine, and says which content it carries
    publish_mlp(project, "det", "1.2.0", seed=2)
    r = rollback(project, "det", "1.1.0")
    txn = Transaction.begin(project.storage, project.signers, project.expiry())
    from ota.repository._index import read_facts

    facts = read_facts(txn, "det", r.version)
    assert facts is not None
    assert (facts.release.content_counter, facts.release.security_floor) == (2, 2)


def test_device_judges_a_rollback_by_the_counter_of_its_content(
    repo: tuple[Project, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rollback to 1.0.0 (counter 1) published under floor 2 (the publisher's check
    bypassed, as an older publisher did) gets counter 3: the device at the floor refuses it."""
    project, url = repo
    publish_mlp(project, "det", "1.0.0", seed=0)
    publish_mlp(project, "det", "1.1.0", seed=1, security_floor=2)
    dev = _device(project, url, tmp_path / "dev")
    assert _update(dev).status == "updated" and current_version(dev) == "1.1.0"
    import ota.repository._ops as ops

    monkeypatch.setattr(ops, "read_index", lambda txn, name: None)  # the publisher's check off
    r = rollback(project, "det", "1.0.0")
    monkeypatch.undo()
    assert r.counter == 3
    res = _update(dev)
    assert res.status == "security", res.to_dict()
    assert "content counter 1" in res.outcomes[0].reason
    assert current_version(dev) == "1.1.0"


# -- item 7: the percentage applies to the ring being entered ------------------------------


def test_promoting_to_pilot_at_ten_percent_keeps_canary_at_one_hundred(
    repo: tuple[Project, str], tmp_path: Path
) -> None:
    project, url = repo
    publish_mlp(project, "det", "1.0.0", seed=0, ring="canary")
    promote(project, "det", "1.0.0", "pilot", 10.0)
    outside = next(f"cam-{i}" for i in range(100) if bucket(f"cam-{i}", "det", "1.0.0") >= 10)
    canary = _device(project, url, tmp_path / "canary", outside, ring="canary")
    res = _update(canary)
    assert res.status == "updated", res.to_dict()
    pilot = _device(project, url, tmp_path / "pilot", outside, ring="pilot")
    res = _update(pilot)
    assert res.status == "not_in_rollout" and res.exit_code == ExitCode.NOT_IN_ROLLOUT
    assert "10% rollout bucket of ring pilot" in res.outcomes[0].reason


# -- item 8: version order at publish ------------------------------------------------------


def test_a_lower_version_is_refused_unless_allowed_and_logged(
    repo: tuple[Project, str], tmp_path: Path
) -> None:
    project, _ = repo
    publish_mlp(project, "det", "2.0.0", seed=0)
    model = tmp_path / "proj-model.onnx"
    shutil.copy(project.root_dir.parent / "models" / "det-2.0.0.onnx", model)
    args = ["publish", str(model), "--project", str(project.root_dir), "--name", "det"]
    for version in ("1.5.0", "2.0.0+build.7"):
        code, out = _ota(*args, "--version", version)
        assert code == ExitCode.INPUT, out
        assert "does not sort above the newest release 2.0.0" in out
    code, out = _ota(*args, "--version", "1.5.0", "--allow-lower-version")
    assert code == 0, out
    [entry] = [e for e in read_log(project.storage) if e.subject == "det 1.5.0"]
    assert entry.details["allow_lower_version"] == "2.0.0"
    # a rollback keeps its own path (its version sorts below 2.0.0, it is not refused)
    assert rollback(project, "det", "2.0.0").version == "2.0.0+rollback.3"
    code, out = _ota(*args, "--version", "2.0.1")
    assert code == 0, out


# -- item 9: statuses that are not "up to date" --------------------------------------------


def test_following_a_model_that_does_not_exist(repo: tuple[Project, str], tmp_path: Path) -> None:
    project, url = repo
    publish_mlp(project, "det", "1.0.0", seed=0)
    dev = _device(project, url, tmp_path / "dev", models=("detector",))
    code, out = _ota("device", "update", "--state-dir", str(dev))
    assert code == ExitCode.NO_SUCH_MODEL, out
    assert "no model named 'detector'" in out


def test_local_revert_is_reported_and_forget_failure_allows_a_retry(
    repo: tuple[Project, str], tmp_path: Path
) -> None:
    project, url = repo
    publish_mlp(project, "det", "1.0.0", seed=0)
    dev = _device(project, url, tmp_path / "dev")
    assert _update(dev).status == "updated"
    publish_mlp(project, "det", "1.1.0", seed=1)
    assert _update(dev).status == "updated"
    assert revert(dev).status == "reverted" and current_version(dev) == "1.0.0"
    code, out = _ota("device", "update", "--state-dir", str(dev))
    assert code == ExitCode.REVERTED_LOCALLY, out
    assert "forget-failure det 1.1.0" in out

    code, out = _ota("device", "forget-failure", "--state-dir", str(dev), "det", "1.0.0")
    assert code == ExitCode.INPUT, out  # 1.0.0 never failed
    code, out = _ota("device", "forget-failure", "--state-dir", str(dev), "det", "1.1.0")
    assert code == 0, out
    res = _update(dev)
    assert (res.status, current_version(dev)) == ("updated", "1.1.0"), res.to_dict()
    assert _update(dev).status == "up_to_date"


def test_a_failed_release_is_retried_after_forget_failure(
    repo: tuple[Project, str], tmp_path: Path
) -> None:
    """1.1.0 fails its health check here (remembered, never retried); the operator fixes the
    cause and clears the failure: the next cycle installs it."""
    project, url = repo
    publish_mlp(project, "det", "1.0.0", seed=0)
    flag = tmp_path / "healthy"
    check = ("sh", "-c", f"test -e {flag}")
    dev = _device(project, url, tmp_path / "dev", health_cmd=check, health_timeout_s=30)
    flag.touch()
    assert _update(dev).status == "updated"
    flag.unlink()
    publish_mlp(project, "det", "1.1.0", seed=1)
    assert _update(dev).status == "reverted"
    res = _update(dev)
    assert res.status == "up_to_date" and current_version(dev) == "1.0.0", res.to_dict()
    flag.touch()
    assert forget_failure(dev, "det", "1.1.0").status == "failure_forgotten"
    res = _update(dev)
    assert (res.status, current_version(dev)) == ("updated", "1.1.0"), res.to_dict()
    with pytest.raises(InputError):
        forget_failure(dev, "det", "1.1.0")



def test_kept_floors_survive_a_reload_and_never_go_down() -> None:
    """``state.json`` keeps the verified floor per model (also for a model never committed);
    a state written before floors were kept still loads; a corrupt floor is refused."""
    from ota.client._state import CommittedState
    from ota.errors import LocalError

    st = CommittedState().with_floor("det", 3)
    assert st.with_floor("det", 2) is st
    back = CommittedState.from_bytes(st.to_bytes())
    assert back.floor("det") == 3 and back.committed().floors == {"det": 3}
    legacy = json.loads(st.to_bytes())
    del legacy["floors"]
    assert CommittedState.from_bytes(json.dumps(legacy).encode()).floor("det") == 0
    legacy["floors"] = {"det": -1}
    with pytest.raises(LocalError, match="bad floor"):
        CommittedState.from_bytes(json.dumps(legacy).encode())
