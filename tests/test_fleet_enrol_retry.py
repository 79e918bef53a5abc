"""Crash-safe, idempotent enrolment and rotation against the real fleet service (gunicorn,
SQLite and PostgreSQL) over real HTTP.

The device stores a proposed credential (``enrolment.next``) before ``POST /v1/enroll``; when
the service commits and the reply is lost (here a proxy between the device and the service
forwards the request, lets the service answer, and hangs up instead of passing the answer on),
re-running ``ota device init`` with the same token enrols the device: one device row, one
token use spent. A replay with another proposal stays 409, a proposal cannot be another
device's credential, and a rotation left pending is finished by the next report or init."""

from __future__ import annotations

import json
import secrets
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import urllib3
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
from tests.test_enroll import init_args
from tests.test_updater import base  # noqa: F401 - the shared published world
from tests.updater_world import Base, World

DEVICE = "dev-1"
FACTS = {
    "ring": "ga",
    "tier": "default",
    "arch": "x86_64",
    "runtime_version": "1.31.1",
    "client_version": "0.1.0",
}


# --- a proxy that loses replies ----------------------------------------------------------------


@dataclass
class LossyProxy:
    """Forwards every request to ``upstream``; a request whose path contains a key of
    ``drop`` reaches the service, but its answer is swallowed and the connection closed
    (``drop[key]`` times). ``log`` holds (method, path, status the service answered, dropped)."""

    upstream: str
    drop: dict[str, int] = field(default_factory=dict)
    log: list[tuple[str, str, int, bool]] = field(default_factory=list)
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, path: str) -> bool:
        with self.lock:
            for key, left in self.drop.items():
                if key in path and left > 0:
                    self.drop[key] = left - 1
                    return True
        return False


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _forward(self) -> None:
        proxy = self.server.proxy
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {
            k: v
            for k, v in self.headers.items()
            if k.lower() in ("content-type", "authorization", "accept")
        }
        r = self.server.pool.request(
            self.command, proxy.upstream + self.path, body=body, headers=headers, redirect=False
        )
        dropped = proxy.take(self.path)
        with proxy.lock:
            proxy.log.append((self.command, self.path, r.status, dropped))
        if dropped:  # the service committed; its answer never reaches the device
            self.close_connection = True
            return
        self.send_response(r.status)
        for k, v in r.headers.items():
            if k.lower() in ("content-type", "retry-after", "www-authenticate"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(r.data)))
        self.end_headers()
        self.wfile.write(r.data)

    do_GET = _forward
    do_POST = _forward


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    proxy: LossyProxy
    pool: urllib3.PoolManager

    def handle_error(self, request: object, client_address: object) -> None:
        pass


@contextmanager
def lossy_proxy(upstream: str) -> Iterator[LossyProxy]:
    proxy = LossyProxy(upstream)
    server = _Server(("127.0.0.1", 0), _Handler)
    server.proxy = proxy
    server.pool = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(30, 60))
    proxy.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
        server.pool.clear()


# --- helpers -----------------------------------------------------------------------------------


@pytest.fixture
def world(base: Base, tmp_path: Path) -> Iterator[World]:
    with http_faults.serve(tmp_path / "repo") as fs:
        yield World(tmp_path, base, fs)


def ota(*args: str) -> tuple[int, str, str]:
    from ota.cli._main import _register, cli

    _register()
    r = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def init(w: World, fleet_url: str, token: str) -> tuple[int, str, str]:
    return ota(*init_args(w, "--fleet-url", fleet_url, "--enroll-token", token, "--json"))


def fleet_file(w: World, name: str) -> Path:
    return credential_path(w.device).parent / name


def token_uses(svc: FleetService, token: str) -> int:
    r = call("GET", f"{svc.url}/v1/enroll-tokens", token=svc.admin_token)
    assert r.status == 200, r.doc
    [uses] = [t["uses"] for t in r.doc["tokens"] if t["name"] == token_name(svc, token)]
    return int(uses)


_names: dict[str, str] = {}


def new_token(svc: FleetService, uses: int = 1) -> str:
    name = f"enr-{secrets.token_hex(4)}"
    token = svc.enroll_token(name=name, uses=uses)
    _names[token] = name
    return token


def token_name(svc: FleetService, token: str) -> str:
    return _names[token]


def enrol_call(svc: FleetService, token: str, device_id: str, proposal: str | None) -> Any:
    doc: dict[str, Any] = {"token": token, "device_id": device_id, "facts": FACTS}
    if proposal is not None:
        doc["credential_proposal"] = proposal
    return call("POST", f"{svc.url}/v1/enroll", doc)


def device_ids(svc: FleetService) -> list[str]:
    r = call("GET", f"{svc.url}/v1/devices?limit=1000", token=svc.admin_token)
    assert r.status == 200, r.doc
    return [d["device_id"] for d in r.doc["devices"]]


def enrol_audits(svc: FleetService, device_id: str) -> int:
    r = call("GET", f"{svc.url}/v1/audit?limit=1000", token=svc.admin_token)
    assert r.status == 200, r.doc
    return sum(
        1 for a in r.doc["records"] if a["action"] == "device.enroll" and a["target"] == device_id
    )


def proposal() -> str:
    return "otadev_" + secrets.token_urlsafe(32)


# --- tests -------------------------------------------------------------------------------------


def test_a_lost_enrol_reply_is_recovered_by_rerunning_init(
    world: World, fleet_service: FleetService
) -> None:
    svc = fleet_service
    world.use("v1")
    token = new_token(svc, uses=2)  # a second use spent by the retry would show
    with lossy_proxy(svc.url) as proxy:
        proxy.drop["/v1/enroll"] = 1
        code, out, err = init(world, proxy.url, token)
        assert code == ExitCode.TRANSIENT, (code, out, err)
        # the service did commit the enrolment; the device never heard of it
        assert [(m, p, st) for m, p, st, d in proxy.log if d] == [("POST", "/v1/enroll", 201)]
        assert not credential_path(world.device).exists()
        assert not (world.device / "device.json").exists()
        pending = fleet_file(world, "enrolment.next")
        assert stat.S_IMODE(pending.stat().st_mode) == 0o600
        proposed = json.loads(pending.read_text())["credential"]
        assert device_ids(svc) == [DEVICE] and token_uses(svc, token) == 1

        code, out, err = init(world, proxy.url, token)
        assert code == 0, out + err
        assert json.loads(out)["fleet"]["status"] == "enrolled"
        assert proxy.log[-1][1:3] == ("/v1/enroll", 200)  # the replay, not a new enrolment
        cred = credential_path(world.device).read_text().strip()
        assert cred == proposed
        assert stat.S_IMODE(credential_path(world.device).stat().st_mode) == 0o600
        assert not pending.exists()
        assert device_ids(svc) == [DEVICE]
        assert token_uses(svc, token) == 1  # consumed once
        assert enrol_audits(svc, DEVICE) == 1

        # the credential works: the device reports through it
        res = world.update()
        assert res.report is not None and res.report.status == "sent", res.to_dict()


def test_a_crash_after_the_credential_was_written_is_recovered_too(
    world: World, fleet_service: FleetService
) -> None:
    """A crash after the credential was stored but before the enrolment record: the re-run
    replays the enrolment with the proposal still on disk (200), no second token use."""
    svc = fleet_service
    world.use("v1")
    token = new_token(svc)
    code, out, err = init(world, svc.url, token)
    assert code == 0, out + err
    cred = credential_path(world.device).read_text().strip()
    # put the device back to "credential written, record not yet, proposal still there"
    fleet_file(world, "enrolment.json").unlink()
    record = {
        "format": "edge-ota.enrolment-proposal/1",
        "fleet_url": svc.url,
        "device_id": DEVICE,
        "credential": cred,
    }
    fleet_file(world, "enrolment.next").write_text(json.dumps(record))
    code, out, err = init(world, svc.url, token)  # the one-use token is used up by now
    assert code == 0, out + err
    assert json.loads(out)["fleet"]["status"] == "enrolled"
    assert credential_path(world.device).read_text().strip() == cred
    assert token_uses(svc, token) == 1 and device_ids(svc) == [DEVICE]
    assert not fleet_file(world, "enrolment.next").exists()


def test_a_replay_is_answered_only_for_the_same_proposal_and_token(
    fleet_service: FleetService,
) -> None:
    svc = fleet_service
    token = new_token(svc)
    mine = proposal()
    first = enrol_call(svc, token, DEVICE, mine)
    assert first.status == 201 and first.doc["credential"] == mine, first.doc
    again = enrol_call(svc, token, DEVICE, mine)
    assert again.status == 200 and again.doc == first.doc  # the same answer, token used up
    assert token_uses(svc, token) == 1

    # another proposal for the enrolled device: 409, nothing changed
    other = enrol_call(svc, token, DEVICE, proposal())
    assert other.status == 409 and other.doc["error"] == "already_enrolled", other.doc
    # the same proposal with another (valid) token: 409, that token's use is not spent
    token2 = new_token(svc)
    r = enrol_call(svc, token2, DEVICE, mine)
    assert r.status == 409 and r.doc["error"] == "already_enrolled", r.doc
    assert token_uses(svc, token2) == 0
    # no proposal at all (the older request shape) replays nothing either
    r = enrol_call(svc, token, DEVICE, None)
    assert r.status == 409, r.doc
    # a token that is not valid gets nothing, not even a hint
    r = enrol_call(svc, "otaenr_" + "A" * 43, DEVICE, mine)
    assert r.status == 401, r.doc
    # the credential is still the first proposal: it authenticates the device
    rot = call(
        "POST", f"{svc.url}/v1/devices/{DEVICE}/credential", {"credential": proposal()}, token=mine
    )
    assert rot.status == 200, rot.doc
    # after a rotation the old proposal no longer replays the enrolment
    r = enrol_call(svc, token, DEVICE, mine)
    assert r.status == 409, r.doc
    # the token revoked: a replay (even of the current credential) is refused
    current = rot.doc["credential"]
    revoke = call(
        "POST",
        f"{svc.url}/v1/enroll-tokens/{token_name(svc, token)}/revoke",
        {},
        token=svc.admin_token,
    )
    assert revoke.status == 200, revoke.doc
    r = enrol_call(svc, token, DEVICE, current)
    assert r.status == 401, r.doc
    assert device_ids(svc) == [DEVICE] and enrol_audits(svc, DEVICE) == 1


def test_a_proposal_cannot_be_another_devices_credential(fleet_service: FleetService) -> None:
    svc = fleet_service
    taken = proposal()
    assert enrol_call(svc, new_token(svc), DEVICE, taken).status == 201
    token2 = new_token(svc)
    r = enrol_call(svc, token2, "dev-2", taken)
    assert r.status == 409 and r.doc["error"] == "credential_taken", r.doc
    assert token_uses(svc, token2) == 0 and device_ids(svc) == [DEVICE]
    # the old shape still works, and a fresh proposal too
    r = enrol_call(svc, token2, "dev-2", None)
    assert r.status == 201 and r.doc["credential"].startswith("otadev_"), r.doc
    assert enrol_call(svc, new_token(svc), "dev-3", proposal()).status == 201

    # a revoked device may re-enrol, but its dead credential stays dead
    r = call("POST", f"{svc.url}/v1/devices/{DEVICE}/revoke", {}, token=svc.admin_token)
    assert r.status == 200, r.doc
    token3 = new_token(svc)
    r = enrol_call(svc, token3, DEVICE, taken)
    assert r.status == 409 and r.doc["error"] == "credential_taken", r.doc
    assert token_uses(svc, token3) == 0
    fresh = proposal()
    r = enrol_call(svc, token3, DEVICE, fresh)
    assert r.status == 201 and r.doc["credential"] == fresh, r.doc

    # malformed proposals: 400, nothing spent
    token4 = new_token(svc)
    for bad in ("", "short", "a b" * 20, "x" * 600, 12345, None):
        r = call(
            "POST",
            f"{svc.url}/v1/enroll",
            {"token": token4, "device_id": "dev-4", "credential_proposal": bad},
        )
        assert r.status == 400 and r.doc["error"] == "malformed", (bad, r.doc)
    assert token_uses(svc, token4) == 0 and "dev-4" not in device_ids(svc)


@pytest.mark.parametrize(
    ("cut", "finish"),
    [("reply_lost", "report"), ("reply_lost", "init"), ("never_sent", "report")],
)
def test_a_pending_rotation_is_finished_without_the_operator(
    world: World, fleet_service: FleetService, cut: str, finish: str
) -> None:
    """``reply_lost``: the service rotated to the proposal and the reply was lost;
    ``never_sent``: the device crashed after storing the proposal. Either way the next report
    (or init re-run) finishes the rotation, and the report carries the credential the service
    holds; the old credential is dead afterwards."""
    svc = fleet_service
    world.use("v1")
    token = new_token(svc)
    with lossy_proxy(svc.url) as proxy:
        code, out, err = init(world, proxy.url, token)
        assert code == 0, out + err
        old = credential_path(world.device).read_text().strip()
        if cut == "reply_lost":
            proxy.drop["/credential"] = 1
            code, out, err = ota("device", "rotate-credential", "--state-dir", str(world.device))
            assert code == ExitCode.TRANSIENT, (code, out, err)
            assert [(p, st) for _, p, st, d in proxy.log if d] == [
                (f"/v1/devices/{DEVICE}/credential", 200)
            ]
        else:
            fleet_file(world, "credential.next").write_text(proposal() + "\n")
            fleet_file(world, "credential.next").chmod(0o600)
        pending = fleet_file(world, "credential.next").read_text().strip()
        assert credential_path(world.device).read_text().strip() == old  # kept meanwhile

        if finish == "report":
            res = world.update()
            assert res.report is not None and res.report.status == "sent", res.to_dict()
        else:
            code, out, err = init(world, proxy.url, token)
            assert code == 0, out + err
            assert json.loads(out)["fleet"]["status"] == "already"
            assert "warning" not in err
        assert credential_path(world.device).read_text().strip() == pending
        assert stat.S_IMODE(credential_path(world.device).stat().st_mode) == 0o600
        assert not fleet_file(world, "credential.next").exists()
        if finish == "init":
            res = world.update()
            assert res.report is not None and res.report.status == "sent", res.to_dict()
    # the service holds the new credential, and the old one is dead
    probe = {"credential": proposal()}
    r = call("POST", f"{svc.url}/v1/devices/{DEVICE}/credential", probe, token=old)
    assert r.status == 401, r.doc


def test_a_pending_rotation_of_a_revoked_device_loses_nothing(
    world: World, fleet_service: FleetService
) -> None:
    """Both secrets refused (revoked): the report fails as before, the update stands, the
    working credential and the pending proposal are both kept."""
    svc = fleet_service
    world.use("v1")
    code, out, err = init(world, svc.url, new_token(svc))
    assert code == 0, out + err
    old = credential_path(world.device).read_text().strip()
    fleet_file(world, "credential.next").write_text(proposal() + "\n")
    pending = fleet_file(world, "credential.next").read_text()
    r = call("POST", f"{svc.url}/v1/devices/{DEVICE}/revoke", {}, token=svc.admin_token)
    assert r.status == 200, r.doc
    res = world.update()
    assert res.status == "updated" and res.exit_code == ExitCode.OK, res.to_dict()
    assert res.report is not None and res.report.status == "failed"
    assert "HTTP 401" in res.report.error
    assert credential_path(world.device).read_text().strip() == old
    assert fleet_file(world, "credential.next").read_text() == pending
