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
