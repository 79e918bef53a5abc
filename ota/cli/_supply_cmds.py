"""Supply-chain commands: audit, verify, log, sbom show/diff, vulns; publish policy options.

Each parses, calls :mod:`ota.repository` / :mod:`ota.sbom`, prints (JSON or text). A failed
audit or verification still prints its whole report, then exits 4 naming what failed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ota._extras import require
from ota.cli._output import emit, json_option, project_option
from ota.errors import InputError, SecurityError

_SEVERITY = click.Choice(["low", "moderate", "high", "critical"], case_sensitive=False)
_MAX_ROOT_BYTES = 512_000


class VulnerableReleases(SecurityError):
    """``ota vulns`` found releases with known vulnerabilities at or above the threshold."""


def _project(project_dir: str) -> Any:
    from ota.repository import Project

    return Project.open(Path(project_dir))


def _read_root(path: Path) -> bytes:
    try:
        if path.stat().st_size > _MAX_ROOT_BYTES:
            raise InputError(f"{path} is larger than {_MAX_ROOT_BYTES} bytes")
        return path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read the trusted root {path}: {e.strerror or e}") from e


osv_option = click.option(
    "--osv",
    "osv_dir",
    type=click.Path(exists=True, path_type=Path),
    help="Offline OSV export (folder of OSV JSON records, or all.zip).",
)
fail_on_option = click.option(
    "--fail-on", type=_SEVERITY, default="low", show_default=True,
    help="Fail on known vulnerabilities at or above this severity (unknown severity counts).",
)  # fmt: skip


@click.command()
@click.argument("name")
@click.argument("version")
@project_option
@click.option("--repo-url", help="Audit a served repository (no publisher credentials needed).")
@click.option("--root", "root_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Trusted root.json (default: the project's).")  # fmt: skip
@osv_option
@fail_on_option
@click.option(
    "--export",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write the verified bundle, manifest, target facts and metadata here.",
)
@json_option
def audit(name: str, version: str, project_dir: str, repo_url: str | None,
          root_file: Path | None, osv_dir: Path | None, fail_on: str, export: Path | None,
          as_json: bool) -> None:  # fmt: skip
    """The auditor's report of release NAME VERSION; exit 4 if any check fails."""
    from ota.repository._audit import AuditOptions
    from ota.repository._audit import audit as do_audit
    from ota.repository._tufview import HttpSource, Source, StorageSource

    if osv_dir is not None:
        require("repository", "`--osv` (vulnerability matching)")
    source: Source
    if repo_url:
        if root_file is None:
            raise InputError("--repo-url needs --root (the trusted root.json)")
        source = HttpSource(repo_url)
    else:
        project = _project(project_dir)
        source = StorageSource(project.storage)
        root_file = root_file or project.root_dir / "root.json"
    opts = AuditOptions(osv=osv_dir, fail_on=fail_on.lower(), export=export)
    report = do_audit(source, _read_root(root_file), name, version, opts)
    emit(report.to_dict(), as_json, report.render)
    report.raise_for_failures()


@click.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--root",
    "root_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Trusted root.json: replay the exported TUF metadata through python-tuf.",
)
@click.option(
    "--signer-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="PEM public key trusted to sign this bundle (when there is no --root).",
)
@osv_option
@fail_on_option
@json_option
def verify(folder: Path, root_file: Path | None, signer_key: Path | None,
           osv_dir: Path | None, fail_on: str, as_json: bool) -> None:  # fmt: skip
    """Verify a bundle on disk (an `ota audit --export` folder or a device slot), offline."""
    if osv_dir is not None:
        require("repository", "`--osv` (vulnerability matching)")
    from ota.repository._audit import verify_dir

    report = verify_dir(
        folder,
        trusted_root=_read_root(root_file) if root_file else None,
        signer_key=_read_root(signer_key) if signer_key else None,
        osv=osv_dir,
        fail_on=fail_on.lower(),
    )
    emit(report.to_dict(), as_json, report.render)
    report.raise_for_failures()


@click.group(invoke_without_command=True)
@project_option
@click.option("--limit", type=click.IntRange(0, 100_000), default=50, show_default=True)
@json_option
@click.pass_context
def log(ctx: click.Context, project_dir: str, limit: int, as_json: bool) -> None:
    """Show the audit log (newest last); `ota log verify` checks its chain and signed head."""
    ctx.obj = project_dir
    if ctx.invoked_subcommand is not None:
        return
    from ota.repository._auditlog import read_log

    entries = read_log(_project(project_dir).storage, limit=limit)
    emit([e.to_dict() for e in entries], as_json, lambda: "\n".join(
        f"#{e.seq} {e.time} {e.actor} {e.event} {e.subject} "
        + " ".join(f"{k}={v}" for k, v in sorted(e.details.items()))
        for e in entries) or "the audit log is empty")  # fmt: skip


@log.command("verify")
@click.option(
    "--project",
    "sub_project",
    default=None,
    type=click.Path(file_okay=False),
    help="Folder holding ota.toml (default: the `ota log --project` one).",
)
@json_option
@click.pass_obj
def log_verify(project_dir: str, sub_project: str | None, as_json: bool) -> None:
    """Detect removed, reordered, altered or truncated audit log entries (exit 4)."""
    project_dir = sub_project or project_dir
    from ota.repository._audit import read_anchor
    from ota.repository._auditlog import verify_log
    from ota.repository._tufview import StorageSource

    project = _project(project_dir)
    cache = project.root_dir / ".ota-cache" / "log-verify"
    head = read_anchor(StorageSource(project.storage),
                       _read_root(project.root_dir / "root.json"), cache)  # fmt: skip
    result = verify_log(project, head)
    emit(result.to_dict(), as_json, lambda: "\n".join(
        [f"audit log intact: {result.entries} entries, signed head at entry "
         f"{result.anchored_seq}", *(f"warning: {w}" for w in result.warnings)]))  # fmt: skip


def _release_sbom(project: Any, name: str, version: str) -> bytes:
    from ota.repository._audit import read_release_file

    return read_release_file(project, name, version, "sbom.cdx.json")


@click.group()
def sbom() -> None:
    """Show or compare the CycloneDX ML-BOMs of published releases."""
    require("repository", "`ota sbom`")


@sbom.command("show")
@click.argument("name")
@click.argument("version")
@project_option
@json_option
def sbom_show(name: str, version: str, project_dir: str, as_json: bool) -> None:
    """The SBOM of NAME VERSION (the document with --json; a summary otherwise)."""
    import json

    from ota.sbom import load_sbom

    data = _release_sbom(_project(project_dir), name, version)
    view = load_sbom(data)
    if as_json:
        click.echo(json.dumps(json.loads(data), indent=2, sort_keys=True))
        return
    lines = [f"SBOM {view.serial_number}"]
    if view.model:
        lines.append(f"model {view.model.name} {view.model.version} {view.model.purl}")
    if view.model_card:
        card = view.model_card
        lines.append(f"  card: ir {card.ir_version}, {card.parameters} parameters, "
                     f"precision {'/'.join(card.precision)}, {card.node_count} nodes")  # fmt: skip
    lines += [f"  {c.type} {c.name} {c.version} {c.purl}".rstrip() for c in view.components]
    click.echo("\n".join(lines))


@sbom.command("diff")
@click.argument("name")
@click.argument("old")
@click.argument("new")
@project_option
@json_option
def sbom_diff(name: str, old: str, new: str, project_dir: str, as_json: bool) -> None:
    """What changed between the SBOMs of NAME OLD and NAME NEW."""
    from ota.sbom import diff_sboms, render_diff

    project = _project(project_dir)
    diff = diff_sboms(_release_sbom(project, name, old), _release_sbom(project, name, new))
    emit(diff.to_dict(), as_json, lambda: render_diff(diff))


@click.command()
@project_option
@click.option("--osv", "osv_dir", type=click.Path(exists=True, path_type=Path), required=True,
              help="Offline OSV export (folder of OSV JSON records, or all.zip).")  # fmt: skip
@fail_on_option
@click.option("--fleet", "fleet_url", envvar="OTA_FLEET_URL",
              help="Fleet service URL: also list the devices running each affected release.")
@click.option("--fleet-token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Operator token (scope read) for --fleet; default $OTA_FLEET_TOKEN.")
@json_option
def vulns(project_dir: str, osv_dir: Path, fail_on: str, fleet_url: str | None,
          fleet_token_file: Path | None, as_json: bool) -> None:
    """Match every live release's SBOM against an offline OSV export (exit 4 on a match)."""
    require("repository", "`ota vulns`")
    from ota.repository import releases
    from ota.sbom import load_osv, match_osv, severity_at_least

    project = _project(project_dir)
    rows = releases(project)
    sboms = [(f"{r.name}@{r.state.version}", _release_sbom(project, r.name, r.state.version))
             for r in rows]  # fmt: skip
    db = load_osv(osv_dir)
    matches = match_osv(sboms, db)
    bad = [m for m in matches if severity_at_least(m, fail_on)]
    fleet: dict[str, Any] = {}
    if fleet_url:  # which devices run an affected release (ota.fleet, the service's answer)
        from ota.fleet._query import fleet_exposure, read_token

        fleet = fleet_exposure(fleet_url, read_token(fleet_token_file),
                               sorted({m.release for m in matches}))
    emit(
        {
            "releases": len(rows),
            "matches": [m.to_dict() for m in matches],
            "osv_warnings": list(db.warnings),
            **({"fleet": fleet} if fleet_url else {}),
        },
        as_json,
        lambda: "\n".join(
            [f"{len(rows)} live releases, {len(matches)} vulnerable components"]
            + [
                f"  {m.release}: {m.vuln_id} {m.severity.name if m.severity else 'UNKNOWN'} "
                + (f"{m.package}: {m.note}" if m.note else f"{m.package}@{m.version}")
                + f" fixed in {', '.join(m.fixed) or '-'}"
                for m in matches
            ]
            + [f"  {r} runs on {f['devices']} devices: {' '.join(f['sample'][:10])}"
               for r, f in fleet.items()]
        ),
    )
    if bad:
        affected = sorted({m.release for m in bad})
        raise VulnerableReleases(f"{len(affected)} releases have known vulnerabilities at or "
                                 f"above {fail_on}: {', '.join(affected[:10])}")  # fmt: skip


def _extend_publish(cmd: click.Command) -> None:
    """Add the publish policy options to ``ota publish`` (once, however often registered)."""
    if getattr(cmd, "_ota_policy_options", False) or cmd.callback is None:
        return
    cmd.params += [
        click.Option(["--policy", "policy_file"], type=click.Path(exists=True, dir_okay=False,
                     path_type=Path), help="Publish policy TOML (default: ota.toml [policy])."),
        click.Option(["--waive"], multiple=True, help="Waive a policy rule (needs --reason)."),
        click.Option(["--reason"], default="", help="Why the rules are waived (recorded)."),
        click.Option(["--actor"], default=None, help="Who publishes (default $OTA_ACTOR/$USER)."),
        click.Option(["--osv", "policy_osv"], type=click.Path(exists=True, path_type=Path),
                     help="Offline OSV export for the policy's vulnerability rule."),
    ]  # fmt: skip
    original = cmd.callback

    def callback(**kw: Any) -> Any:
        require("repository", "`ota publish`")  # before anything is read or written
        from ota.repository._policy import PolicyContext, load_policy, reset_context, use_context

        policy_file, waive = kw.pop("policy_file"), kw.pop("waive")
        reason, actor, osv = kw.pop("reason"), kw.pop("actor"), kw.pop("policy_osv")
        default = Path(kw["project_dir"]) / "ota.toml"
        if policy_file is None and not default.exists():
            return original(**kw)  # no project: the command reports it
        ctx = PolicyContext.build(load_policy(policy_file or default), waive=waive,
                                  reason=reason, actor=actor or "", osv=osv)  # fmt: skip
        token = use_context(ctx)
        try:
            return original(**kw)
        finally:
            reset_context(token)

    cmd.callback = callback
    cmd._ota_policy_options = True  # type: ignore[attr-defined]


def register(group: click.Group) -> None:
    """Add this module's commands to ``group`` (and the policy options to ``publish``)."""
    for cmd in (audit, verify, log, sbom, vulns):
        group.add_command(cmd)
    publish = group.commands.get("publish")
    if publish is not None:
        _extend_publish(publish)
