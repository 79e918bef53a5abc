"""Store and forward: the device's events reach the fleet service over real HTTP, at least once,
in order, bounded, and a fleet service that is down or misbehaves never touches an update."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from ota.client import confirm, report_events, status
from ota.client._device import Device
from ota.client._report import MAX_BATCH, MAX_REPLY_BYTES, flush_events
from ota.errors import ConfigError, ExitCode
from tests import http_faults
from tests.fleet_peer import FleetPeer, fleet_peer
from tests.test_updater import base  # noqa: F401 - the shared published world
from tests.updater_world import FAST, Base, World, current_version

DEVICE = "dev-1"


@pytest.fixture
def world(base: Base, tmp_path: Path) -> Iterator[World]:  # noqa: F811
    with http_faults.serve(tmp_path / "repo") as fs:
        yield World(tmp_path, base, fs)


@pytest.fixture
def peer() -> Iterator[FleetPeer]:
    with fleet_peer() as p:
        yield p


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _pending(w: World) -> list[int]:
    return [e.seq for e in Device(w.device).events.pending()]


def test_events_reach_the_fleet_service_after_an_update(world: World, peer: FleetPeer) -> None:
    world.use("v1")
    world.init(report_url=peer.url + "/")
    res = world.update()
    assert res.status == "updated", res.to_dict()
    assert res.report is not None and res.report.status == "sent", res.to_dict()
    kinds = peer.kinds(DEVICE)
    for kind in ("downloaded", "staged", "smoke_passed", "committed", "confirmed"):
        assert kind in kinds, kinds
    assert kinds.index("staged") < kinds.index("committed") < kinds.index("confirmed")
    assert _pending(world) == [] and status(world.device).pending_events == 0
    [request] = peer.requests
    assert request["path"] == f"/v1/devices/{DEVICE}/events"
    assert request["headers"]["Content-Type"] == "application/json"
    body = json.loads(request["body"])
    assert body["format"] == "edge-ota.report/1" and body["dropped"] == 0
    assert body["device"]["id"] == DEVICE and body["device"]["ring"] == "canary"
    assert body["device"]["models"] == {"det": {"version": "1.0.0", "counter": 1}}
    seqs = [e["seq"] for e in body["events"]]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert "report" in res.to_dict() and res.to_dict()["report"]["acked"] == len(seqs)


def test_an_unreachable_fleet_service_never_fails_an_update(
    world: World, peer: FleetPeer
) -> None:
    world.use("v1")
    world.init(report_url=_closed_port_url())
    res = world.update()
    assert res.status == "updated" and res.exit_code == ExitCode.OK, res.to_dict()
    assert res.report is not None and res.report.status == "failed"
    assert "cannot reach the fleet service" in res.report.error
    kept = _pending(world)
    assert kept and res.report.pending == len(kept)
    assert current_version(world.device) == "1.0.0"
    # the service comes back (re-init keeps state and queue): everything arrives, once each
    world.init(report_url=peer.url)
    out = report_events(world.device, fetch_config=FAST)
    assert out.status == "sent" and out.acked == len(kept)
    assert peer.seqs() == kept
    assert _pending(world) == []


def test_5xx_is_retried_a_bounded_number_of_times(world: World, peer: FleetPeer) -> None:
    world.committed_at("v1")
    world.init(report_url=peer.url)  # events of the first install are still queued
    peer.replies = [(503, b"busy"), (502, b"")]
    out = report_events(world.device, fetch_config=FAST)  # FAST: 2 retries
    assert out.status == "sent" and len(peer.requests) == 3
    peer.replies = [(503, b"")] * 6
    world.use("v2")
    res = world.update()  # the cycle's own report: 1 + 2 retries, then it gives up
    assert res.status == "updated" and res.report is not None, res.to_dict()
    assert res.report.status == "failed" and "HTTP 503" in res.report.error
    before = _pending(world)
    out = report_events(world.device, fetch_config=FAST)
    assert out.status == "failed" and "HTTP 503" in out.error
    assert len(peer.requests) == 3 + 3 + 3
    assert _pending(world) == before


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        ((200, b"<html>ok</html>"), "not JSON"),
        ((200, b"[" * 8000 + b"]" * 8000), "not JSON"),  # used to crash update_once
        ((200, b'{"ack": true}'), "not a sequence number"),
        ((200, b'{"ack": -1}'), "not a sequence number"),
        ((200, b'{"ack": 1000000000}'), "beyond"),
        ((200, b'{"ack": 0}'), "acknowledged none"),
        ((200, b" " * (MAX_REPLY_BYTES + 1)), "too large"),
        ((401, b"who are you"), "HTTP 401"),
        ((404, b""), "HTTP 404"),
    ],
)
def test_a_bad_reply_acknowledges_nothing(
    world: World, peer: FleetPeer, reply: tuple[int, bytes], error: str
) -> None:
    world.committed_at("v1")
    world.init(report_url=peer.url)
    before = _pending(world)
    peer.replies = [reply]
    out = report_events(world.device, fetch_config=FAST)
    assert out.status == "failed" and error in out.error, out
    assert _pending(world) == before
    assert len(peer.requests) == 1  # not retried: the answer was not a transient one


def test_partial_acks_resend_the_rest(world: World, peer: FleetPeer) -> None:
    world.committed_at("v1")
    world.init(report_url=peer.url)
    before = _pending(world)
    peer.replies = [(200, json.dumps({"ack": before[1]}).encode())]
    out = report_events(world.device, fetch_config=FAST)
    assert out.status == "sent" and out.acked == len(before)
    assert len(peer.requests) == 2
    resent = [e["seq"] for e in json.loads(peer.requests[1]["body"])["events"]]
    assert resent == before[2:]


def test_a_full_queue_reports_its_drops_then_drains_in_bounded_batches(
    world: World, peer: FleetPeer
) -> None:
    world.committed_at("v1")
    world.init(report_url=peer.url)
    dev = Device(world.device)
    for i in range(dev.events.max_events + 40):
        dev.events.append("checked", "det", "1.0.0", i=i)
    assert dev.events.dropped > 0
    dropped = dev.events.dropped
    out = report_events(world.device, fetch_config=FAST)
    assert out.status == "sent" and out.acked == dev.events.max_events
    bodies = [json.loads(r["body"]) for r in peer.requests]
    assert all(len(b["events"]) <= MAX_BATCH for b in bodies)
    assert len(bodies) == -(-dev.events.max_events // MAX_BATCH)
    assert bodies[0]["dropped"] == dropped and all(b["dropped"] == 0 for b in bodies[1:])
    assert dev.events.dropped == 0 and dev.events.pending() == []


def test_the_token_is_sent_and_a_bad_token_file_is_a_config_error(
    world: World, peer: FleetPeer
) -> None:
    token = world.tmp / "token"
    token.write_text("s3cr3t-T0ken\n")
    world.use("v1")
    world.init(report_url=peer.url, report_token_file=str(token))
    assert world.update().report.status == "sent"
    assert peer.requests[0]["headers"]["Authorization"] == "Bearer s3cr3t-T0ken"
    token.write_text("two words")
    world.use("v2")
    res = world.update()
    assert res.status == "updated", res.to_dict()  # the update stands
    assert res.report is not None and res.report.status == "failed"
    assert "not one printable word" in res.report.error
    with pytest.raises(ConfigError):
        report_events(world.device)


def test_ota_device_report_exit_codes(world: World, peer: FleetPeer) -> None:
    from ota.cli._main import _register, cli

    _register()

    def ota(*args: str) -> tuple[int, str]:
        r = CliRunner().invoke(cli, ["device", *args], catch_exceptions=False)
        return r.exit_code, r.output

    world.committed_at("v1")
    code, out = ota("report", "--state-dir", str(world.device))
    assert code == ExitCode.CONFIG and "no report URL" in out
    world.init(report_url=_closed_port_url())
    code, out = ota("report", "--state-dir", str(world.device), "--json")
    assert code == ExitCode.TRANSIENT and json.loads(out)["status"] == "failed"
    world.init(report_url=peer.url)
    code, out = ota("report", "--state-dir", str(world.device))
    assert code == ExitCode.OK and "events sent" in out
    code, out = ota("report", "--state-dir", str(world.device))
    assert code == ExitCode.OK and "events nothing" in out


def test_the_lock_is_free_while_the_fleet_service_is_asked(world: World, peer: FleetPeer) -> None:
    """Reporting never holds the state-dir lock during a request (review finding: a slow
    service held it for up to 90 s, so the app's ``confirm`` failed and a good release was
    reverted when its health window expired)."""
    import filelock

    seen: list[bool] = []

    def lock_is_free() -> None:
        try:
            with filelock.FileLock(str(world.device / ".lock"), timeout=0):
                seen.append(True)
        except filelock.Timeout:
            seen.append(False)

    world.use("v1")
    world.init(report_url=peer.url, health_timeout_s=60)
    peer.on_request = lock_is_free
    res = world.update()
    assert res.status == "pending_confirmation" and res.report is not None
    assert res.report.status == "sent" and seen == [True], (res.to_dict(), seen)
    assert confirm(world.device).status == "confirmed"


def test_a_slow_fleet_service_is_cut_at_the_flush_deadline(world: World, peer: FleetPeer) -> None:
    import time

    world.committed_at("v1")
    world.init(report_url=peer.url)
    before = _pending(world)
    peer.replies = [("slow", 600.0)]  # never answers within the test
    dev = Device(world.device)
    t0 = time.monotonic()
    out = flush_events(dev, FAST, deadline_s=1.0)
    assert time.monotonic() - t0 < 120.0  # cut at the deadline (generous: a loaded machine)
    assert out.status == "failed" and out.error, out
    assert _pending(world) == before


def test_a_lost_queue_starts_a_new_epoch_so_restarted_seqs_are_not_deduplicated_away(
    world: World, peer: FleetPeer
) -> None:
    world.use("v1")
    world.init(report_url=peer.url)
    assert world.update().report.status == "sent"
    first = json.loads(peer.requests[-1]["body"])
    (world.device / "events.json").unlink()  # lost (or the state dir re-provisioned)
    Device(world.device).events.append("checked", "det", "1.0.0")
    assert report_events(world.device, fetch_config=FAST).status == "sent"
    second = json.loads(peer.requests[-1]["body"])
    assert second["events"][0]["seq"] == 1 and second["queue"] != first["queue"]
    assert peer.kinds(DEVICE)[-1] == "checked"  # stored, not taken for the old seq 1


def test_an_ack_of_nothing_keeps_the_drop_count(world: World, peer: FleetPeer) -> None:
    world.committed_at("v1")
    world.init(report_url=peer.url)
    dev = Device(world.device)
    for _ in range(dev.events.max_events + 15):
        dev.events.append("checked")
    dropped = dev.events.dropped
    peer.replies = [(200, b'{"ack": 0}')]
    out = report_events(world.device, fetch_config=FAST)
    assert out.status == "failed" and dev.events.dropped == dropped
