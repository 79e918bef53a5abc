"""``ota vulns --fleet URL``: the fleet service's answer to "which devices run an affected
release", on a real published repository, an offline OSV export and the real service."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ota.errors import ExitCode
from ota.repository import Project
from tests.fleet_fixtures import (  # noqa: F401
    FleetService,
    call,
    fleet_backend,
    fleet_service,
    postgres,
)
from tests.repo_helpers import make_project, publish_mlp
from tests.test_fleet_ingest import ev, post_report, report
from tests.test_publish_policy import OSV_HIGH


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    p = make_project(tmp_path_factory.mktemp("fleetvulns"))
    publish_mlp(p, "det", "1.0.0", runtime_version="1.17.0")
    publish_mlp(p, "det", "1.1.0", seed=1, runtime_version="1.18.0")
    return p


def _cli(*args: str, env: dict[str, str]) -> tuple[int, str]:
    from ota.cli._main import _register, cli

    _register()
    result = CliRunner().invoke(cli, list(args), env=env)
    return result.exit_code, result.output


def test_vulns_lists_the_devices_running_an_affected_release(
    project: Project, fleet_service: FleetService, tmp_path: Path
) -> None:
    svc = fleet_service
    for dev, version in (("d1", "1.0.0"), ("d2", "1.1.0"), ("d3", "1.0.0"), ("d4", "1.0.0")):
        cred = svc.enroll(dev)
        models = {"det": {"version": version, "counter": 1}}
        assert (
            post_report(
                svc, dev, cred, report(dev, [ev(1, "confirmed", "det", version)], models=models)
            ).status
            == 200
        )
    assert call("POST", f"{svc.url}/v1/devices/d3/revoke", token=svc.admin_token).status == 200
    (tmp_path / "osv").mkdir()
    (tmp_path / "osv" / "GHSA.json").write_text(json.dumps(OSV_HIGH))
    args = (
        "vulns",
        "--osv",
        str(tmp_path / "osv"),
        "--project",
        str(project.root_dir),
        "--fleet",
        svc.url,
    )
    env = {"OTA_FLEET_TOKEN": svc.operator_token("read")}
    code, out = _cli(*args, "--json", env=env)
    assert code == ExitCode.SECURITY
    doc = json.loads(out.split("\nerror:")[0])
    assert doc["fleet"] == {"det@1.0.0": {"devices": 2, "sample": ["d1", "d4"]}}
    code, out = _cli(*args, env=env)
    assert code == ExitCode.SECURITY and "det@1.0.0 runs on 2 devices: d1 d4" in out
    # a refused token is the operator's to fix (exit 9), not a silent "no devices"
    code, out = _cli(*args, env={"OTA_FLEET_TOKEN": "otaop_" + "A" * 43})
    assert code == ExitCode.CONFIG and "refused the token" in out
