"""Publish policy (``ota.toml [policy]`` / ``--policy``): violations refuse the publish before
anything is uploaded (or, for SBOM rules, before anything is published); a waiver needs a
reason and is recorded in the audit log and the provenance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from ota.bundle import Budget
from ota.errors import ConfigError, ExitCode, InputError
from ota.repository import Project, releases
from ota.repository._audit import audit
from ota.repository._auditlog import read_log
from ota.repository._policy import PolicyContext, PolicyViolation, load_policy
from ota.repository._project import key_fingerprint
from ota.repository._tufview import StorageSource
from ota.sbom import SbomError
from tests.onnx_models import write_mlp
from tests.repo_helpers import make_project, publish_mlp

OSV_HIGH = {
    "id": "GHSA-test-0001",
    "summary": "overflow in a kernel",
    "affected": [{"package": {"ecosystem": "PyPI", "name": "onnxruntime"},
                  "ranges": [{"type": "ECOSYSTEM",
                              "events": [{"introduced": "1.16.0"}, {"fixed": "1.17.3"}]}]}],
    "database_specific": {"severity": "HIGH"},
}  # fmt: skip


def _with_policy(project: Project, text: str) -> Project:
    toml = project.root_dir / "ota.toml"
    toml.write_text(toml.read_text() + "\n[policy]\n" + text + "\n")
    return Project.open(project.root_dir)


def _blobs(project: Project) -> int:
    return len(list(project.storage.list("blobs/")))


def _nothing_published(project: Project) -> None:
    assert releases(project) == []
    assert not any(e.event == "publish" for e in read_log(project.storage))


def test_budget_rule_refuses_before_upload_and_a_waiver_is_recorded(tmp_path: Path) -> None:
    project = _with_policy(make_project(tmp_path), 'budget_tiers = ["npu"]')
    with pytest.raises(PolicyViolation, match="budgets: no smoke budget for tiers"):
        publish_mlp(project, "det", "1.0.0")
    assert _blobs(project) == 0
    _nothing_published(project)

    ctx = PolicyContext.build(
        load_policy(project.root_dir / "ota.toml"),
        waive=["budgets"],
        reason="lab device, budgets measured next sprint",
        actor="alice",
    )
    publish_mlp(project, "det", "1.0.0", policy=ctx)
    log = read_log(project.storage)
    assert [(e.event, e.actor) for e in log] == [("policy-waiver", "alice"), ("publish", "alice")]
    assert log[0].details["rule"] == "budgets" and "lab device" in log[0].details["reason"]
    assert log[1].details["waived"] == ["budgets"]
    root = (project.root_dir / "root.json").read_bytes()
    report = audit(StorageSource(project.storage), root, "det", "1.0.0")
    prov = next(c for c in report.checks if c.name == "provenance")
    assert prov.data["parameters"]["policy_waivers"][0]["actor"] == "alice"
    publish_mlp(project, "det", "1.1.0", seed=1, budgets={"npu": Budget(25.0, 300.0)})


def test_signers_and_signature_rules(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    fp = key_fingerprint((project.root_dir / project.config.release_pub).read_bytes())
    strict = _with_policy(project, f'require_signature = true\n[policy.signers]\n"det*" = ["{fp}"]')
    publish_mlp(strict, "det", "1.0.0")
    with pytest.raises(PolicyViolation, match=r"signers: signer \w+ is not allowed for other"):
        publish_mlp(strict, "other", "1.0.0")


def test_vulnerability_rule(tmp_path: Path) -> None:
    osv = tmp_path / "osv"
    osv.mkdir()
    (osv / "GHSA.json").write_text(json.dumps(OSV_HIGH))
    project = _with_policy(make_project(tmp_path), 'max_severity = "high"')
    with pytest.raises(PolicyViolation, match="no OSV export"):
        publish_mlp(project, "det", "1.0.0", runtime_version="1.17.0")
    ctx = PolicyContext.build(load_policy(project.root_dir / "ota.toml"), osv=osv)
    with pytest.raises(PolicyViolation, match="GHSA-test-0001"):
        publish_mlp(project, "det", "1.0.0", runtime_version="1.17.0", policy=ctx)
    _nothing_published(project)
    publish_mlp(project, "det", "1.0.0", runtime_version="1.18.0", policy=ctx)  # fixed


def test_schema_invalid_sbom_is_refused_at_publish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No publish flag reaches the schema with invalid data, so an operator model-card
    fragment is injected into the real builder: its strict CycloneDX 1.6 validation refuses."""
    import ota.sbom

    real = ota.sbom.build_mlbom

    def with_bad_card(**kw: Any) -> bytes:
        return real(**kw, model_card_extra={"modelParameters": {"task": 42}})

    project = make_project(tmp_path)
    monkeypatch.setattr(ota.sbom, "build_mlbom", with_bad_card)
    with pytest.raises(SbomError):
        publish_mlp(project, "det", "1.0.0")
    _nothing_published(project)

    # and the policy's own check refuses an invalid document whoever built it
    monkeypatch.setattr(ota.sbom, "build_mlbom", lambda **kw: b'{"bomFormat": "CycloneDX"}')
    strict = _with_policy(project, "require_valid_sbom = true")
    with pytest.raises(PolicyViolation, match="sbom: SBOM is invalid"):
        publish_mlp(strict, "det", "1.0.0")
    _nothing_published(strict)


def test_static_checks_rule_and_bad_policies(tmp_path: Path) -> None:
    project = _with_policy(make_project(tmp_path), "require_static_checks = true")
    folder = tmp_path / "rt"
    folder.mkdir()
    (folder / "lib.so").write_bytes(b"\0" * 10)
    from ota.repository import PublishRequest, publish

    with pytest.raises(PolicyViolation, match="static-checks"):
        publish(project, PublishRequest(source=folder, name="rt", version="1.0.0", kind="runtime"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[policy]\nrequire_signatures = true\n")
    with pytest.raises(ConfigError, match="unknown policy keys"):
        load_policy(bad)
    with pytest.raises(InputError, match="needs a reason"):
        PolicyContext.build(load_policy(project.root_dir / "ota.toml"), waive=["budgets"])
    with pytest.raises(InputError, match="unknown rules"):
        PolicyContext.build(load_policy(project.root_dir / "ota.toml"), waive=["x"], reason="r")


def test_cli_policy_options(tmp_path: Path) -> None:
    from ota.cli._main import _register, cli

    project = _with_policy(make_project(tmp_path), 'budget_tiers = ["npu"]')
    model = tmp_path / "m.onnx"
    write_mlp(model)
    _register()
    _register()  # registering twice must not add the options twice
    base = ["publish", str(model), "--project", str(project.root_dir), "--name", "det",
            "--version", "1.0.0"]  # fmt: skip
    refused = CliRunner().invoke(cli, base)
    assert refused.exit_code == ExitCode.INPUT and "budgets" in refused.output
    no_reason = CliRunner().invoke(cli, [*base, "--waive", "budgets"])
    assert no_reason.exit_code == ExitCode.INPUT
    ok = CliRunner().invoke(cli, [*base, "--waive", "budgets", "--reason", "lab", "--actor", "bob"])
    assert ok.exit_code == 0, ok.output
    shown = CliRunner().invoke(cli, ["log", "--project", str(project.root_dir), "--json"])
    assert [(e["event"], e["actor"]) for e in json.loads(shown.output)] == [
        ("policy-waiver", "bob"), ("publish", "bob")]  # fmt: skip
