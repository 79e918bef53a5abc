"""The dashboard's security claims, each attacked (issue 10, ADR 0016).

On real parts: a real repository (releases published with the online key), the real fleet
database, device reports through the service's own parser and ingest code, the real rollout
store and controller; pages through the fleet app (Flask's client on the real app) and, for
the cookie flags and headers as a browser gets them, through gunicorn (``ota fleet serve``).

Claims: no page or action without a session; a session comes only from a valid operator token
and dies with it (revocation, logout), and a forged or altered cookie is nothing; each page and
action needs its scope; every form needs the session's CSRF value and refuses a foreign
``Origin``; failed logins are rate-limited across workers; every value is escaped; every reply
carries a strict CSP; the cookie is HttpOnly, SameSite=Strict, Secure behind TLS; no open
redirect after login.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from ota.fleet import FleetConfig
from ota.fleet._app import create_app
from ota.fleet._db import make_engine
from ota.fleet._local import create_enroll_token, create_token
from ota.fleet._models import AuditRecord, OperatorToken
from ota.fleet._rollout_models import Rollout
from ota.repository import Project
from ota.repository._auditlog import read_log
from ota.rollout import _lease, _store
from ota.rollout._controller import Controller
from tests.fleet_fixtures import call, new_db, start_service
from tests.test_rollout_controller import plan, project, published  # noqa: F401

PAGES = ("/dashboard/", "/dashboard/devices", "/dashboard/rollouts", "/dashboard/releases")


@pytest.fixture
def dash_env(project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:  # noqa: F811
    """The dashboard's environment: the project and a fresh key file."""
    monkeypatch.setenv("OTA_PROJECT", str(project.root_dir))
    monkeypatch.setenv("OTA_DASHBOARD_KEY_FILE", str(tmp_path / "dash.key"))
    monkeypatch.delenv("OTA_DASHBOARD_SECURE_COOKIE", raising=False)
    return project.root_dir


class World:
    """A fleet database with devices, a running rollout and tokens of each scope. Devices
    enrol and report through the service's own routes (``POST /v1/enroll``,
    ``POST /v1/devices/<id>/events``: the real parser, credential check and ingest)."""

    def __init__(self, proj: Project, folder: Path, failing_pilot: bool = True) -> None:
        self.project = proj
        self.cfg = FleetConfig(db_url=new_db("sqlite", None, folder))
        self.engine = make_engine(self.cfg)
        self.app = create_app(self.cfg, self.engine)
        self.api = self.app.test_client()
        self.enroll_token = create_enroll_token(self.cfg, "t", 100_000, 86_400, "", "")["token"]
        self.devices: dict[str, tuple[str, str, str, itertools.count[int]]] = {}
        self.tokens = {
            scope: create_token(self.cfg, f"{scope}-op", scope, 3600)["token"]
            for scope in ("read", "rollout", "admin")
        }
        for i in range(2):
            self.take(f"can-{i}", "canary")
        self.enroll("pil-0", "pilot")
        self.report("pil-0", "downloaded", "staged", *(["smoke_failed"] if failing_pilot else []))
        self.rid = _store.start(self.engine, proj, "m", "2.0.0", plan(), "local:test")
        ctl = Controller(self.engine, proj, holder="T")
        ctl.tick()
        _lease.release(self.engine, "T")

    def enroll(self, device: str, ring: str, tier: str = "cpu") -> None:
        facts = {"ring": ring, "tier": tier, "arch": "x86_64", "runtime_version": "1.31.1",
                 "client_version": "0.1.0"}  # fmt: skip
        r = self.api.post(
            "/v1/enroll", json={"token": self.enroll_token, "device_id": device, "facts": facts}
        )
        assert r.status_code == 201 and r.json is not None, r.text
        self.devices[device] = (r.json["credential"], ring, tier, itertools.count(1))

    def report(self, device: str, *kinds: str, version: str = "2.0.0", **data: Any) -> None:
        secret, ring, tier, seq = self.devices[device]
        running = version if kinds and kinds[-1] == "confirmed" else "1.0.0"
        doc = {
            "format": "edge-ota.report/1",
            "device": {"id": device, "ring": ring, "tier": tier, "arch": "x86_64",
                       "runtime_version": "1.31.1", "client_version": "0.1.0",
                       "models": {"m": {"version": running, "counter": 2}}},
            "queue": "q1",
            "dropped": 0,
            "events": [{"seq": next(seq), "time": time.time(), "kind": k, "model": "m",
                        "version": version, "data": data} for k in kinds],
        }  # fmt: skip
        r = self.api.post(
            f"/v1/devices/{device}/events", json=doc, headers={"Authorization": f"Bearer {secret}"}
        )
        assert r.status_code == 200, r.text

    def take(self, device: str, ring: str) -> None:
        """Enrol, then install and confirm 2.0.0 (the whole happy path, one report)."""
        self.enroll(device, ring)
        self.report(device, "downloaded", "staged", "smoke_passed", "committed", "confirmed")

    def client(self, scope: str | None = None, addr: str = "127.0.0.1") -> FlaskClient:
        c = self.app.test_client()
        c.environ_base["REMOTE_ADDR"] = addr
        if scope:
            r = login(c, self.tokens[scope])
            assert r.status_code == 303, r.text
        return c

    def rollout(self) -> Rollout:
        with Session(self.engine, expire_on_commit=False) as s:
            r = s.get(Rollout, self.rid)
            assert r is not None
            return r


@pytest.fixture
def world(project: Project, tmp_path: Path, dash_env: Path) -> Iterator[World]:  # noqa: F811
    w = World(project, tmp_path)
    yield w
    w.engine.dispose()


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, html[:500]
    return m.group(1)


def login(c: FlaskClient, token: str, **extra: str) -> Any:
    page = c.get("/dashboard/login")
    return c.post("/dashboard/login", data={"csrf": csrf_of(page.text), "token": token, **extra})


def test_nothing_without_a_session_and_a_forged_cookie_is_nothing(world: World) -> None:
    c = world.client()
    for path in (*PAGES, f"/dashboard/rollouts/{world.rid}", "/dashboard/devices/can-0",
                 "/dashboard/audit", "/dashboard/releases/m/2.0.0"):  # fmt: skip
        r = c.get(path)
        assert r.status_code == 302 and "/dashboard/login" in r.headers["Location"], path
    r = c.post(f"/dashboard/rollouts/{world.rid}/pause", data={"csrf": "x"})
    assert r.status_code == 403  # no CSRF value of a session: refused before anything
    assert world.rollout().request is None
    # a real session's cookie, altered: claims another token id (admin) -> nothing
    reader = world.client("read")
    cookie = reader.get_cookie("ota_dash", path="/dashboard")
    assert cookie is not None
    payload, rest = cookie.value.split(".", 1)
    import base64
    import json

    doc = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    doc["t"] = doc["t"] + 2  # the admin token's row
    forged = base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()
    evil = world.app.test_client()
    evil.set_cookie("ota_dash", f"{forged}.{rest}", path="/dashboard")
    assert evil.get("/dashboard/audit").status_code == 302
    # a cookie signed with another key is nothing either
    from ota.dashboard._security import Sessions

    with Session(world.engine) as s:
        admin = s.scalars(select(OperatorToken).where(OperatorToken.scope == "admin")).one()
        value, _ = Sessions(b"k" * 64).issue(admin)
    evil.set_cookie("ota_dash", value, path="/dashboard")
    assert evil.get("/dashboard/audit").status_code == 302


def test_login_needs_a_valid_token_and_the_session_dies_with_it(world: World) -> None:
    c = world.client()
    assert login(c, "otaop_" + "A" * 43).status_code == 401
    assert login(c, "not a token").status_code == 401
    c2 = world.client("read")
    assert c2.get("/dashboard/").status_code == 200
    # revoke the token: its sessions end at once
    with Session(world.engine) as s, s.begin():
        tok = s.scalars(select(OperatorToken).where(OperatorToken.name == "read-op")).one()
        tok.revoked_at = time.time()
    assert c2.get("/dashboard/").status_code == 302
    assert login(world.client(), world.tokens["read"]).status_code == 401
    # logout: the same cookie replayed afterwards is refused (recorded in the database)
    c3 = world.client("admin")
    saved = c3.get_cookie("ota_dash", path="/dashboard")
    assert saved is not None
    home = c3.get("/dashboard/")
    assert c3.post("/dashboard/logout", data={}).status_code == 403  # logout needs CSRF too
    assert c3.post("/dashboard/logout", data={"csrf": csrf_of(home.text)}).status_code == 303
    replay = world.app.test_client()
    replay.set_cookie("ota_dash", saved.value, path="/dashboard")
    assert replay.get("/dashboard/").status_code == 302


def test_each_page_and_action_needs_its_scope(world: World) -> None:
    reader, roller, admin = world.client("read"), world.client("rollout"), world.client("admin")
    for path in PAGES:
        assert reader.get(path).status_code == 200, path
    assert reader.get(f"/dashboard/rollouts/{world.rid}").status_code == 200
    assert reader.get("/dashboard/audit").status_code == 403
    assert roller.get("/dashboard/audit").status_code == 403
    assert admin.get("/dashboard/audit").status_code == 200
    page = reader.get(f"/dashboard/rollouts/{world.rid}")
    assert "needs the rollout scope" in page.text and "/pause" not in page.text
    assert reader.get(f"/dashboard/rollouts/{world.rid}/pause").status_code == 403
    token = csrf_of(page.text)
    r = reader.post(f"/dashboard/rollouts/{world.rid}/pause", data={"csrf": token})
    assert r.status_code == 403 and world.rollout().request is None
    assert world.rollout().state == "running"
    # the rollout scope pauses (through the rollout store and settle, as the CLI)
    confirm = roller.get(f"/dashboard/rollouts/{world.rid}/pause")
    assert confirm.status_code == 200
    r = roller.post(f"/dashboard/rollouts/{world.rid}/pause", data={"csrf": csrf_of(confirm.text)})
    assert r.status_code == 303, r.text
    assert world.rollout().state == "paused"
    ops = [e for e in read_log(world.project.storage) if e.event == "rollout-operator"]
    assert ops[-1].actor == "token:rollout-op" and ops[-1].details["op"] == "pause"
    # revoking a device needs admin
    dev = roller.get("/dashboard/devices/can-0")
    r = roller.post("/dashboard/devices/can-0/revoke", data={"csrf": csrf_of(dev.text)})
    assert r.status_code == 403
    dev = admin.get("/dashboard/devices/can-0/revoke")
    r = admin.post("/dashboard/devices/can-0/revoke", data={"csrf": csrf_of(dev.text)})
    assert r.status_code == 303
    assert "Revoked" in admin.get("/dashboard/devices/can-0").text


def test_every_form_needs_the_sessions_csrf_and_no_foreign_origin(world: World) -> None:
    roller, other = world.client("rollout"), world.client("rollout")
    url = f"/dashboard/rollouts/{world.rid}/pause"
    mine = csrf_of(roller.get(url).text)
    theirs = csrf_of(other.get(url).text)
    assert mine != theirs
    for data in ({}, {"csrf": ""}, {"csrf": theirs}, {"csrf": mine + "x"}):
        assert roller.post(url, data=data).status_code == 403, data
    r = roller.post(url, data={"csrf": mine}, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    assert world.rollout().request is None and world.rollout().state == "running"
    # the login form too: no pre-login CSRF value, no session
    c = world.client()
    r = c.post("/dashboard/login", data={"token": world.tokens["admin"]})
    assert r.status_code == 403 and c.get_cookie("ota_dash", path="/dashboard") is None
    # and the right value works
    assert roller.post(url, data={"csrf": mine}).status_code == 303


def test_failed_logins_are_rate_limited_per_client_in_the_database(world: World) -> None:
    from ota.dashboard._security import LOGIN_MAX_FAILURES_PER_CLIENT

    attacker = world.client(addr="203.0.113.7")
    for _ in range(LOGIN_MAX_FAILURES_PER_CLIENT):
        assert login(attacker, "otaop_" + "B" * 43).status_code == 401
    r = login(attacker, world.tokens["admin"])  # even a good token: the limit comes first
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    # another app on the same database (another worker) sees the same count
    other_worker = create_app(world.cfg, world.engine).test_client()
    other_worker.environ_base["REMOTE_ADDR"] = "203.0.113.7"
    assert login(other_worker, world.tokens["admin"]).status_code == 429
    # another client is not locked out
    assert login(world.client(addr="198.51.100.2"), world.tokens["admin"]).status_code == 303
    with Session(world.engine) as s:
        n = s.scalar(
            select(AuditRecord.id).where(AuditRecord.action == "dashboard.login_failed").limit(1)
        )
        assert n is not None


def test_every_value_is_escaped_and_every_reply_has_a_strict_csp(world: World) -> None:
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    world.report("pil-0", "failed", note=evil)
    roller = world.client("rollout")
    url = f"/dashboard/rollouts/{world.rid}/abort"
    r = roller.post(url, data={"csrf": csrf_of(roller.get(url).text), "reason": evil})
    assert r.status_code == 303
    admin = world.client("admin")
    pages = [
        admin.get("/dashboard/devices/pil-0"),
        admin.get(f"/dashboard/rollouts/{world.rid}"),
        admin.get("/dashboard/audit"),
        admin.get("/dashboard/"),
        admin.get("/dashboard/releases/m/2.0.0"),
    ]
    assert any("&lt;script&gt;" in p.text or "\\u003cscript\\u003e" in p.text for p in pages)
    for p in pages:
        assert p.status_code == 200
        assert "<script" not in p.text.lower() and "<img" not in p.text.lower()  # only as text
        csp = p.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src" not in csp  # no script at all
        assert "frame-ancestors 'none'" in csp
        assert p.headers["X-Content-Type-Options"] == "nosniff"
        assert p.headers["Cache-Control"] == "no-store"
    # errors and the login page too
    for p in (admin.get("/dashboard/devices/nobody"), world.client().get("/dashboard/login")):
        assert "default-src 'none'" in p.headers["Content-Security-Policy"]
    # bad input is a 4xx page, never a 500
    bad = (
        "/dashboard/devices?health=bogus",
        "/dashboard/rollouts?before=-1",
        "/dashboard/devices/a%3Cb",
        "/dashboard/releases/m/%3Cx%3E",
        "/dashboard/rollouts/999999",
        f"/dashboard/rollouts/{world.rid}/explode",
    )
    for path in bad:
        assert 400 <= admin.get(path).status_code < 500, path


def test_no_open_redirect_after_login(world: World) -> None:
    for nxt in ("https://evil.example/", "//evil.example", "/dashboard/..//evil", "/\\evil"):
        r = login(world.client(), world.tokens["read"], next=nxt)
        assert r.status_code == 303 and r.headers["Location"] == "/dashboard/", nxt
    r = login(world.client(), world.tokens["read"], next="/dashboard/rollouts")
    assert r.headers["Location"] == "/dashboard/rollouts"


def test_cookie_flags_and_headers_through_gunicorn(world: World) -> None:
    with start_service(world.cfg.db_url) as svc:
        page = call("GET", f"{svc.url}/dashboard/login")
        assert page.status == 200
        assert "default-src 'none'" in page.headers["content-security-policy"]
        pre = page.headers["set-cookie"].split(";")[0]
        token = csrf_of(page.raw.decode())
        body = f"csrf={token}&token={world.tokens['read']}".encode()
        form = {"Content-Type": "application/x-www-form-urlencoded", "Cookie": pre}
        r = call("POST", f"{svc.url}/dashboard/login", body=body, headers=form)
        assert r.status == 303, r.raw[:300]
        flags = [f.strip().lower() for f in r.headers["set-cookie"].split(";")]
        assert "httponly" in flags and "samesite=strict" in flags and "path=/dashboard" in flags
        assert "secure" not in flags  # plain HTTP here
        session = r.headers["set-cookie"].split(";")[0]
        home = call("GET", f"{svc.url}/dashboard/", headers={"Cookie": session})
        assert home.status == 200 and b"Fleet" in home.raw
        # behind a TLS proxy (gunicorn trusts X-Forwarded-Proto from 127.0.0.1): Secure
        page = call("GET", f"{svc.url}/dashboard/login", headers={"X-Forwarded-Proto": "https"})
        assert "secure" in [f.strip().lower() for f in page.headers["set-cookie"].split(";")]
        # the JSON API is untouched by the dashboard's session: a cookie grants no API call
        api = call("GET", f"{svc.url}/v1/devices", headers={"Cookie": session})
        assert api.status == 401


def test_the_key_is_made_once_and_shared(tmp_path: Path) -> None:
    from ota.dashboard._security import load_key

    key = load_key(tmp_path / "k")
    assert load_key(tmp_path / "k") == key and len(key) == 64
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    (tmp_path / "short").write_text("abc")
    with pytest.raises(ValueError, match="shorter"):
        load_key(tmp_path / "short")
