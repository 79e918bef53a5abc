"""The real device client against the real fleet service (gunicorn, SQLite and PostgreSQL):
enrolment with a token, reports that arrive exactly once (also when an ack is lost and the
device resends), fleet status on the committed and confirmed version, credential rotation,
revocation (401, the device keeps updating with the same exit code), and a device that
cannot report as another."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from ota.client._enroll import credential_path
from ota.errors import ExitCode
from tests import http_faults
from tests.fleet_fixtures import (  # noqa: F401 - fixtures used by name
    FleetService,
    call,
    fleet_backend,
    fleet_service,
    postgres,
)
from tests.repo_helpers import publish_mlp
from tests.test_updater import base  # noqa: F401 - the shared published world
from tests.updater_world import Base, World, current_version

DEVICE = "dev-1"


@pytest.fixture
def world(base: Base, tmp_path: Path) -> Iterator[World]:
    with http_faults.serve(tmp_path / "repo") as fs:
        yield World(tmp_path, base, fs)


def ota(*args: str) -> tuple[int, str, str]:
    from ota.cli._main import _register, cli

    _register()
    r = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def enrol(w: World, svc: FleetService, state: Path, device_id: str) -> str:
    root = w.tmp / "root.json"
    root.write_bytes(w.base.trusted_root)
    code, out, err = ota(
        "device",
        "init",
        "--state-dir",
        str(state),
        "--repo-url",
        w.fs.url,
        "--root",
        str(root),
        "--device-id",
        device_id,
        "--model",
        "det",
        "--ring",
        "canary",
        "--health-timeout",
        "0",
        "--fleet-url",
        svc.url,
        "--enroll-token",
        svc.enroll_token(),
        "--json",
    )
    assert code == 0, out + err
    assert json.loads(out)["fleet"]["status"] == "enrolled"
    return credential_path(state).read_text().strip()


def detail(svc: FleetService, device_id: str) -> dict[str, Any]:
    r = call(
        "GET", f"{svc.url}/v1/devices/{device_id}?events=1000", token=svc.operator_token("read")
    )
    assert r.status == 200, r.doc
    return dict(r.doc)


def fleet_status(svc: FleetService) -> dict[str, Any]:
    code, out, err = ota("fleet", "status", "--db", svc.db_url, "--json")
    assert code == 0, out + err
    return dict(json.loads(out))


def on_version(status: dict[str, Any], version: str) -> None:
    """The fleet sees the device on ``version``, committed and confirmed."""
    assert [(m["model"], m["version"], m["devices"]) for m in status["models"]] == [
        ("det", version, 1)
    ], status["models"]
    [release] = [r for r in status["releases"] if r["version"] == version]
    assert release["confirmed"] == 1, release


def test_the_device_client_reports_to_the_real_service(
    world: World, fleet_service: FleetService
) -> None:
    svc = fleet_service
    world.use("v1")
    first = enrol(world, svc, world.device, DEVICE)

    # an update whose events stay queued, then `ota device report`
    res = world.update(report=False)
    assert res.status == "updated", res.to_dict()
    queued = json.loads((world.device / "events.json").read_bytes())
    sent = sorted(e["seq"] for e in queued["events"])
    assert len(sent) >= 5
    snapshot = world.tmp / "events.snapshot"
    shutil.copy(world.device / "events.json", snapshot)
    code, out, err = ota("device", "report", "--state-dir", str(world.device), "--json")
    assert code == 0 and json.loads(out)["status"] == "sent", out + err

    # the ack was "lost": the device still holds the batch and sends it again
    shutil.copy(snapshot, world.device / "events.json")
    code, out, err = ota("device", "report", "--state-dir", str(world.device), "--json")
    assert code == 0 and json.loads(out)["acked"] == len(sent), out + err

    d = detail(svc, DEVICE)
    stored = sorted(e["seq"] for e in d["timeline"])
    assert stored == sent  # exactly once
    assert len({e["queue"] for e in d["timeline"]}) == 1
    assert d["events_total"] == len(sent)
    assert d["models"] == {"det": {"version": "1.0.0", "counter": 1}}
    assert d["ring"] == "canary" and not d["revoked"]
    on_version(fleet_status(svc), "1.0.0")

    # rotation: the old credential stops working at once, the new one carries the reports
    code, out, err = ota("device", "rotate-credential", "--state-dir", str(world.device), "--json")
    assert code == 0 and json.loads(out)["status"] == "rotated", out + err
    second = credential_path(world.device).read_text().strip()
    assert second != first
    probe = {
        "format": "edge-ota.report/1",
        "device": {"id": DEVICE, "models": {}},
        "queue": "q-probe",
        "dropped": 0,
        "events": [],
    }
    events_url = f"{svc.url}/v1/devices/{DEVICE}/events"
    assert call("POST", events_url, probe, token=first).status == 401
    world.use("v2")
    code, out, err = ota("device", "update", "--state-dir", str(world.device), "--json")
    assert code == ExitCode.OK, out + err
    assert json.loads(out)["report"]["status"] == "sent", out
    on_version(fleet_status(svc), "1.1.0")

    # a device can report only as itself
    other = enrol(world, svc, world.tmp / "dev2", "dev-2")
    before = detail(svc, DEVICE)["events_total"]
    forged = {
        **probe,
        "events": [
            {
                "seq": 10_000,
                "time": 1.0,
                "kind": "reverted",
                "model": "det",
                "version": "1.1.0",
                "data": {},
            }
        ],
    }
    r = call("POST", events_url, forged, token=other)
    assert r.status == 401, r.doc
    assert detail(svc, DEVICE)["events_total"] == before
    assert detail(svc, DEVICE)["health"] == "ok"

    # revocation: 401 for its reports, and the device keeps updating, same exit code
    r = call("POST", f"{svc.url}/v1/devices/{DEVICE}/revoke", {}, token=svc.admin_token)
    assert r.status == 200 and r.doc["revoked"], r.doc
    publish_mlp(world.project(), "det", "1.2.0", seed=2)
    code, out, err = ota("device", "update", "--state-dir", str(world.device), "--json")
    assert code == ExitCode.OK, out + err
    doc = json.loads(out)
    assert doc["models"][0]["version"] == "1.2.0"
    assert doc["report"]["status"] == "failed" and "HTTP 401" in doc["report"]["error"]
    assert doc["report"]["pending"] > 0  # kept on the device, not thrown away
    assert current_version(world.device) == "1.2.0"
    assert detail(svc, DEVICE)["events_total"] == before
    code, out, err = ota("device", "report", "--state-dir", str(world.device))
    assert code == ExitCode.TRANSIENT and "HTTP 401" in out
