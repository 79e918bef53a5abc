"""Automated rollout commands: ``ota rollout start|status|pause|resume|approve|abort|promote|
plan|controller`` (issue 9, ADR 0011).

Thin: parse, call :mod:`ota.rollout`, print. They work on the fleet database (``--db``, as
``ota fleet``) and the repository project (``--project``). Operator commands never sign: they
record a request that the controller holding the lease carries out; when no controller holds
it, the command carries it out at once itself (no gate is judged then). Exit codes: 3 a bad
plan or request, 8 a live rollout of the model already (or a queued request), 9 an unmigrated
database.
"""

from __future__ import annotations

import datetime
import signal
import threading
from pathlib import Path
from typing import Any

import click

from ota.cli._fleet_cmds import _cfg, db_option
from ota.cli._output import emit, json_option, project_option


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _env(project_dir: str, db: str | None, *, project: bool = True) -> tuple[Any, Any]:
    """(engine, project) on a migrated database (``project`` ``None`` when not needed)."""
    from sqlalchemy.exc import ArgumentError

    from ota.errors import ConfigError
    from ota.fleet._db import HEAD, current_revision, make_engine
    from ota.repository import Project

    cfg = _cfg(project_dir, db)
    try:
        engine = make_engine(cfg)
    except (ValueError, ArgumentError) as e:
        raise ConfigError(f"bad database URL: {e}") from e
    rev = current_revision(engine)
    if rev != HEAD:
        engine.dispose()
        raise ConfigError(
            f"the fleet database is at schema {rev or 'none'}, not {HEAD}: run `ota fleet migrate`"
        )
    try:
        return engine, Project.open(Path(project_dir)) if project else None
    except BaseException:
        engine.dispose()
        raise


def _actor() -> str:
    from ota.repository._auditlog import default_actor

    return f"local:{default_actor()}"


def _settle(engine: Any, project: Any, rid: int) -> list[dict[str, Any]]:
    from ota.rollout._controller import Controller, settle

    return settle(Controller(engine, project), rid)


@click.group("rollout")
def rollout() -> None:
    """Automated rollouts: plans, gates, and the controller that promotes, pauses, rolls back."""


@rollout.command("plan")
@click.argument("plan_file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@json_option
def plan_cmd(plan_file: Path | None, as_json: bool) -> None:
    """Validate PLAN_FILE (or print the default plan's TOML)."""
    from ota.rollout._plan import DEFAULT_PLAN_TOML, load_plan

    plan = load_plan(plan_file)
    if plan_file is None and not as_json:
        click.echo(DEFAULT_PLAN_TOML, nl=False)
        return
    emit(plan.to_dict(), as_json, f"plan valid: {len(plan.stages)} stages, sha256 {plan.digest()}")


@rollout.command("start")
@click.argument("name")
@click.argument("version")
@project_option
@db_option
@click.option(
    "--plan",
    "plan_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Rollout plan (TOML); default: the documented default plan.",
)
@click.option("--dry-run", is_flag=True, help="Show the stages, devices reached, timeline.")
@json_option
def start(
    name: str,
    version: str,
    project_dir: str,
    db: str | None,
    plan_file: Path | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Start an automated rollout of NAME VERSION (the controller enters its first stage)."""
    from ota.bundle import validate_name, validate_version
    from ota.errors import InputError
    from ota.repository._index import UnknownRelease
    from ota.rollout import _store
    from ota.rollout._plan import load_plan

    plan = load_plan(plan_file)  # refused before anything is read or written
    validate_name(name)
    validate_version(version)
    engine, project = _env(project_dir, db)
    try:
        if dry_run:
            state, baseline = _store.signed_state(project, name, version)
            if state is None:
                raise UnknownRelease(f"{name} {version} is not a live release")
            if state.yanked:
                raise InputError(f"{name} {version} is yanked: it cannot be rolled out")
            stages = [p.to_dict() for p in _store.preview(engine, name, version, plan)]
            doc = {
                "model": name,
                "version": version,
                "baseline_version": baseline,
                "plan_sha256": plan.digest(),
                "stages": stages,
                "earliest_done_s": plan.earliest_done_s(),
            }

            def text() -> str:
                lines = [f"{name} {version} (baseline {baseline or 'none'}), dry run:"]
                for st in stages:
                    lines.append(
                        f"  {st['index']}: {st['ring']:<6} {st['percent']:>5g}%  reaches "
                        f"{st['devices']:>6} device(s) today  needs {st['min_devices']} "
                        f"confirmed  earliest {_when(st['earliest_at'])}"
                        + ("  (approval)" if st["approval"] else "")
                    )
                lines.append(f"  done at the earliest after {plan.earliest_done_s() / 3600:g} h")
                return "\n".join(lines)

            emit(doc, as_json, text)
            return
        rid = _store.start(engine, project, name, version, plan, _actor())
        actions = _settle(engine, project, rid)
        doc = {
            "rollout": rid,
            "model": name,
            "version": version,
            "actions": actions,
            "plan_sha256": plan.digest(),
        }
        emit(
            doc,
            as_json,
            f"rollout #{rid} of {name} {version} started"
            + ("" if actions else " (the running controller enters stage 0)"),
        )
    finally:
        engine.dispose()


@rollout.command("status")
@click.argument("name", required=False)
@project_option
@db_option
@click.option("--all", "all_", is_flag=True, help="Ended rollouts too.")
@click.option("--verdicts", type=click.IntRange(0, 100), default=1, show_default=True)
@json_option
def status(
    name: str | None, project_dir: str, db: str | None, all_: bool, verdicts: int, as_json: bool
) -> None:
    """Rollouts with their stage, state and latest verdict."""
    from ota.rollout import _store

    engine, _ = _env(project_dir, db, project=False)
    try:
        rows = _store.status(engine, name, all_=all_, verdicts=verdicts)
    finally:
        engine.dispose()

    def text() -> str:
        if not rows:
            return "no rollout"
        out = []
        for r in rows:
            where = (
                f"stage {r['stage'] + 1}/{r['stages']} {r['ring']} {r['percent']:g}%"
                if r["ring"]
                else f"not started ({r['stages']} stages)"
            )
            out.append(
                f"#{r['id']} {r['model']} {r['version']} {r['state']} {where}: {r['reason']}"
            )
            if r["pending"]:
                out.append(f"    carrying out: {r['pending'].get('event') or 'end'}")
            if r["request"]:
                out.append(f"    queued: {r['request'].get('op')} by {r['request'].get('actor')}")
            for v in r["verdicts"]:
                out.append(f"    {_when(v['at'])} {v['action']} (x{v['repeats']}): {v['reason']}")
                for g in v["gates"]:
                    tier = f"[{g['tier']}]" if g["tier"] else ""
                    out.append(f"      {g['status']:<4} {g['gate']}{tier}: {g['reason']}")
        return "\n".join(out)

    emit({"rollouts": rows}, as_json, text)


def _request_command(op: str, helptext: str, reason_required: bool = False) -> click.Command:
    @click.command(op, help=helptext)
    @click.argument("name")
    @project_option
    @db_option
    @click.option("--reason", default="", required=reason_required, help="Recorded with it.")
    @json_option
    def cmd(
        name: str, project_dir: str, db: str | None, reason: str, as_json: bool, **_kw: Any
    ) -> None:
        from ota.rollout import _store

        engine, project = _env(project_dir, db)
        try:
            rid = _store.request(engine, project, name, op, _actor(), reason)
            actions = _settle(engine, project, rid)
        finally:
            engine.dispose()
        emit(
            {"rollout": rid, "request": op, "actions": actions},
            as_json,
            f"rollout #{rid}: {op} " + ("done" if actions else "queued for the controller"),
        )

    return cmd


rollout.add_command(_request_command("pause", "Pause the live rollout of NAME (signed)."))
rollout.add_command(_request_command("resume", "Resume a paused rollout of NAME."))
rollout.add_command(
    _request_command("abort", "End the rollout of NAME; the release stays paused.", True)
)


@rollout.command("promote")
@click.argument("name")
@project_option
@db_option
@click.option("--now", "now_", is_flag=True, required=True, help="Past the gates (required).")
@click.option("--reason", required=True, help="Why the gates are overridden (recorded).")
@json_option
def promote(
    name: str, project_dir: str, db: str | None, now_: bool, reason: str, as_json: bool
) -> None:
    """Enter the next stage of NAME's rollout now, overriding the gates (recorded)."""
    from ota.errors import InputError
    from ota.rollout import _store

    if not now_:
        raise InputError("promote needs --now (it overrides the gates)")
    engine, project = _env(project_dir, db)
    try:
        rid = _store.request(engine, project, name, "promote", _actor(), reason)
        actions = _settle(engine, project, rid)
    finally:
        engine.dispose()
    emit(
        {"rollout": rid, "request": "promote", "actions": actions},
        as_json,
        f"rollout #{rid}: promote " + ("done" if actions else "queued for the controller"),
    )


@rollout.command("approve")
@click.argument("name")
@project_option
@db_option
@json_option
def approve(name: str, project_dir: str, db: str | None, as_json: bool) -> None:
    """Approve entering the next stage of NAME's rollout (where the plan asks for it)."""
    from ota.rollout import _store

    engine, project = _env(project_dir, db)
    try:
        out = _store.approve(engine, project, name, _actor())
    finally:
        engine.dispose()
    emit(
        out,
        as_json,
        f"rollout #{out['rollout']}: stage {out['approved_stage']} "
        f"({out['ring']} {out['percent']:g}%) approved",
    )


@rollout.command("controller")
@project_option
@db_option
@click.option(
    "--interval",
    type=click.FloatRange(0.5, 3600),
    default=10.0,
    show_default=True,
    envvar="OTA_ROLLOUT_INTERVAL",
    help="Seconds between full evaluations; a stage whose soak ends, a new report or an "
    "operator's request is judged at once in between.",
)
@click.option("--once", is_flag=True, help="One evaluation, then exit.")
@click.option("--metrics-bind", default="", help="HOST:PORT to serve the rollout gauges on.")
@json_option
def controller(
    project_dir: str, db: str | None, interval: float, once: bool, metrics_bind: str, as_json: bool
) -> None:
    """Run the rollout controller (one acts at a time, whatever the number of instances)."""
    from ota.rollout import _plugins
    from ota.rollout._controller import Controller

    engine, project = _env(project_dir, db)
    ctl = Controller(
        engine,
        project,
        extra_gates=_plugins.extra_gates(),
        on_verdict=_plugins.verdict_hooks(engine),
    )
    try:
        if once:
            rep = ctl.tick()
            from ota.rollout import _lease

            _lease.release(engine, ctl.holder)
            emit(
                {
                    "leader": rep.leader,
                    "verdicts": rep.verdicts,
                    "actions": rep.actions,
                    "errors": rep.errors,
                },
                as_json,
                f"leader={rep.leader} verdicts={len(rep.verdicts)} actions={len(rep.actions)}"
                + "".join(f"\n  error: {e}" for e in rep.errors),
            )
            return
        if metrics_bind:
            from prometheus_client import start_http_server

            from ota.rollout._metrics import registry

            host, _, port = metrics_bind.rpartition(":")
            start_http_server(int(port), addr=host or "127.0.0.1", registry=registry(engine))
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        click.echo(f"rollout controller {ctl.holder} every {interval:g} s", err=True)
        ctl.run(interval, stop)
    finally:
        engine.dispose()


def register(group: click.Group) -> None:
    group.add_command(rollout)
