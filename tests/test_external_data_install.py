"""A model with ONNX external data (a ``.onnx`` file plus a weights file beside it) publishes and
installs end to end through ``ota device update`` with the REAL sandboxed smoke test (issue 13:
models over protobuf's 2 GB limit must use external data; a few MB stand in for 4 GB here).

What is checked: both files travel in the bundle and land side by side in the installed slot,
byte for byte; the device's smoke ran (not skipped) and passed against the golden outputs; and a
weights file altered after signing is refused (the external data is as protected as the model).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from click.testing import CliRunner

from bench.publish_speed import build_external_mlp
from ota.bundle import Manifest, blob_key
from ota.errors import ExitCode
from tests.repo_helpers import make_project, serve_dir

NAME = "extmodel"


def _ota(*args: str) -> tuple[int, str]:
    from ota.cli._main import _register, cli

    _register()
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _init(dev: Path, base: str, root: Path) -> None:
    code, out = _ota(
        "device", "init", "--state-dir", str(dev), "--repo-url", base, "--root", str(root),
        "--device-id", "ext-1", "--model", NAME, "--ring", "canary", "--health-timeout", "0",
        "--json",
    )  # fmt: skip
    assert code == 0, out


def _publish(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Build a 4 MB external-data MLP and publish it with the CLI; (project, model, data)."""
    model = tmp_path / "src" / "model.onnx"
    model.parent.mkdir()
    build_external_mlp(model, 4, layers=3)
    data = model.with_name("model.onnx.data")
    assert data.stat().st_size > 3 * 2**20 > model.stat().st_size  # the weights are apart
    project = make_project(tmp_path)
    code, out = _ota(
        "publish", "--project", str(project.root_dir), "--name", NAME, "--version", "1.0.0",
        "--json", str(model),
    )  # fmt: skip
    assert code == 0, out
    assert json.loads(out)["files"] >= 2 + 2  # model + data + smoke files (and more)
    return project.root_dir, model, data


def _manifest(repo: Path) -> Manifest:
    (path,) = (repo / "targets" / "releases" / NAME).glob("*1.0.0.json")
    return Manifest.from_bytes(path.read_bytes())


def test_external_data_model_installs_with_real_smoke(tmp_path: Path) -> None:
    proj, model, data = _publish(tmp_path)
    manifest = _manifest(tmp_path / "repo")
    assert manifest.file("model/model.onnx.data").sha256 == _sha(data)

    dev = tmp_path / "dev"
    with serve_dir(tmp_path / "repo") as base:
        _init(dev, base, proj / "root.json")
        code, out = _ota("device", "update", "--state-dir", str(dev), "--json")
        assert code == ExitCode.OK, out
        result = json.loads(out)["models"][0]
        assert result["version"] == "1.0.0"
        smoke = result["figures"]["smoke"]
        assert "skipped" not in smoke
        assert smoke["peak_mem_mb"] > 0

    code, out = _ota("device", "current", "--state-dir", str(dev))
    assert code == 0, out
    installed = Path(out.strip())
    assert installed.name == "model.onnx"
    assert _sha(installed) == _sha(model)
    assert _sha(installed.with_name("model.onnx.data")) == _sha(data)


def test_tampered_external_data_is_refused(tmp_path: Path) -> None:
    """The weights file altered on the server (same length) in its stored form: its
    whole-file blob that ranges are read from (ADR 0014; since ADR 0017 the only copy, no
    chunk blobs): the device refuses the update as a security failure and installs nothing."""
    proj, _, _ = _publish(tmp_path)
    entry = _manifest(tmp_path / "repo").file("model/model.onnx.data")
    k = len(entry.chunks) // 2
    mid = entry.chunks[k]
    offset = sum(c.size for c in entry.chunks[:k])
    whole = tmp_path / "repo" / blob_key(entry.sha256)
    assert whole.is_file(), "the publisher stores a multi-chunk file's range blob"
    assert not (tmp_path / "repo" / blob_key(mid.sha256)).exists()  # ADR 0017: stored once
    raw = bytearray(whole.read_bytes())
    raw[offset + mid.size // 2] ^= 0x01
    whole.write_bytes(bytes(raw))

    dev = tmp_path / "dev"
    with serve_dir(tmp_path / "repo") as base:
        _init(dev, base, proj / "root.json")
        code, out = _ota("device", "update", "--state-dir", str(dev), "--json")
    assert code == ExitCode.SECURITY, out
    code, out = _ota("device", "current", "--state-dir", str(dev))
    assert code != 0 or not out.strip(), out
