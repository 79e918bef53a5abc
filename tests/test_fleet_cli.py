"""``ota fleet …`` commands on a real database (SQLite and PostgreSQL), the Alembic schema
matching the models, and retention pruning in small batches that keeps dedupe intact."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy import create_engine, text

from ota.errors import ExitCode
from ota.fleet._models import Base
from tests.fleet_fixtures import (  # noqa: F401
    FleetService,
    call,
    fleet_backend,
    fleet_service,
    postgres,
    start_service,
)
from tests.test_fleet_ingest import ev, post_report, report, timeline


def fleet_cli(db: str, *args: str) -> tuple[int, Any]:
    """Run ``ota fleet ARGS --db DB --json``; the exit code and the parsed output."""
    from ota.cli._main import _register, cli

    _register()
    r = CliRunner().invoke(cli, ["fleet", *args, "--db", db, "--json"])
    try:
        doc = json.loads(r.stdout)
    except ValueError:
        doc = r.output  # an error: its message (stderr)
    return r.exit_code, doc


def test_migrated_schema_matches_the_models_and_migrate_is_idempotent(fleet_backend: str) -> None:
    code, doc = fleet_cli(fleet_backend, "migrate")
    assert (code, doc) == (0, {"revision": "0004"})
    engine = create_engine(fleet_backend)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_operator_commands_work_on_the_database(fleet_backend: str) -> None:
    db = fleet_backend
    code, tok = fleet_cli(
        db, "token", "create", "--scope", "admin", "--name", "root", "--expires", "30d"
    )
    assert code == 0 and tok["token"].startswith("otaop_") and tok["scope"] == "admin"
    assert tok["expires_at"] - tok["created_at"] == 30 * 86400
    code, _ = fleet_cli(db, "token", "create", "--scope", "read", "--name", "root")
    assert code == ExitCode.CONFLICT
    code, _ = fleet_cli(db, "token", "create", "--scope", "read", "--expires", "soon")
    assert code == ExitCode.INPUT
    code, _ = fleet_cli(db, "token", "create", "--scope", "read", "--expires", "400d")
    assert code == ExitCode.INPUT
    code, enrol = fleet_cli(db, "enroll-token", "create", "--uses", "3", "--ring", "canary")
    assert code == 0 and enrol["max_uses"] == 3 and enrol["ring"] == "canary"
    code, rows = fleet_cli(db, "enroll-token", "list")
    assert code == 0 and [t["name"] for t in rows["tokens"]] == [enrol["name"]]
    code, rows = fleet_cli(db, "token", "list")
    assert code == 0 and "token" not in rows["tokens"][0]  # secrets are never listed
    with start_service(db) as svc:
        r = call(
            "POST",
            f"{svc.url}/v1/enroll",
            {"token": enrol["token"], "device_id": "d1", "facts": {"ring": "ga", "tier": "t"}},
        )
        assert r.status == 201 and r.doc["ring"] == "canary"
        models = {"m": {"version": "1.0.0", "counter": 1}}
        assert (
            post_report(
                svc,
                "d1",
                r.doc["credential"],
                report("d1", [ev(1, "confirmed")], models=models, ring="canary", tier="t"),
            ).status
            == 200
        )
        assert call("GET", f"{svc.url}/v1/fleet", token=tok["token"]).status == 200
        assert "gunicorn" in call("GET", f"{svc.url}/v1/health").headers.get("server", "")
        code, _ = fleet_cli(db, "token", "revoke", "root")
        assert code == 0
        assert call("GET", f"{svc.url}/v1/fleet", token=tok["token"]).status == 401
    code, status = fleet_cli(db, "status")
    assert code == 0 and status["devices"]["by_health"]["ok"] == 1
    assert status["models"] == [
        {"model": "m", "version": "1.0.0", "ring": "canary", "tier": "t", "devices": 1}
    ]
    code, page = fleet_cli(db, "devices", "--model", "m", "--seen-within", "1h")
    assert code == 0 and [d["device_id"] for d in page["devices"]] == ["d1"]
    code, page = fleet_cli(db, "devices", "--silent-for", "1h")
    assert code == 0 and page["devices"] == []
    code, dev = fleet_cli(db, "device", "d1")
    assert code == 0 and dev["timeline"][0]["kind"] == "confirmed"
    code, _ = fleet_cli(db, "device", "nobody")
    assert code == ExitCode.INPUT
    code, dev = fleet_cli(db, "device", "revoke", "d1")
    assert code == 0 and dev["revoked"]
    code, rows = fleet_cli(db, "enroll-token", "revoke", enrol["name"])
    assert code == 0 and not rows["active"]


def test_commands_on_an_unmigrated_database_say_so(tmp_path: Path) -> None:
    code, out = fleet_cli(f"sqlite:///{tmp_path / 'empty.sqlite3'}", "status")
    assert code == ExitCode.CONFIG and "ota fleet migrate" in str(out)
    code, _ = fleet_cli("mysql://nowhere/x", "status")
    assert code == ExitCode.CONFIG


def test_prune_deletes_old_events_in_batches_and_keeps_dedupe(fleet_service: FleetService) -> None:
    svc = fleet_service
    cred = svc.enroll("d1")
    old = report("d1", [ev(i) for i in range(1, 8)])
    assert post_report(svc, "d1", cred, old).doc == {"ack": 7}
    engine = create_engine(svc.db_url)
    try:
        with engine.begin() as conn:  # those seven arrived ten days ago
            conn.execute(text("UPDATE events SET received_at = received_at - 864000"))
    finally:
        engine.dispose()
    assert post_report(svc, "d1", cred, report("d1", [ev(8, "confirmed")])).doc == {"ack": 8}
    code, doc = fleet_cli(svc.db_url, "prune")  # the default retention (90 days) keeps them
    assert (code, doc) == (0, {"pruned": 0})
    code, doc = fleet_cli(svc.db_url, "prune", "--older-than", "1d", "--batch", "2")
    assert (code, doc) == (0, {"pruned": 7})
    assert timeline(svc, "d1") == [("q1", 8, "confirmed")]
    # a late resend of a pruned event is still a duplicate: acked, not stored again
    assert post_report(svc, "d1", cred, old).doc == {"ack": 7}
    assert timeline(svc, "d1") == [("q1", 8, "confirmed")]
    d = call("GET", f"{svc.url}/v1/devices/d1", token=svc.admin_token).doc
    assert d["health"] == "ok" and d["events_total"] == 8  # derived state is kept


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migrators_started_at_once_all_succeed(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Several machines starting `ota fleet serve` together migrate one fresh database."""
    from ota.fleet import migrate

    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'fresh.sqlite3'}"
    else:
        url = request.getfixturevalue("postgres").create_db()
    pool = ThreadPoolExecutor(4)  # not a with-block: a hung migrator must fail the test
    futures = [pool.submit(migrate, url) for _ in range(4)]
    revisions = [f.result(timeout=180) for f in futures]
    pool.shutdown(wait=False)
    assert revisions == ["0004"] * 4
    code, doc = fleet_cli(url, "status")
    assert code == 0 and doc["devices"]["total"] == 0
