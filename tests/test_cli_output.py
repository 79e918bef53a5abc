"""Issue 12, item 18 (CLI parts): what scripts and people read from ``ota``.

JSON errors under ``--json`` (one object on stdout, from the CLI's one error mapping), numbers
that are numbers, ``device current --json``, a readable ``device status``, ``ota serve`` on the
project's port, device ids that cannot name paths, and a warning before a bearer token travels
over plain http.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from ota.cli._main import _register, cli
from ota.errors import ExitCode
from ota.repository import Project
from tests.repo_helpers import make_project, publish_mlp, serve_dir

_register()


def _ota(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def _error(res: Result) -> dict[str, object]:
    doc = json.loads(res.stdout)
    assert isinstance(doc, dict)
    return doc


@pytest.mark.parametrize(
    ("args", "code", "cls", "kind"),
    [
        (["releases", "--project", "{tmp}/none"], ExitCode.CONFIG, "ConfigError", "config"),
        (
            ["promote", "m", "9.9.9", "--ring", "ga", "--project", "{proj}"],
            ExitCode.INPUT,
            "UnknownRelease",
            "input",
        ),
        (
            ["promote", "m", "1.0.0", "--ring", "moon", "--project", "{proj}"],
            ExitCode.USAGE,
            "BadParameter",
            "usage",
        ),
        (["releases", "--bogus", "--project", "{proj}"], ExitCode.USAGE, "NoSuchOption", "usage"),
        (
            ["device", "update", "--state-dir", "{tmp}/nodev"],
            ExitCode.CONFIG,
            "ConfigError",
            "config",
        ),
        (
            ["key", "rotate", "bins", "--new-key", "{tmp}/missing.pem", "--project", "{proj}"],
            ExitCode.INPUT,
            "InputError",
            "input",
        ),
    ],
)
def test_errors_are_json_under_json(
    tmp_path: Path, args: list[str], code: int, cls: str, kind: str
) -> None:
    project = make_project(tmp_path, bins=4)
    publish_mlp(project, "m", "1.0.0")
    argv = [a.format(tmp=tmp_path, proj=project.root_dir) for a in args]
    plain = _ota(*argv)
    assert plain.exit_code == code and plain.stdout == "", plain.output  # text on stderr only
    res = _ota(*argv, "--json")
    assert res.exit_code == code, res.output
    doc = _error(res)
    assert doc["error"] is True and doc["exit_code"] == code
    assert doc["class"] == cls and doc["kind"] == kind
    assert isinstance(doc["message"], str) and doc["message"]
    assert "error" in res.stderr.lower()  # people still read stderr


def test_percent_is_a_number_in_every_json(tmp_path: Path) -> None:
    project = make_project(tmp_path, bins=4)
    model = tmp_path / "models" / "m-1.0.0.onnx"
    publish_mlp(project, "m", "1.0.0")
    proj = str(project.root_dir)
    pub = _ota("publish", str(model), "--project", proj, "--name", "m", "--version", "1.1.0",
               "--ring", "canary", "--percent", "25", "--json")  # fmt: skip
    assert pub.exit_code == 0, pub.output
    assert json.loads(pub.stdout)["percent"] == 25
    rows = json.loads(_ota("releases", "--project", proj, "--json").stdout)
    assert [r["percent"] for r in rows] == [25.0, 100.0]
    assert all(isinstance(r["percent"], float) for r in rows)
    prom = _ota("promote", "m", "1.1.0", "--ring", "pilot", "--percent", "12.5", "--project",
                proj, "--json")  # fmt: skip
    assert json.loads(prom.stdout)["percent"] == 12.5
    paused = _ota("pause", "m", "1.1.0", "--project", proj, "--json")
    assert json.loads(paused.stdout)["percent"] == 12.5


def _init_device(project: Project, base: str, dev: Path, *extra: str) -> Result:
    return _ota("device", "init", "--state-dir", str(dev), "--repo-url", base, "--root",
                str(project.root_dir / "root.json"), "--model", "m", "--ring", "canary",
                "--health-timeout", "0", *extra)  # fmt: skip


def test_device_current_json_and_readable_status(tmp_path: Path) -> None:
    project = make_project(tmp_path, bins=4)
    publish_mlp(project, "m", "1.0.0")
    dev = tmp_path / "dev"
    with serve_dir(tmp_path / "repo") as base:
        assert _init_device(project, base, dev, "--device-id", "cam-001").exit_code == 0
        assert _ota("device", "update", "--state-dir", str(dev)).exit_code == 0
    res = _ota("device", "current", "--state-dir", str(dev), "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert Path(doc["path"]).is_file()
    assert _ota("device", "current", "--state-dir", str(dev)).stdout.strip() == doc["path"]
    text = _ota("device", "status", "--state-dir", str(dev)).stdout
    assert "{" not in text and "'" not in text, text  # no raw dicts
    assert "m: 1.0.0 (slot " in text and f"file: {doc['path']}" in text
    assert "failed releases: none" in text and "events:" in text


@pytest.mark.parametrize(
    "device_id", ["../../admin", "a/b", ".hidden", "-rf", "", "x" * 129, "cam 1", "cam-1\n"]
)
def test_device_ids_that_could_name_paths_are_refused(tmp_path: Path, device_id: str) -> None:
    project = make_project(tmp_path, bins=4)
    dev = tmp_path / "dev"
    res = _init_device(project, "http://127.0.0.1:1", dev, "--device-id", device_id)
    assert res.exit_code == ExitCode.USAGE, res.output
    assert "invalid device id" in res.output
    assert not (dev / "device.json").exists()


@pytest.mark.parametrize("device_id", ["cam-001", "CAM_7.front", "0" * 128])
def test_good_device_ids_are_kept(tmp_path: Path, device_id: str) -> None:
    project = make_project(tmp_path, bins=4)
    res = _init_device(project, "http://127.0.0.1:1", tmp_path / "dev", "--device-id", device_id,
                       "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["device_id"] == device_id


@pytest.mark.parametrize(
    ("url", "warned"),
    [
        ("http://fleet.example.com", True),
        ("http://0.0.0.0:1", True),
        ("https://fleet.example.com", False),
        ("http://127.0.0.1:1", False),
        ("http://localhost:1", False),
        ("http://[::1]:1", False),
    ],
)
def test_token_over_plain_http_warns(tmp_path: Path, url: str, warned: bool) -> None:
    project = make_project(tmp_path, bins=4)
    token = tmp_path / "token"
    token.write_text("secret\n")
    dev = tmp_path / "dev"
    res = _init_device(project, "http://127.0.0.1:1", dev, "--device-id", "cam-1",
                       "--report-url", url, "--report-token-file", str(token))  # fmt: skip
    assert res.exit_code == 0, res.output
    assert ("plain http" in res.stderr) is warned, res.stderr
    # without a token there is nothing to leak
    res = _init_device(project, "http://127.0.0.1:1", tmp_path / "dev2", "--device-id", "cam-2",
                       "--report-url", url)  # fmt: skip
    assert "plain http" not in res.stderr
    if url.startswith("http://0.0.0.0"):  # report: warned again, then refused fast (no server)
        rep = _ota("device", "report", "--state-dir", str(dev))
        assert "plain http" in rep.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_serve_uses_the_port_of_base_url(tmp_path: Path) -> None:
    port = _free_port()
    res = _ota("init", str(tmp_path / "repo"), "--project", str(tmp_path / "proj"),
               "--base-url", f"http://127.0.0.1:{port}")  # fmt: skip
    assert res.exit_code == 0, res.output
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ota.cli", "serve", "--project", str(tmp_path / "proj")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    out = proc.stdout
    assert out is not None
    threading.Thread(target=lambda: lines.put(out.readline()), daemon=True).start()
    try:
        first = lines.get(timeout=120)  # a condition with a generous deadline, not a sleep
        assert first.rstrip().endswith(f"on http://127.0.0.1:{port}"), first
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            pass
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        out.close()


def test_the_updater_library_refuses_path_like_device_ids(tmp_path: Path) -> None:
    """Not only the CLI: the device config itself (init_device, or a device.json edited on
    disk) refuses an id that is not a safe path part."""
    from ota.client import init_device
    from ota.errors import ConfigError

    project = make_project(tmp_path, bins=4)
    root = (project.root_dir / "root.json").read_bytes()
    with pytest.raises(ConfigError, match="invalid device id"):
        init_device(tmp_path / "dev", "http://127.0.0.1:1", root, "../../admin", ["m"])
    init_device(tmp_path / "dev", "http://127.0.0.1:1", root, "cam-1", ["m"])
    doc = json.loads((tmp_path / "dev" / "device.json").read_text())
    doc["device_id"] = "../../admin"
    (tmp_path / "dev" / "device.json").write_text(json.dumps(doc))
    res = _ota("device", "status", "--state-dir", str(tmp_path / "dev"), "--json")
    assert res.exit_code == ExitCode.CONFIG and "invalid device id" in res.stdout, res.output
