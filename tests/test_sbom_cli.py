"""``ota sbom show|diff`` and ``ota vulns`` on a real published repository."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ota.errors import ExitCode
from ota.repository import Project
from tests.repo_helpers import make_project, publish_mlp
from tests.test_publish_policy import OSV_HIGH


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    base = tmp_path_factory.mktemp("sbomcli")
    p = make_project(base)
    publish_mlp(p, "det", "1.0.0", runtime_version="1.17.0")
    publish_mlp(p, "det", "1.1.0", seed=1, runtime_version="1.18.0")
    return p


def _cli(*args: str) -> tuple[int, str]:
    from ota.cli._main import _register, cli

    _register()
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_sbom_show(project: Project) -> None:
    code, out = _cli("sbom", "show", "det", "1.0.0", "--project", str(project.root_dir), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["bomFormat"] == "CycloneDX" and doc["specVersion"] == "1.6"
    code, out = _cli("sbom", "show", "det", "1.0.0", "--project", str(project.root_dir))
    assert code == 0 and "model det 1.0.0 pkg:generic/det@1.0.0" in out
    assert "pkg:pypi/onnxruntime@1.17.0" in out
    code, _ = _cli("sbom", "show", "det", "9.0.0", "--project", str(project.root_dir))
    assert code == ExitCode.INPUT


def test_sbom_diff(project: Project) -> None:
    args = ("sbom", "diff", "det", "1.0.0", "1.1.0", "--project", str(project.root_dir))
    code, out = _cli(*args, "--json")
    assert code == 0
    diff = json.loads(out)
    changed = {c["name"]: {f["field"] for f in c["changes"]} for c in diff["changed"]}
    assert "version" in changed["onnxruntime"]
    assert "model/model.onnx" in changed
    code, out = _cli(*args)
    assert code == 0 and "SBOM diff" in out and "onnxruntime" in out


def test_vulns(project: Project, tmp_path: Path) -> None:
    (tmp_path / "GHSA.json").write_text(json.dumps(OSV_HIGH))
    args = ("vulns", "--osv", str(tmp_path), "--project", str(project.root_dir))
    code, out = _cli(*args, "--json")
    assert code == ExitCode.SECURITY
    report = json.loads(out.split("\nerror:")[0]) if "\nerror:" in out else json.loads(out)
    assert report["releases"] == 2
    assert [(m["release"], m["id"]) for m in report["matches"]] == [
        ("det@1.0.0", "GHSA-test-0001")]  # fmt: skip
    code, out = _cli(*args)
    assert code == ExitCode.SECURITY and "det@1.0.0: GHSA-test-0001 HIGH" in out
    code, _ = _cli(*args, "--fail-on", "critical")
    assert code == 0


def _installed_ort_record() -> dict[str, object]:
    """An OSV record (GitHub advisory shape) that affects the onnxruntime installed here."""
    import onnxruntime
    from packaging.version import Version

    v = Version(onnxruntime.__version__)
    fixed = f"{v.major}.{v.minor}.{v.micro + 1}"
    return {
        "schema_version": "1.6.0", "id": "GHSA-t3st-inst-0001", "modified": "2026-04-01T00:00:00Z",
        "summary": "affects the runtime the publisher validated with",
        "affected": [{"package": {"ecosystem": "PyPI", "name": "onnxruntime"},
                      "ranges": [{"type": "ECOSYSTEM", "events": [
                          {"introduced": str(v)}, {"fixed": fixed}]}]}],
        "database_specific": {"severity": "CRITICAL"},
    }  # fmt: skip


def test_cli_publish_records_the_runtime_it_validated_with_and_vulns_fire(tmp_path: Path) -> None:
    """Issue 12 item 3: `ota publish` without --runtime-version records the onnxruntime its
    golden run used, exactly, so an OSV record for that version is found by `ota vulns`."""
    import onnxruntime

    from tests.onnx_models import write_mlp

    p = make_project(tmp_path)
    model = write_mlp(tmp_path / "m.onnx")
    root = str(p.root_dir)
    code, out = _cli("publish", str(model), "--project", root, "--name", "det", "--version",
                     "1.0.0", "--runtime", ">=1.16,<2")  # fmt: skip
    assert code == 0, out
    code, out = _cli("publish", str(model), "--project", root, "--name", "det", "--version",
                     "1.1.0", "--runtime", ">=1.16,<2", "--runtime-version", "1.17.0")  # fmt: skip
    assert code == 0, out
    code, out = _cli("sbom", "show", "det", "1.0.0", "--project", root)
    assert f"pkg:pypi/onnxruntime@{onnxruntime.__version__}" in out
    osv = tmp_path / "osv"
    osv.mkdir()
    (osv / "GHSA-t3st-inst-0001.json").write_text(json.dumps(_installed_ort_record()))
    (osv / "GHSA-test-0001.json").write_text(json.dumps(OSV_HIGH))
    code, out = _cli("vulns", "--osv", str(osv), "--project", root)
    assert code == ExitCode.SECURITY, out
    assert "det@1.0.0: GHSA-t3st-inst-0001 CRITICAL" in out
    assert "det@1.1.0: GHSA-test-0001 HIGH pkg:pypi/onnxruntime@1.17.0" in out
    # a runtime version outside the declared range is refused before anything is published
    code, out = _cli("publish", str(model), "--project", root, "--name", "det", "--version",
                     "1.2.0", "--runtime", ">=1.16,<2", "--runtime-version", "2.1.0")  # fmt: skip
    assert code == ExitCode.INPUT and "outside" in out
    code, out = _cli("publish", str(model), "--project", root, "--name", "det", "--version",
                     "1.2.0", "--runtime", "<1.0")  # fmt: skip
    assert code == ExitCode.INPUT and "golden outputs were computed with onnxruntime" in out
