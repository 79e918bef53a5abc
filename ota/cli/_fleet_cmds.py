"""Fleet service commands: ``ota fleet serve|migrate|status|devices|device|enroll-token|token|
prune``.

Thin: parse, call :mod:`ota.fleet`, print (``--json`` or text). They work on the fleet
database directly (``--db URL``, ``OTA_FLEET_DB``, default a SQLite file in the project
folder); state changes are audited as ``local:<user>``. ``ota fleet token create --scope
admin`` is how the first admin token is made.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import click

from ota.cli._output import emit, json_option, project_option


def _cfg(project_dir: str, db: str | None, **kw: Any) -> Any:
    from ota.fleet import FleetConfig, default_db_url

    return FleetConfig(db_url=db or default_db_url(project_dir), **kw)


db_option = click.option(
    "--db",
    help="Database URL (sqlite:///… or postgresql+psycopg://…); "
    "default $OTA_FLEET_DB or fleet.sqlite3 in the project folder.",
)


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _run(project_dir: str, db: str | None, fn: Callable[..., Any]) -> Any:
    from ota.fleet._local import run

    return run(_cfg(project_dir, db), fn)


@click.group("fleet")
def fleet() -> None:
    """The fleet service: device enrolment, reports, fleet state, operator tokens."""


@fleet.command("migrate")
@project_option
@db_option
@json_option
def migrate(project_dir: str, db: str | None, as_json: bool) -> None:
    """Create or upgrade the fleet database schema (idempotent)."""
    from ota.fleet._local import migrate_db

    cfg = _cfg(project_dir, db)
    rev = migrate_db(cfg.db_url)
    emit({"revision": rev}, as_json, f"fleet database at schema {rev}")


@fleet.command("serve")
@project_option
@db_option
@click.option("--bind", default="127.0.0.1:8400", show_default=True, help="HOST:PORT.")
@click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option(
    "--threads",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="Request threads per worker (keep-alive connections are served by them).",
)
@click.option(
    "--max-reports-per-minute",
    type=click.IntRange(1, 100_000),
    default=120,
    show_default=True,
    help="Per device; more gets 429 with Retry-After.",
)
@click.option(
    "--busy-timeout-ms",
    type=click.IntRange(1, 600_000),
    default=10_000,
    show_default=True,
    help="SQLite: wait this long for the lock, then 503.",
)
@click.option("--access-log", is_flag=True, help="Log every request to stderr.")
@click.option(
    "--rollout-controller",
    is_flag=True,
    help="Also run `ota rollout controller` (a child process; needs the project's online key).",
)
@json_option
def serve(
    project_dir: str,
    db: str | None,
    bind: str,
    workers: int,
    threads: int,
    max_reports_per_minute: int,
    busy_timeout_ms: int,
    access_log: bool,
    as_json: bool,
    rollout_controller: bool = False,
) -> None:
    """Migrate, then serve the fleet API with gunicorn (WORKERS processes)."""
    from ota.fleet._local import migrate_db
    from ota.fleet._serve import serve as run_serve

    cfg = _cfg(
        project_dir,
        db,
        rate_max_reports=max_reports_per_minute,
        rate_window_s=60.0,
        busy_timeout_ms=busy_timeout_ms,
    )
    rev = migrate_db(cfg.db_url)
    emit(
        {"bind": bind, "workers": workers, "revision": rev},
        as_json,
        f"fleet service on http://{bind} ({workers} workers, schema {rev})",
    )
    child = _start_rollout_controller(project_dir, cfg.db_url) if rollout_controller else None
    try:
        run_serve(cfg, bind=bind, workers=workers, threads=threads, access_log=access_log)
    finally:
        if child is not None:  # issue 9: the controller lives and dies with the service
            child.terminate()
            child.wait(timeout=30)


def _start_rollout_controller(project_dir: str, db_url: str) -> Any:
    import subprocess
    import sys

    args = ["rollout", "controller", "--project", project_dir, "--db", db_url]
    return subprocess.Popen([sys.executable, "-m", "ota.cli", *args])


@fleet.command("status")
@project_option
@db_option
@json_option
def status(project_dir: str, db: str | None, as_json: bool) -> None:
    """Fleet summary: devices by health, releases by state, model versions."""
    from ota.fleet._store import summary

    cfg = _cfg(project_dir, db)
    doc = _run(project_dir, db, lambda s, now: summary(s, now, cfg.silent_after_s))

    def human() -> str:
        d = doc["devices"]
        lines = [
            f"{d['active']} devices ({d['revoked']} revoked, {d['silent']} silent, "
            f"{d['flagged']} flagged); health "
            + ", ".join(f"{k} {v}" for k, v in d["by_health"].items())
        ]
        lines += [
            f"  {m['model']} {m['version']} ring={m['ring']} tier={m['tier']}: "
            f"{m['devices']} devices"
            for m in doc["models"]
        ]
        lines += [
            f"  release {r['model']}@{r['version']}: "
            + ", ".join(f"{k} {v}" for k, v in sorted(r["states"].items()))
            for r in doc["releases"]
        ]
        return "\n".join(lines)

    emit(doc, as_json, human)


def _device_line(d: dict[str, Any]) -> str:
    models = " ".join(f"{n}@{m['version']}" for n, m in sorted(d["models"].items())) or "-"
    flags = " REVOKED" if d["revoked"] else ""
    flags += " FLAGGED" if d["claims_changed"] else ""
    return (
        f"{d['device_id']}  {d['ring']}/{d['tier']}  {d['health']}  {models}  "
        f"last seen {_when(d['last_seen'])}{flags}"
    )


@fleet.command("devices")
@project_option
@db_option
@click.option("--model", default="")
@click.option("--version", "version", default="")
@click.option("--ring", default="")
@click.option("--tier", default="")
@click.option("--health", type=click.Choice(["unknown", "ok", "failing", "security"]), default=None)
@click.option("--seen-within", help="Only devices heard from within this duration (e.g. 1h).")
@click.option("--silent-for", help="Only devices not heard from for this duration (e.g. 1d).")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--after", default="", help="Page after this device id (the previous `next`).")
@json_option
def devices(
    project_dir: str,
    db: str | None,
    model: str,
    version: str,
    ring: str,
    tier: str,
    health: str | None,
    seen_within: str | None,
    silent_for: str | None,
    limit: int,
    after: str,
    as_json: bool,
) -> None:
    """List devices, filtered, one page at a time."""
    import time

    from ota.fleet._local import parse_duration
    from ota.fleet._store import list_devices

    now = time.time()
    doc = _run(
        project_dir,
        db,
        lambda s, _now: list_devices(
            s,
            model=model,
            version=version,
            ring=ring,
            tier=tier,
            health=health or "",
            seen_after=now - parse_duration(seen_within) if seen_within else None,
            seen_before=now - parse_duration(silent_for) if silent_for else None,
            limit=limit,
            after=after,
        ),
    )
    emit(
        doc,
        as_json,
        lambda: (
            "\n".join(
                [_device_line(d) for d in doc["devices"]]
                + ([f"(more: --after {doc['next']})"] if doc["next"] else [])
            )
            or "no devices"
        ),
    )


class _DeviceGroup(click.Group):
    """``ota fleet device ID`` shows a device; ``ota fleet device revoke ID`` revokes one."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["show", *args]
        return super().parse_args(ctx, args)


@fleet.group("device", cls=_DeviceGroup)
def device() -> None:
    """One device: `ota fleet device ID`, `ota fleet device revoke ID`."""


@device.command("show")
@click.argument("device_id")
@project_option
@db_option
@click.option("--events", type=click.IntRange(0, 1000), default=50, show_default=True)
@json_option
def device_show(
    device_id: str, project_dir: str, db: str | None, events: int, as_json: bool
) -> None:
    """Facts, installed models, releases and the event timeline of DEVICE_ID."""
    from ota.fleet._store import device_detail

    doc = _run(project_dir, db, lambda s, _now: device_detail(s, device_id, events))
    emit(
        doc,
        as_json,
        lambda: "\n".join(
            [_device_line(doc)]
            + ([f"  flagged: {doc['claims_note']}"] if doc["claims_changed"] else [])
            + [f"  {r['model']}@{r['version']}: {r['state']}" for r in doc["releases"]]
            + [
                f"  {_when(e['received_at'])} #{e['seq']} {e['kind']} {e['model']} {e['version']}"
                for e in doc["timeline"]
            ]
        ),
    )


@device.command("revoke")
@click.argument("device_id")
@project_option
@db_option
@json_option
def device_revoke(device_id: str, project_dir: str, db: str | None, as_json: bool) -> None:
    """Revoke DEVICE_ID: its credential stops working (it keeps updating)."""
    from ota.fleet._app import local_actor
    from ota.fleet._store import revoke_device

    doc = _run(project_dir, db, lambda s, now: revoke_device(s, device_id, local_actor(), now))
    emit(doc, as_json, f"revoked {device_id}")


@fleet.group("enroll-token")
def enroll_token() -> None:
    """Enrolment tokens: exchanged once per device for its credential."""


@enroll_token.command("create")
@project_option
@db_option
@click.option("--name", default="", help="Default: enroll-<random>.")
@click.option("--uses", type=click.IntRange(1, 1_000_000), default=1, show_default=True)
@click.option("--expires", default="7d", show_default=True, help="Lifetime (30m, 12h, 7d).")
@click.option("--ring", default="", help="Devices enrolled with it get this ring.")
@click.option("--tier", default="", help="Devices enrolled with it get this tier.")
@json_option
def enroll_token_create(
    project_dir: str,
    db: str | None,
    name: str,
    uses: int,
    expires: str,
    ring: str,
    tier: str,
    as_json: bool,
) -> None:
    """Create an enrolment token (printed once; only its hash is stored)."""
    from ota.fleet._local import create_enroll_token, parse_duration, token_name

    doc = create_enroll_token(
        _cfg(project_dir, db),
        token_name(name, "enroll"),
        uses,
        parse_duration(expires),
        _checked(ring, "--ring"),
        _checked(tier, "--tier"),
    )
    emit(doc, as_json, doc["token"])


@enroll_token.command("list")
@project_option
@db_option
@json_option
def enroll_token_list(project_dir: str, db: str | None, as_json: bool) -> None:
    """Enrolment tokens and their uses."""
    from ota.fleet._store import list_enroll_tokens

    rows = _run(project_dir, db, list_enroll_tokens)
    emit(
        {"tokens": rows},
        as_json,
        lambda: (
            "\n".join(
                f"{t['name']}  {t['uses']}/{t['max_uses']} used  expires {_when(t['expires_at'])}"
                f"{'' if t['active'] else '  inactive'}"
                for t in rows
            )
            or "no enrolment tokens"
        ),
    )


@enroll_token.command("revoke")
@click.argument("name")
@project_option
@db_option
@json_option
def enroll_token_revoke(name: str, project_dir: str, db: str | None, as_json: bool) -> None:
    """Revoke the enrolment token NAME."""
    from ota.fleet._app import local_actor
    from ota.fleet._store import revoke_enroll_token

    doc = _run(project_dir, db, lambda s, now: revoke_enroll_token(s, name, local_actor(), now))
    emit(doc, as_json, f"revoked enrolment token {name}")


@fleet.group("token")
def token() -> None:
    """Operator API tokens (scopes read < rollout < admin)."""


@token.command("create")
@project_option
@db_option
@click.option("--name", default="", help="Default: <scope>-<random>.")
@click.option("--scope", type=click.Choice(["read", "rollout", "admin"]), required=True)
@click.option("--expires", default="90d", show_default=True, help="Lifetime (at most 366d).")
@json_option
def token_create(
    project_dir: str, db: str | None, name: str, scope: str, expires: str, as_json: bool
) -> None:
    """Create an operator token (printed once; only its hash is stored)."""
    from ota.fleet._local import create_token, parse_duration, token_name

    doc = create_token(
        _cfg(project_dir, db), token_name(name, scope), scope, parse_duration(expires)
    )
    emit(doc, as_json, doc["token"])


@token.command("list")
@project_option
@db_option
@json_option
def token_list(project_dir: str, db: str | None, as_json: bool) -> None:
    """Operator tokens (never their secrets)."""
    from ota.fleet._store import list_operator_tokens

    rows = _run(project_dir, db, list_operator_tokens)
    emit(
        {"tokens": rows},
        as_json,
        lambda: (
            "\n".join(
                f"{t['name']}  {t['scope']}  expires {_when(t['expires_at'])}"
                f"{'' if t['active'] else '  inactive'}"
                for t in rows
            )
            or "no tokens"
        ),
    )


@token.command("revoke")
@click.argument("name")
@project_option
@db_option
@json_option
def token_revoke(name: str, project_dir: str, db: str | None, as_json: bool) -> None:
    """Revoke the operator token NAME (at once, for every worker)."""
    from ota.fleet._app import local_actor
    from ota.fleet._store import revoke_operator_token

    doc = _run(project_dir, db, lambda s, now: revoke_operator_token(s, name, local_actor(), now))
    emit(doc, as_json, f"revoked token {name}")


@fleet.command("prune")
@project_option
@db_option
@click.option(
    "--older-than",
    envvar="OTA_FLEET_RETENTION",
    help="Delete events received before this long ago (derived state is kept); default "
    "$OTA_FLEET_RETENTION or the configured retention (90d).",
)
@click.option("--batch", type=click.IntRange(1, 100_000), default=5000, show_default=True)
@json_option
def prune(
    project_dir: str, db: str | None, older_than: str | None, batch: int, as_json: bool
) -> None:
    """Delete old events in small transactions (ingestion goes on meanwhile)."""
    from ota.fleet._local import parse_duration
    from ota.fleet._local import prune as do_prune

    cfg = _cfg(project_dir, db)
    keep = parse_duration(older_than) if older_than else cfg.retention_days * 86400
    n = do_prune(cfg, keep, batch)
    emit({"pruned": n}, as_json, f"pruned {n} events")


@fleet.command("import")
@click.argument("medium", type=click.Path(exists=True, file_okay=False, path_type=str))
@project_option
@db_option
@json_option
def import_cmd(medium: str, project_dir: str, db: str | None, as_json: bool) -> None:
    """Ingest device reports carried back on an offline medium (deduplicated like network
    reports); writes acknowledgements to it. Exit 4 if any report was refused."""
    import sys
    from pathlib import Path

    from ota.errors import ExitCode
    from ota.fleet._import import import_reports

    r = import_reports(_cfg(project_dir, db), Path(medium))
    emit(r.to_dict(), as_json, lambda: "\n".join(
        [f"{r.accepted} of {r.files} reports accepted, {r.stored} new events stored"]
        + [f"refused {x['file']}: {x['reason']}" for x in r.refused]))  # fmt: skip
    if r.refused:
        sys.exit(int(ExitCode.SECURITY))


def _checked(value: str, what: str) -> str:
    from ota.errors import InputError
    from ota.fleet._validate import NAME_RE

    if value and (len(value) > 64 or not NAME_RE.match(value)):
        raise InputError(f"{what} has characters that are not allowed")
    return value


def register(group: click.Group) -> None:
    group.add_command(fleet)
