"""The hash-chained audit log: every steering event is logged and anchored in signed metadata;
a removed, reordered, altered or truncated entry is caught by ``ota log verify``."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from ota.errors import ExitCode
from ota.repository import Project, pause, promote, rollback, yank
from ota.repository._audit import read_anchor
from ota.repository._auditlog import (
    LogTampered,
    append_event,
    entry_key,
    read_log,
    record,
    verify_chain,
    verify_log,
)
from ota.repository._storage import FileStorage
from ota.repository._tufview import StorageSource
from tests.repo_helpers import make_project, publish_mlp


def _verify(project: Project) -> object:
    root = (project.root_dir / "root.json").read_bytes()
    head = read_anchor(StorageSource(project.storage), root, project.root_dir / ".cache")
    return verify_log(project, head)


def _cli(args: list[str]) -> tuple[int, str]:
    from ota.cli._main import _register, cli

    _register()
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def steered(tmp_path_factory: pytest.TempPathFactory) -> Project:
    base = tmp_path_factory.mktemp("log")
    project = make_project(base)
    publish_mlp(project, "m", "1.0.0")
    publish_mlp(project, "m", "1.1.0", seed=1)
    promote(project, "m", "1.1.0", "pilot", 50.0)
    pause(project, "m", "1.1.0")
    pause(project, "m", "1.1.0", paused=False)
    yank(project, "m", "1.1.0")
    rollback(project, "m", "1.0.0")
    return project


def test_every_event_is_logged_and_anchored(steered: Project) -> None:
    events = [(e.event, e.subject) for e in read_log(steered.storage)]
    assert events == [
        ("publish", "m 1.0.0"), ("publish", "m 1.1.0"), ("promote", "m 1.1.0"),
        ("pause", "m 1.1.0"), ("resume", "m 1.1.0"), ("yank", "m 1.1.0"),
        ("rollback", "m 1.0.0+rollback.3"),
    ]  # fmt: skip
    result = _verify(steered)
    assert result.entries == 7 and result.anchored_seq == 7 and result.unanchored == 0  # type: ignore[attr-defined]
    code, out = _cli(["log", "--project", str(steered.root_dir), "--json", "--limit", "2"])
    assert code == 0
    assert [e["event"] for e in json.loads(out)] == ["yank", "rollback"]
    code, out = _cli(["log", "verify", "--project", str(steered.root_dir)])
    assert code == 0 and "intact: 7 entries" in out


def test_concurrent_appenders_never_overwrite(tmp_path: Path) -> None:
    store = FileStorage(tmp_path)

    def work(i: int) -> None:
        for j in range(8):
            append_event(store, "key-rotate", actor=f"t{i}", subject=f"{i}-{j}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entries = read_log(store)
    assert [e.seq for e in entries] == list(range(1, 33))
    assert len({e.subject for e in entries}) == 32
    assert verify_chain(entries) == []


def _entry(project: Project, seq: int) -> Path:
    return project.storage.local_root() / entry_key(seq)  # type: ignore[operator]


def _remove_middle(p: Project) -> None:
    _entry(p, 3).unlink()


def _swap(p: Project) -> None:
    a, b = _entry(p, 3).read_bytes(), _entry(p, 4).read_bytes()
    _entry(p, 3).write_bytes(b)
    _entry(p, 4).write_bytes(a)


def _alter_middle(p: Project) -> None:
    doc = json.loads(_entry(p, 2).read_bytes())
    doc["actor"] = "someone-else"
    _entry(p, 2).write_bytes(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())


def _alter_newest(p: Project) -> None:
    doc = json.loads(_entry(p, 7).read_bytes())
    doc["details"]["ring"] = "canary"
    _entry(p, 7).write_bytes(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())


def _truncate(p: Project) -> None:
    _entry(p, 7).unlink()
    _entry(p, 6).unlink()


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (_remove_middle, "missing"),
        (_swap, "reordered"),
        (_alter_middle, "does not chain"),
        (_alter_newest, "differs from the signed head"),
        (_truncate, "truncated"),
    ],
)
def test_tampering_is_detected(
    steered: Project, tmp_path: Path, tamper: Callable[[Project], None], message: str
) -> None:
    import shutil

    base = steered.root_dir.parent
    shutil.copytree(base, tmp_path, dirs_exist_ok=True)
    toml = tmp_path / "proj" / "ota.toml"
    toml.write_text(toml.read_text().replace(str(base / "repo"), str(tmp_path / "repo")))
    project = Project.open(tmp_path / "proj")
    tamper(project)
    with pytest.raises(LogTampered, match=message):
        _verify(project)
    code, out = _cli(["log", "verify", "--project", str(project.root_dir)])
    assert code == ExitCode.SECURITY, out


def test_unanchored_tail_is_reported_then_anchored(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    entry = append_event(project.storage, "key-add", actor="ops", subject="bins key")
    result = _verify(project)
    assert result.unanchored == 1 and result.warnings  # type: ignore[attr-defined]
    record(project, "key-rotate", subject="timestamp key", actor="ops")
    result = _verify(project)
    assert (result.anchored_seq, result.unanchored) == (entry.seq + 1, 0)  # type: ignore[attr-defined]
