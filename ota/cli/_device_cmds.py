"""Device commands: ``ota device init|update|run|status|confirm|revert|forget-failure``.

Thin wrappers over :mod:`ota.client`; the exit code of ``update`` is the cycle's outcome (see
``ota --help``), so scripts and systemd can react without parsing output.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import click

from ota.cli._output import emit, json_option

state_option = click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="OTA_STATE_DIR",
    default="/var/lib/edge-ota",
    show_default=True,
    help="The device's state directory (slots, journal, TUF metadata, events).",
)


@click.group("device")
def device() -> None:
    """Run the updater on a device."""
    from ota._lean import lean_device_process

    lean_device_process()


@device.command("init")
@state_option
@click.option("--repo-url", required=True, help="Base URL of the repository.")
@click.option(
    "--root",
    "root_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Trusted root.json (from `ota init`).",
)
@click.option("--device-id", required=True, callback=lambda c, p, v: _device_id(v))
@click.option("--model", "models", multiple=True, required=True, help="Model(s) to follow.")
@click.option(
    "--ring", type=click.Choice(["canary", "pilot", "ga"]), default="ga", show_default=True
)
@click.option("--hardware", "tier", default="default", show_default=True, help="Hardware tier.")
@click.option("--arch", default=None, help="CPU architecture (default: detected).")
@click.option("--runtime-version", default=None, help="onnxruntime version (default: detected).")
@click.option(
    "--health-timeout",
    type=float,
    default=600.0,
    show_default=True,
    help="Seconds the app has to confirm a new model before it is reverted (0: at once).",
)
@click.option("--health-cmd", default="", help="Command run after a switch; exit 0 confirms.")
@click.option("--hook-cmd", default="", help="Command run after every switch or revert.")
@click.option(
    "--report-url",
    default="",
    help="Fleet service base URL; queued events are forwarded there after each cycle.",
)
@click.option(
    "--report-token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File holding the bearer token for the fleet service.",
)
@click.option(
    "--security-floor",
    "floors",
    multiple=True,
    metavar="MODEL=COUNTER",
    help="Provision a security floor (see `ota releases`); kept floors only ever rise.",
)
@click.option(
    "--fleet-url",
    default="",
    help="Fleet service to enrol with (instead of --report-url/--report-token-file).",
)
@click.option(
    "--enroll-token",
    default=None,
    envvar="OTA_ENROLL_TOKEN",
    help="Enrolment token from `ota fleet enroll-token create` (or OTA_ENROLL_TOKEN).",
)
@json_option
def init_cmd(
    state_dir: Path,
    repo_url: str,
    root_path: Path,
    device_id: str,
    models: tuple[str, ...],
    ring: str,
    tier: str,
    arch: str | None,
    runtime_version: str | None,
    health_timeout: float,
    health_cmd: str,
    hook_cmd: str,
    report_url: str,
    report_token_file: Path | None,
    floors: tuple[str, ...],
    fleet_url: str,
    enroll_token: str | None,
    as_json: bool,
) -> None:
    """Initialise a device's state directory (and enrol it with --fleet-url)."""
    from ota.client import init_device
    from ota.errors import InputError

    kept: dict[str, int] = {}
    for spec in floors:
        model, _, counter = spec.partition("=")
        if not (counter.isascii() and counter.isdigit()) or len(counter) > 16:
            raise InputError(f"bad --security-floor {spec!r}", remedy="use MODEL=COUNTER")
        kept[model] = int(counter)

    options: dict[str, Any] = {
        "ring": ring,
        "tier": tier,
        "health_timeout_s": health_timeout,
        "health_cmd": tuple(shlex.split(health_cmd)),
        "hook_cmd": tuple(shlex.split(hook_cmd)),
        "runtime_version": runtime_version or _detected_runtime(),
        "report_url": report_url,
        "report_token_file": str(report_token_file.absolute()) if report_token_file else "",
    }
    if arch:
        options["arch"] = arch
    _warn_plain_token(report_url, options["report_token_file"])
    enrolment = _fleet_enrol(
        state_dir,
        repo_url,
        device_id,
        models,
        options,
        fleet_url,
        enroll_token,
        bool(report_url or report_token_file),
    )
    cfg = init_device(
        state_dir, repo_url, root_path.read_bytes(), device_id, models, floors=kept, **options
    )
    doc: dict[str, Any] = {
        "state_dir": str(state_dir),
        "device_id": cfg.device_id,
        "models": list(cfg.models),
        "ring": cfg.ring,
        "tier": cfg.tier,
        "arch": cfg.arch,
        "runtime_version": cfg.runtime_version,
    }
    if enrolment is not None:
        doc["fleet"] = enrolment
    emit(
        doc,
        as_json,
        lambda: (
            f"device {cfg.device_id} ({cfg.arch}, tier {cfg.tier}, ring {cfg.ring}) "
            f"follows {', '.join(cfg.models)} from {cfg.repo_url}"
            + (f"\nfleet: {enrolment['status']} at {enrolment['fleet_url']}" if enrolment else "")
        ),
    )


def _device_id(value: str) -> str:
    from ota.bundle import validate_device_id
    from ota.errors import InputError

    try:
        return validate_device_id(value)
    except InputError as e:
        raise click.BadParameter(e.diagnostics()) from e


def _warn_plain_token(report_url: str, token_file: str) -> None:
    """Warn (stderr) when a bearer token would travel over plain http to a non-loopback host."""
    import ipaddress
    from urllib.parse import urlsplit

    if not token_file or not report_url.startswith("http://"):
        return
    host = (urlsplit(report_url).hostname or "").lower()
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        click.echo(
            f"warning: the fleet bearer token is sent over plain http to {host}: anyone on "
            "the path can read and replay it; use an https:// --report-url",
            err=True,
        )


def _fleet_enrol(
    state_dir: Path,
    repo_url: str,
    device_id: str,
    models: tuple[str, ...],
    options: dict[str, Any],
    fleet_url: str,
    token: str | None,
    report_given: bool,
) -> dict[str, Any] | None:
    """Exchange the enrolment token before the config is written, then point the report
    path at the fleet URL and the stored credential (``options`` is updated)."""
    if not fleet_url:
        if token:
            raise click.UsageError("--enroll-token needs --fleet-url")
        return None
    if report_given:
        raise click.UsageError("--fleet-url replaces --report-url/--report-token-file")
    from ota.client import DeviceConfig
    from ota.client._enroll import credential_path, ensure_enrolled

    preview = DeviceConfig(device_id=device_id, repo_url=repo_url, models=models, **options)
    enrolment = ensure_enrolled(state_dir, preview.validate(), fleet_url, token)
    for warning in enrolment.warnings:
        click.echo(f"warning: {warning}", err=True)
    options["report_url"] = enrolment.fleet_url
    options["report_token_file"] = str(credential_path(state_dir).absolute())
    return enrolment.to_dict()


@device.command("rotate-credential")
@state_option
@json_option
def rotate_credential_cmd(state_dir: Path, as_json: bool) -> None:
    """Replace the device's fleet credential (the old one stops working; crash-safe)."""
    from ota.client._enroll import rotate_credential

    r = rotate_credential(state_dir)
    for warning in r.warnings:
        click.echo(f"warning: {warning}", err=True)
    emit(r.to_dict(), as_json, f"credential {r.status}: {r.credential_file}")


def _detected_runtime() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("onnxruntime")
    except PackageNotFoundError:
        return ""


@device.command("update")
@state_option
@click.option("--model", default=None, help="Only this model.")
@click.option(
    "--from",
    "medium",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Update from an offline medium (folder or .tar) instead of the network.",
)
@json_option
def update_cmd(state_dir: Path, model: str | None, medium: Path | None, as_json: bool) -> None:
    """One update cycle: verify, fetch, stage, smoke-test, commit."""
    from ota.cli._progress import TtyProgress
    from ota.client import update_once

    progress = None if as_json or not sys.stderr.isatty() else TtyProgress(sys.stderr)
    try:
        if medium is not None:
            from ota.client._medium import update_from_medium

            result = update_from_medium(state_dir, medium, model=model, progress=progress)
        else:
            result = update_once(state_dir, model=model, progress=progress)
    finally:
        if progress is not None:
            progress.close()
    emit(result.to_dict(), as_json, lambda: _render_update(result.to_dict()))
    sys.exit(int(result.exit_code))


def _render_update(doc: dict[str, Any]) -> str:
    lines = []
    for o in doc.get("models", []):
        version = f" {o['version']}" if o.get("version") else ""
        reason = f": {o['reason']}" if o.get("reason") else ""
        lines.append(f"{o['model']}{version}: {o['status']}{reason}")
        if o.get("remedy"):
            lines.append(f"  hint: {o['remedy']}")
    lines.append(
        f"({doc.get('requests', 0)} requests, {doc.get('bytes', 0)} bytes, "
        f"{doc.get('seconds', 0):.2f} s)"
    )
    report = doc.get("report")
    if report and report["status"] != "disabled":
        lines.append(_render_report(report))
    return "\n".join(lines)


def _render_report(r: dict[str, Any]) -> str:
    error = f": {r['error']}" if r.get("error") else ""
    return f"events {r['status']}: {r['acked']} acknowledged, {r['pending']} queued{error}"


@device.command("report")
@state_option
@click.option(
    "--to",
    "medium",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write the queued events to an offline medium (for `ota fleet import`).",
)
@json_option
def report_cmd(state_dir: Path, medium: Path | None, as_json: bool) -> None:
    """Forward queued events to the fleet service now (exit 5 if it cannot be reached)."""
    from ota.client import report_events
    from ota.client._state import StateDir
    from ota.errors import ExitCode

    if medium is not None:
        from ota.client._medium import report_to_medium

        r = report_to_medium(state_dir, medium)
        emit(r.to_dict(), as_json, lambda: (
            f"{r.written} events written to {medium} ({r.files} files); {r.acked} acknowledged"
            f" by an earlier import; {r.pending} queued until acknowledged"))  # fmt: skip
        return
    cfg = StateDir(state_dir).load_config()
    _warn_plain_token(cfg.report_url, cfg.report_token_file)
    outcome = report_events(state_dir)
    emit(outcome.to_dict(), as_json, lambda: _render_report(outcome.to_dict()))
    if outcome.status in ("failed", "partial"):
        sys.exit(int(ExitCode.TRANSIENT))


@device.command("run")
@state_option
@click.option(
    "--interval", type=float, default=300.0, show_default=True, help="Seconds between polls."
)
@click.option("--max-cycles", type=int, default=None, help="Stop after this many cycles.")
def run_cmd(state_dir: Path, interval: float, max_cycles: int | None) -> None:
    """The daemon: poll with jitter and backoff until SIGTERM."""
    from ota.client import DaemonConfig, run_daemon

    def report(result: Any) -> None:
        click.echo(json.dumps(result.to_dict(), sort_keys=True), err=True)

    run_daemon(
        state_dir, DaemonConfig(interval_s=interval, max_cycles=max_cycles), on_result=report
    )


@device.command("status")
@state_option
@json_option
def status_cmd(state_dir: Path, as_json: bool) -> None:
    """Committed models, trial in progress, failed releases, queued events."""
    from ota.client import status

    s = status(state_dir).to_dict()
    emit(s, as_json, lambda: _render_status(s))


def _when(value: object) -> str:
    from datetime import UTC, datetime

    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC).isoformat(timespec="seconds")
    return str(value)


def _render_status(s: dict[str, Any]) -> str:
    """``ota device status`` for a human: one line per fact, no raw dicts."""
    lines = [
        f"device {s.get('device_id')} ({s.get('arch')}, tier {s.get('tier')}, "
        f"ring {s.get('ring')}) from {s.get('repo_url')}",
        f"  phase: {s.get('phase')}",
    ]
    for name, m in sorted(s.get("models", {}).items()):
        running = m.get("current_version") or "none installed"
        facts = [f"slot {m['current_slot']}"] if m.get("current_slot") else []
        if m.get("committed_version") and m.get("committed_version") != m.get("current_version"):
            facts.append(f"committed {m['committed_version']}")
        facts += [f"release #{m.get('committed_counter', 0)}",
                  f"security floor {m.get('security_floor', 0)}"]  # fmt: skip
        shown = {"current_version", "current_slot", "committed_version", "committed_counter",
                 "security_floor", "model_path"}  # fmt: skip
        facts += [f"{k.replace('_', ' ')} {v}" for k, v in sorted(m.items())
                  if k not in shown and v not in (None, "", [], {})]  # fmt: skip
        lines.append(f"  {name}: {running} ({', '.join(facts)})")
        if m.get("model_path"):
            lines.append(f"    file: {m['model_path']}")
    trial = s.get("trial")
    if trial:
        lines.append(
            f"  on trial: {trial.get('model')} {trial.get('version')} in slot "
            f"{trial.get('slot')}, confirm before {_when(trial.get('deadline'))}"
        )
    failed = [" ".join(str(x) for x in f) for f in s.get("failed", [])]
    lines.append(f"  failed releases: {', '.join(failed) if failed else 'none'}")
    lines.append(
        f"  events: {s.get('pending_events', 0)} queued, {s.get('dropped_events', 0)} dropped"
    )
    return "\n".join(lines)


@device.command("confirm")
@state_option
@json_option
def confirm_cmd(state_dir: Path, as_json: bool) -> None:
    """Confirm the model on trial (the app is healthy)."""
    from ota.client import confirm

    o = confirm(state_dir)
    emit(o.to_dict(), as_json, f"{o.model} {o.version or ''}: {o.status}")


@device.command("revert")
@state_option
@click.option("--model", default=None)
@json_option
def revert_cmd(state_dir: Path, model: str | None, as_json: bool) -> None:
    """Go back to the previous slot now; the abandoned release is never retried."""
    from ota.client import revert

    o = revert(state_dir, model=model)
    emit(o.to_dict(), as_json, f"{o.model} {o.version or ''}: {o.status}")


@device.command("forget-failure")
@state_option
@click.argument("name")
@click.argument("version")
@json_option
def forget_failure_cmd(state_dir: Path, name: str, version: str, as_json: bool) -> None:
    """Let a release that failed or was abandoned here be retried by the next update."""
    from ota.client import forget_failure

    o = forget_failure(state_dir, name, version)
    emit(o.to_dict(), as_json, f"{o.model} {o.version}: may be retried by the next update")


@device.command("current")
@state_option
@click.option("--model", default=None)
@json_option
def current_cmd(state_dir: Path, model: str | None, as_json: bool) -> None:
    """Print the path of the committed model file (for apps and scripts); for a runtime
    bundle, the folder to put first on sys.path (its wheels unpacked beside the slot)."""
    from ota.client._runtime import current_import_path

    path = current_import_path(state_dir, model)
    emit({"model": model, "path": str(path)}, as_json, str(path))


def register(group: click.Group) -> None:
    group.add_command(device)
