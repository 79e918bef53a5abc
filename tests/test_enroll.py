"""Device identity with the fleet service over real HTTP (``ota.client._enroll``): enrolment
spends a token once, the credential is stored 0600 and used by the report path, rotation never
loses the working credential, and every bad reply is refused with nothing stored."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from ota.client._enroll import (
    MAX_REPLY_BYTES,
    credential_path,
    ensure_enrolled,
    rotate_credential,
    transport_warnings,
)
from ota.client._state import StateDir
from ota.errors import ExitCode
from tests import http_faults
from tests.fleet_peer import FleetPeer, fleet_peer
from tests.test_updater import base  # noqa: F401 - the shared published world
from tests.updater_world import Base, World, current_version

DEVICE = "dev-1"
TOKEN = "enrol-Token-123"


@pytest.fixture
def world(base: Base, tmp_path: Path) -> Iterator[World]:  # noqa: F811
    with http_faults.serve(tmp_path / "repo") as fs:
        yield World(tmp_path, base, fs)


@pytest.fixture
def peer() -> Iterator[FleetPeer]:
    with fleet_peer() as p:
        p.tokens[TOKEN] = 1
        yield p


def ota(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    from ota.cli._main import _register, cli

    _register()
    r = CliRunner().invoke(cli, list(args), catch_exceptions=False, env=env)
    return r.exit_code, r.stdout, r.stderr


def init_args(w: World, *extra: str) -> list[str]:
    root = w.tmp / "root.json"
    root.write_bytes(w.base.trusted_root)
    return [
        "device",
        "init",
        "--state-dir",
        str(w.device),
        "--repo-url",
        w.fs.url,
        "--root",
        str(root),
        "--device-id",
        DEVICE,
        "--model",
        "det",
        "--ring",
        "canary",
        "--health-timeout",
        "0",
        *extra,
    ]


def cred(w: World) -> str:
    return credential_path(w.device).read_text().strip()


def test_enrol_once_then_reports_carry_the_credential(world: World, peer: FleetPeer) -> None:
    world.use("v1")
    code, out, err = ota(
        *init_args(world, "--fleet-url", peer.url + "/", "--enroll-token", TOKEN, "--json")
    )
    assert code == 0, out + err
    doc = json.loads(out)["fleet"]
    assert doc["status"] == "enrolled" and doc["fleet_url"] == peer.url
    assert "warning" not in err  # loopback http is not warned about
    path = credential_path(world.device)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert cred(world) == peer.credentials[DEVICE]
    assert peer.tokens[TOKEN] == 0
    facts = peer.enrolled_facts[DEVICE]
    assert facts["ring"] == "canary" and set(facts) == {
        "ring",
        "tier",
        "arch",
        "runtime_version",
        "client_version",
    }
    cfg = StateDir(world.device).load_config()
    assert cfg.report_url == peer.url and Path(cfg.report_token_file) == path.absolute()

    # a re-run of init keeps the credential and spends no token (the token is used up)
    code, out, err = ota(
        *init_args(world, "--fleet-url", peer.url, "--enroll-token", TOKEN, "--json")
    )
    assert code == 0, out + err
    assert json.loads(out)["fleet"]["status"] == "already"

    code, out, err = ota("device", "update", "--state-dir", str(world.device), "--json")
    assert code == ExitCode.OK, out + err
    assert json.loads(out)["report"]["status"] == "sent"
    assert peer.requests[-1]["headers"]["Authorization"] == f"Bearer {cred(world)}"
    assert "confirmed" in peer.kinds(DEVICE)


@pytest.mark.parametrize(
    ("setup", "code", "message"),
    [
        ("used-up", ExitCode.CONFIG, "HTTP 401"),
        ("taken", ExitCode.CONFLICT, "already enrolled"),
        ("no-token", ExitCode.CONFIG, "not enrolled"),
    ],
)
def test_a_refused_enrolment_stores_nothing(
    world: World, peer: FleetPeer, setup: str, code: int, message: str
) -> None:
    if setup == "used-up":
        peer.tokens[TOKEN] = 0
    if setup == "taken":
        peer.credentials[DEVICE] = "x" * 43
    args = ["--fleet-url", peer.url] + ([] if setup == "no-token" else ["--enroll-token", TOKEN])
    got, out, err = ota(*init_args(world, *args))
    assert got == code and message in err, (got, out, err)
    assert not credential_path(world.device).exists()
    assert not (world.device / "device.json").exists()  # no config pointing at nothing


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ((201, b"<html>"), "not JSON"),
        ((201, b"[" * 4000 + b"]" * 4000), "not JSON"),
        ((201, b"[1, 2]"), "not a JSON object"),
        ((201, b'{"credential": 12345}'), "no valid credential"),
        ((201, b'{"credential": "short"}'), "no valid credential"),
        ((201, json.dumps({"credential": "a b" * 20}).encode()), "no valid credential"),
        (
            (201, json.dumps({"credential": "c" * 43, "device_id": "other"}).encode()),
            "another device id",
        ),
        ((201, b" " * (MAX_REPLY_BYTES + 1)), "over"),
        ((302, b""), "HTTP 302"),
    ],
)
def test_a_bad_enrolment_reply_is_refused(
    world: World, peer: FleetPeer, reply: tuple[int, bytes], message: str
) -> None:
    peer.replies = [reply]
    got, out, err = ota(*init_args(world, "--fleet-url", peer.url, "--enroll-token", TOKEN))
    assert got == ExitCode.SECURITY and message in err, (got, out, err)
    assert not credential_path(world.device).exists()


def test_network_and_input_errors_have_their_exit_codes(world: World, peer: FleetPeer) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    got, _, err = ota(*init_args(world, "--fleet-url", closed, "--enroll-token", TOKEN))
    assert got == ExitCode.TRANSIENT and "cannot reach" in err
    peer.replies = [(503, b"")]
    got, _, err = ota(*init_args(world, "--fleet-url", peer.url, "--enroll-token", TOKEN))
    assert got == ExitCode.TRANSIENT and "HTTP 503" in err
    got, _, err = ota(*init_args(world, "--fleet-url", "ftp://x", "--enroll-token", TOKEN))
    assert got == ExitCode.INPUT
    got, _, err = ota(*init_args(world, "--fleet-url", peer.url, "--enroll-token", "a b"))
    assert got == ExitCode.INPUT and "printable word" in err
    got, _, err = ota(
        *init_args(
            world, "--fleet-url", peer.url, "--report-url", peer.url, "--enroll-token", TOKEN
        )
    )
    assert got == ExitCode.USAGE
    assert peer.tokens[TOKEN] == 1 and not credential_path(world.device).exists()
    # the token can also come from the environment (not visible in `ps`)
    got, out, err = ota(*init_args(world, "--fleet-url", peer.url), env={"OTA_ENROLL_TOKEN": TOKEN})
    assert got == 0, out + err


def test_plain_http_to_a_remote_host_is_warned_about() -> None:
    assert transport_warnings("https://fleet.example") == ()
    assert transport_warnings("http://127.0.0.1:80") == ()
    assert transport_warnings("http://[::1]:80") == ()
    assert transport_warnings("http://localhost") == ()
    [warning] = transport_warnings("http://fleet.example")
    assert "unencrypted" in warning


def _enrolled(world: World, peer: FleetPeer) -> str:
    world.use("v1")
    got, out, err = ota(*init_args(world, "--fleet-url", peer.url, "--enroll-token", TOKEN))
    assert got == 0, out + err
    return cred(world)


def test_rotation_replaces_the_credential_and_the_old_one_stops_working(
    world: World, peer: FleetPeer
) -> None:
    old = _enrolled(world, peer)
    got, out, err = ota("device", "rotate-credential", "--state-dir", str(world.device), "--json")
    assert got == 0 and json.loads(out)["status"] == "rotated", out + err
    new = cred(world)
    assert new != old and peer.credentials[DEVICE] == new
    assert stat.S_IMODE(credential_path(world.device).stat().st_mode) == 0o600
    assert peer.requests[-1]["headers"]["Authorization"] == f"Bearer {old}"
    res = world.update()
    assert res.status == "updated" and res.report is not None, res.to_dict()
    assert res.report.status == "sent"
    assert peer.requests[-1]["headers"]["Authorization"] == f"Bearer {new}"


@pytest.mark.parametrize("honour", [True, False])
def test_a_lost_rotation_reply_never_loses_the_working_credential(
    world: World, peer: FleetPeer, honour: bool
) -> None:
    """The service commits the rotation, the reply is lost: the next rotation recovers when the
    service stored the device's proposal; a service that ignores proposals cannot be recovered
    from (documented), and the device says so instead of corrupting its files."""
    _enrolled(world, peer)
    peer.honour_proposal = honour
    peer.lose_rotation_replies = 1
    got, _, err = ota("device", "rotate-credential", "--state-dir", str(world.device))
    assert got == ExitCode.TRANSIENT and "HTTP 504" in err
    pending = (credential_path(world.device).parent / "credential.next").read_text().strip()
    got, out, err = ota("device", "rotate-credential", "--state-dir", str(world.device), "--json")
    if honour:
        assert got == 0 and json.loads(out)["status"] == "resumed", out + err
        assert cred(world) == peer.credentials[DEVICE]
        assert not (credential_path(world.device).parent / "credential.next").exists()
        assert pending == cred(world)
        res = world.update()
        assert res.report is not None and res.report.status == "sent", res.to_dict()
        assert peer.requests[-1]["headers"]["Authorization"] == f"Bearer {pending}"
    else:
        assert got == ExitCode.CONFIG and "re-enrol" in err


def test_a_revoked_device_keeps_updating(world: World, peer: FleetPeer) -> None:
    _enrolled(world, peer)
    peer.revoked.add(DEVICE)
    got, _, err = ota("device", "rotate-credential", "--state-dir", str(world.device))
    assert got == ExitCode.CONFIG and "HTTP 401" in err
    before = cred(world)
    res = world.update()
    assert res.status == "updated" and res.exit_code == ExitCode.OK, res.to_dict()
    assert current_version(world.device) == "1.0.0"
    assert res.report is not None and res.report.status == "failed"
    assert "HTTP 401" in res.report.error
    assert cred(world) == before  # nothing thrown away


def test_rotation_needs_an_enrolment(world: World, peer: FleetPeer) -> None:
    world.use("v1")
    world.init(report_url=peer.url)
    with pytest.raises(Exception, match="no fleet credential"):
        rotate_credential(world.device)


def test_a_stolen_state_dir_copy_cannot_enrol_as_another_device(
    world: World, peer: FleetPeer
) -> None:
    """The enrolment record binds the credential to the fleet URL and device id: re-init under
    another id does not reuse the credential; it needs a token of its own."""
    _enrolled(world, peer)
    from ota.client._state import DeviceConfig

    cfg = DeviceConfig(device_id="dev-2", repo_url=world.fs.url, models=("det",))
    with pytest.raises(Exception, match="not enrolled"):
        ensure_enrolled(world.device, cfg, peer.url, None)
    assert os.stat(credential_path(world.device)).st_size > 43


def test_after_a_yank_revert_the_report_says_what_the_device_runs(
    world: World, peer: FleetPeer
) -> None:
    """The committed state keeps the highest release as the downgrade floor; the fleet must be
    told the release the device runs (the reverted-to one), or its status would be wrong."""
    from ota.repository import yank
    from tests.repo_helpers import publish_mlp

    world.committed_at("v1")
    publish_mlp(world.project(), "det", "1.2.0", seed=2)
    assert world.update().status == "updated"
    yank(world.project(), "det", "1.2.0")
    world.init(report_url=peer.url)
    res = world.update()
    assert res.status == "yank_reverted" and res.report is not None, res.to_dict()
    assert res.report.status == "sent", res.to_dict()
    assert current_version(world.device) == "1.0.0"
    body = json.loads(peer.requests[-1]["body"])
    assert body["device"]["models"] == {"det": {"version": "1.0.0", "counter": 1}}


def test_enrolment_and_reporting_import_no_server_dependencies() -> None:
    """``ota device init --fleet-url`` and the report path run on devices that installed only
    the client: flask, sqlalchemy, prometheus-client and the fleet service stay out."""
    import subprocess
    import sys

    probe = (
        "import importlib.abc, sys\n"
        "BLOCKED = ('flask', 'sqlalchemy', 'prometheus_client', 'psycopg', 'gunicorn',"
        " 'alembic', 'werkzeug')\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED or name.startswith('ota.fleet'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (blocked)')\n"
        "        return None\n"
        "sys.meta_path.insert(0, Block())\n"
        "import ota.client._enroll, ota.client._report, ota.cli._device_cmds\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_enrol_proposal_is_stored_before_asking_and_reused_by_the_retry(
    world: World, peer: FleetPeer
) -> None:
    """The proposal is on disk (0600) before the request leaves; a failed attempt keeps it
    and the next run sends the very same one (so a service that committed can answer the
    enrolment again); success removes it. Another device id or fleet URL gets a fresh one."""
    world.use("v1")
    pending = credential_path(world.device).parent / "enrolment.next"
    seen: list[str] = []

    def on_request() -> None:  # runs while the request is at the service
        seen.append(json.loads(pending.read_text())["credential"])

    peer.on_request = on_request
    peer.replies = [(503, b"")]
    got, out, err = ota(*init_args(world, "--fleet-url", peer.url, "--enroll-token", TOKEN))
    assert got == ExitCode.TRANSIENT, out + err
    assert stat.S_IMODE(pending.stat().st_mode) == 0o600
    first = json.loads(peer.requests[-1]["body"])["credential_proposal"]
    assert seen == [first] and first.startswith("otadev_") and len(first) == 50

    got, out, err = ota(*init_args(world, "--fleet-url", peer.url, "--enroll-token", TOKEN))
    assert got == 0, out + err
    assert json.loads(peer.requests[-1]["body"])["credential_proposal"] == first
    assert not pending.exists()

    from ota.client._enroll import _enrol_proposal

    again = _enrol_proposal(world.device, peer.url, DEVICE)
    assert _enrol_proposal(world.device, peer.url, DEVICE) == again  # stored, reused
    assert _enrol_proposal(world.device, peer.url, "dev-2") != again
    assert _enrol_proposal(world.device, peer.url + "/x", "dev-2") != again


def test_an_older_service_without_proposals_still_enrols(world: World, peer: FleetPeer) -> None:
    """A service that refuses the unknown field (400 naming it) gets the older request."""
    world.use("v1")
    peer.replies = [
        (
            400,
            b'{"error": "malformed", "message": "the request has unknown fields: '
            b'credential_proposal"}',
        )
    ]
    got, out, err = ota(*init_args(world, "--fleet-url", peer.url, "--enroll-token", TOKEN))
    assert got == 0, out + err
    assert "credential_proposal" not in json.loads(peer.requests[-1]["body"])
    assert cred(world) == peer.credentials[DEVICE]


def test_a_credential_taken_refusal_drops_the_proposal(world: World, peer: FleetPeer) -> None:
    world.use("v1")
    pending = credential_path(world.device).parent / "enrolment.next"
    peer.replies = [(409, b'{"error": "credential_taken", "message": "not fresh"}')]
    got, out, err = ota(*init_args(world, "--fleet-url", peer.url, "--enroll-token", TOKEN))
    assert got == ExitCode.CONFLICT and "not fresh" in err, out + err
    first = json.loads(peer.requests[-1]["body"])["credential_proposal"]
    assert not pending.exists() and not credential_path(world.device).exists()
    got, out, err = ota(*init_args(world, "--fleet-url", peer.url, "--enroll-token", TOKEN))
    assert got == 0, out + err
    assert json.loads(peer.requests[-1]["body"])["credential_proposal"] != first
