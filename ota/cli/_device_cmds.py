"""Device commands: ``ota device init|update|run|status|confirm|revert``.

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
@click.option("--device-id", required=True)
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
    fleet_url: str,
    enroll_token: str | None,
    as_json: bool,
) -> None:
    """Initialise a device's state directory (and enrol it with --fleet-url)."""
    from ota.client import init_device

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
    enrolment = _fleet_enrol(state_dir, repo_url, device_id, models, options, fleet_url,
                             enroll_token, bool(report_url or report_token_file))
    cfg = init_device(state_dir, repo_url, root_path.read_bytes(), device_id, models, **options)
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
@json_option
def update_cmd(state_dir: Path, model: str | None, as_json: bool) -> None:
    """One update cycle: verify, fetch, stage, smoke-test, commit."""
    from ota.client import update_once

    result = update_once(state_dir, model=model)
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
@json_option
def report_cmd(state_dir: Path, as_json: bool) -> None:
    """Forward queued events to the fleet service now (exit 5 if it cannot be reached)."""
    from ota.client import report_events
    from ota.errors import ExitCode

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

    def human() -> str:
        lines = [f"device {s['device_id']} ({s['arch']}, tier {s['tier']}, ring {s['ring']})"]
        for name, m in sorted(s["models"].items()):
            lines.append(f"  {name}: {json.dumps(m, sort_keys=True)}")
        if s.get("trial"):
            lines.append(f"  on trial: {json.dumps(s['trial'], sort_keys=True)}")
        lines.append(
            f"  failed releases: {len(s.get('failed', []))}; "
            f"events queued: {s.get('pending_events', 0)}"
        )
        return "\n".join(lines)

    emit(s, as_json, human)


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


@device.command("current")
@state_option
@click.option("--model", default=None)
def current_cmd(state_dir: Path, model: str | None) -> None:
    """Print the path of the committed model file (for apps and scripts)."""
    from ota.client import current_model

    click.echo(str(current_model(state_dir, model)))


def register(group: click.Group) -> None:
    group.add_command(device)
