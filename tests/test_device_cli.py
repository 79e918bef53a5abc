"""`ota device …` end to end over real HTTP: exit codes a script or systemd can act on."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from ota.errors import ExitCode
from tests.repo_helpers import make_project, publish_mlp, serve_dir


def _ota(*args: str) -> tuple[int, str]:
    from ota.cli._main import _register, cli

    _register()
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_device_cycle_exit_codes_and_yank_revert(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    publish_mlp(project, "det", "1.0.0", ring="ga")
    dev = str(tmp_path / "dev")
    with serve_dir(tmp_path / "repo") as base:
        code, out = _ota(
            "device",
            "init",
            "--state-dir",
            dev,
            "--repo-url",
            base,
            "--root",
            str(project.root_dir / "root.json"),
            "--device-id",
            "cam-1",
            "--model",
            "det",
            "--ring",
            "canary",
            "--health-timeout",
            "0",
            "--json",
        )
        assert code == 0, out
        assert json.loads(out)["models"] == ["det"]

        code, out = _ota("device", "update", "--state-dir", dev, "--json")
        assert code == ExitCode.OK, out
        assert json.loads(out)["models"][0]["version"] == "1.0.0"

        code, out = _ota("device", "update", "--state-dir", dev)
        assert code == ExitCode.UP_TO_DATE, out
        assert "det" in out

        publish_mlp(project, "det", "1.1.0", seed=1, ring="canary")
        code, out = _ota("device", "update", "--state-dir", dev, "--json")
        assert code == ExitCode.OK, out
        code, out = _ota("device", "current", "--state-dir", dev)
        assert code == 0
        first = Path(out.strip())
        assert first.is_file()

        from ota.repository import yank

        yank(project, "det", "1.1.0")
        code, out = _ota("device", "update", "--state-dir", dev, "--json")
        assert code == ExitCode.OK, out
        assert json.loads(out)["models"][0]["status"] == "yank_reverted"
        # Regression: a yanked release this device once committed is not a downgrade attack.
        code, out = _ota("device", "update", "--state-dir", dev, "--json")
        assert code == ExitCode.UP_TO_DATE, out
        code, out = _ota("device", "status", "--state-dir", dev, "--json")
        assert json.loads(out)["models"]["det"]["current_version"] == "1.0.0"


def test_device_update_without_init_is_a_config_error(tmp_path: Path) -> None:
    code, out = _ota("device", "update", "--state-dir", str(tmp_path / "nothing"))
    assert code == ExitCode.CONFIG, out
    assert out.startswith("error: ")


def test_ota_verify_checks_a_device_slot_offline(tmp_path: Path) -> None:
    """A device keeps what TUF verified beside each slot; `ota verify` re-checks it offline,
    and names a file changed on the device's disk afterwards."""
    project = make_project(tmp_path)
    publish_mlp(project, "det", "1.0.0", ring="ga")
    dev = tmp_path / "dev"
    with serve_dir(tmp_path / "repo") as base:
        code, out = _ota(
            "device", "init", "--state-dir", str(dev), "--repo-url", base,
            "--root", str(project.root_dir / "root.json"), "--device-id", "cam-1",
            "--model", "det", "--health-timeout", "0",
        )
        assert code == 0, out
        assert _ota("device", "update", "--state-dir", str(dev))[0] == ExitCode.OK
    slot = next((dev / "models" / "det" / "slots").glob("?"))
    assert (slot.parent / f"{slot.name}.target.json").is_file()
    assert (slot.parent / f"{slot.name}.signers.json").is_file()
    # the slot's own a.signers.json is no trust anchor (issue 12 item 2): the operator's key is
    key = str(project.root_dir / project.config.release_pub)
    assert _ota("verify", str(slot), "--json")[0] == ExitCode.SECURITY
    code, out = _ota("verify", str(slot), "--signer-key", key, "--json")
    assert code == 0, out
    checks = {c["name"]: c["status"] for c in json.loads(out)["checks"]}
    assert checks["files"] == "ok" and checks["signature"] == "ok" and checks["sbom"] == "ok"
    model = slot / "model" / "model.onnx"
    model.chmod(0o644)
    model.write_bytes(model.read_bytes()[:-1] + b"\x00")
    code, out = _ota("verify", str(slot), "--signer-key", key, "--json")
    assert code == ExitCode.SECURITY
    report, _ = json.JSONDecoder().raw_decode(out)  # the error line follows the report
    failed = {c["name"] for c in report["checks"] if c["status"] == "failed"}
    assert "files" in failed
