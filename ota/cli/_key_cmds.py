"""Key management commands: ``ota delegate …``, ``ota root …``, ``ota key …``, ``ota refresh``.

Each parses, calls :mod:`ota.repository` (``_delegate``, ``_rootceremony``, ``_keyadmin``),
prints. ``ota root sign`` needs no project and no storage: it runs on the offline machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ota.cli._output import emit, json_option, project_option
from ota.errors import InputError


def _project(project_dir: str) -> Any:
    from ota.repository import Project

    return Project.open(Path(project_dir))


def _key(project: Any, spec: str) -> Any:
    from ota.repository._keyspec import parse_key

    return parse_key(spec, Path.cwd())


def _key_here(project: Any, spec: str) -> Any:
    """Like :func:`_key`, but a ``NAME.pub.pem`` whose private half ``NAME.pem`` lies beside
    it (as ``ota key generate`` writes them) names that private key too: online roles (bins,
    timestamp, snapshot) must be signed on this machine."""
    from ota.repository._keyspec import KeySpec, parse_key
    from ota.signing import private_half

    found = parse_key(spec, Path.cwd())
    if found.uri is None and (priv := private_half(Path(spec).absolute())) is not None:
        full = parse_key(f"file2:{priv}", Path.cwd())
        if full.keyid != found.keyid:
            raise InputError(f"{priv} is not the private half of {spec}")
        return KeySpec(found.key, full.uri)
    return found


# -- ota delegate ---------------------------------------------------------------------------


@click.group()
def delegate() -> None:
    """Team roles: which team's keys may release which models."""


def _team_line(t: Any) -> str:
    return (
        f"{t.name}: models {', '.join(t.models)}; {t.threshold} of "
        f"{', '.join(k[:16] for k in t.keyids)}; model-signing "
        f"{', '.join(k[:16] for k in t.signing_keys) or '-'}; {t.releases} release targets"
    )


@delegate.command("add")
@click.argument("team")
@project_option
@click.option("--models", "models", multiple=True, required=True, help="Model name glob.")
@click.option("--key", "keys", multiple=True, required=True, help="PUBKEY.pem or key URI.")
@click.option("--threshold", type=int, default=1, show_default=True)
@click.option(
    "--signing-key", "signing", multiple=True, help="Team's model-signing P-256 public key (PEM)."
)
@json_option
def delegate_add(
    team: str,
    project_dir: str,
    models: tuple[str, ...],
    keys: tuple[str, ...],
    threshold: int,
    signing: tuple[str, ...],
    as_json: bool,
) -> None:
    """Delegate releases of models matching --models to TEAM's keys (offline targets key)."""
    from ota.repository._delegate import add_team
    from ota.repository._keyspec import model_signing_pem

    project = _project(project_dir)
    specs = [_key(project, k) for k in keys]
    pems = [model_signing_pem(s) for s in signing]
    t = add_team(project, team, models, specs, threshold, pems)
    emit(t.to_dict(), as_json, lambda: "delegated " + _team_line(t))


@delegate.command("list")
@project_option
@json_option
def delegate_list(project_dir: str, as_json: bool) -> None:
    """List team roles in the order devices consult them."""
    from ota.repository._delegate import list_teams

    teams = list_teams(_project(project_dir))
    emit(
        [t.to_dict() for t in teams],
        as_json,
        lambda: "\n".join(_team_line(t) for t in teams) or "no teams",
    )


@delegate.command("add-key")
@click.argument("team")
@project_option
@click.option("--key", "key", required=True, help="PUBKEY.pem or key URI.")
@click.option("--threshold", type=int, default=None)
@json_option
def delegate_add_key(
    team: str, project_dir: str, key: str, threshold: int | None, as_json: bool
) -> None:
    """Add a key to TEAM (offline targets key)."""
    from ota.repository._delegate import add_team_key

    project = _project(project_dir)
    t = add_team_key(project, team, _key(project, key), threshold)
    emit(t.to_dict(), as_json, lambda: _team_line(t))


@delegate.command("revoke-key")
@click.argument("team")
@click.argument("keyid")
@project_option
@click.option("--replacement", default=None, help="PUBKEY.pem or key URI to add instead.")
@click.option("--force", is_flag=True, help="Allow TEAM to fall under its threshold (freeze).")
@json_option
def delegate_revoke_key(
    team: str,
    keyid: str,
    project_dir: str,
    replacement: str | None,
    force: bool,
    as_json: bool,
) -> None:
    """Remove KEYID from TEAM: devices refuse releases signed only by it."""
    from ota.repository._delegate import revoke_team_key
    from ota.repository._keyadmin import resolve_keyid

    project = _project(project_dir)
    repl = _key(project, replacement) if replacement else None
    t = revoke_team_key(project, team, resolve_keyid(project, keyid), replacement=repl, force=force)
    emit(t.to_dict(), as_json, lambda: _team_line(t))


# -- ota root -------------------------------------------------------------------------------


@click.group()
def root() -> None:
    """Root ceremony: export an unsigned root, sign it offline, publish it."""


def _pairs(values: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    return [(a, b) for a, b in values]


@root.command("export")
@project_option
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--add-key", "add", nargs=2, multiple=True, metavar="ROLE KEY")
@click.option("--remove-key", "remove", nargs=2, multiple=True, metavar="ROLE KEYID")
@click.option("--threshold", "thresholds", nargs=2, multiple=True, metavar="ROLE N")
@click.option("--expires-days", type=float, default=None)
@json_option
def root_export(
    project_dir: str,
    out: Path,
    add: tuple[tuple[str, str], ...],
    remove: tuple[tuple[str, str], ...],
    thresholds: tuple[tuple[str, str], ...],
    expires_days: float | None,
    as_json: bool,
) -> None:
    """Write root N+1 (unsigned) derived from the current root."""
    from ota.repository._rootceremony import RootChange, export_root, write_root_file

    project = _project(project_dir)
    try:
        th = {role: int(n) for role, n in thresholds}
    except ValueError as e:
        raise InputError(f"bad --threshold: {e}") from e
    change = RootChange(
        add=[(role, _key(project, spec)) for role, spec in add],
        remove=_pairs(remove),
        thresholds=th,
        expires_days=expires_days,
    )
    md = export_root(project, change)
    project.save_config()
    write_root_file(md, out)
    emit(
        {"version": md.signed.version, "out": str(out)},
        as_json,
        f"wrote unsigned root {md.signed.version} to {out}; sign it with `ota root sign`",
    )


@root.command("sign")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--key", "keys", multiple=True, required=True, help="file2: or envvar: URI.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@json_option
def root_sign(file: Path, keys: tuple[str, ...], out: Path | None, as_json: bool) -> None:
    """Sign the root in FILE (offline; needs no project or storage)."""
    from ota.repository._rootceremony import sign_root_file

    done = sign_root_file(file, list(keys), out)
    emit(
        [{"keyid": d.keyid, "in_new_root": d.in_new_root} for d in done],
        as_json,
        lambda: "\n".join(
            f"signed with {d.keyid[:16]}"
            + ("" if d.in_new_root else " (not in the new root: counts for the old one only)")
            for d in done
        ),
    )


@root.command("publish")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@project_option
@json_option
def root_publish(files: tuple[Path, ...], project_dir: str, as_json: bool) -> None:
    """Verify (threshold of old and new root) and publish root N+1; signatures of several
    FILES of the same root are merged."""
    from ota.repository._rootceremony import merge_signatures, publish_root

    r = publish_root(_project(project_dir), merge_signatures(files))
    emit(
        r.to_dict(),
        as_json,
        f"published root {r.version}"
        + (f"; re-signed {', '.join(r.resigned)}" if r.resigned else ""),
    )


# -- ota key, ota refresh ----------------------------------------------------------------------


@click.group()
def key() -> None:
    """Key inventory, rotation and revocation."""


@key.command("list")
@project_option
@json_option
def key_list(project_dir: str, as_json: bool) -> None:
    """Every key the repository lists, where, and whether it is configured here."""
    from ota.repository._keyadmin import list_keys

    rows = list_keys(_project(project_dir))
    emit(
        [r.to_dict() for r in rows],
        as_json,
        lambda: "\n".join(
            f"{r.keyid[:16]} {r.kind:13} {', '.join(r.roles)} ({r.where})"
            + (f"\n    {r.problem}" if r.problem else "")
            for r in rows
        ),
    )


def _change_text(c: Any) -> str:
    return "\n".join(c.actions)


@key.command("generate")
@click.argument(
    "role",
    type=click.Choice(["root", "targets", "snapshot", "timestamp", "bins", "team", "release"]),
)
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Folder for NAME.pem (private, 0600) and NAME.pub.pem.",
)
@click.option("--name", default=None, help="File name stem (default: ROLE-<UTC time>).")
@json_option
def key_generate(role: str, out_dir: Path, name: str | None, as_json: bool) -> None:
    """Generate a key pair for ROLE: Ed25519 for TUF roles, ECDSA P-256 for the model-signing
    ("release") key. Needs no project or network: run it where the key will live."""
    from datetime import UTC, datetime

    from ota.signing import ROLE_KEY_KINDS, NewKey

    kind = ROLE_KEY_KINDS[role]
    stem = name or f"{role}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}"
    new = NewKey.generate(kind)
    out_dir.mkdir(parents=True, exist_ok=True)
    uri = new.write(out_dir, stem)
    priv, pub = out_dir.absolute() / f"{stem}.pem", out_dir.absolute() / f"{stem}.pub.pem"
    keyid = new.fingerprint if role == "release" else new.keyid
    emit(
        {"role": role, "algorithm": kind, "keyid": keyid, "private_key": str(priv),
         "public_key": str(pub), "uri": uri, "public_pem": new.public_pem.decode()},
        as_json,
        lambda: f"{role} key ({kind}) {keyid}\nprivate: {priv} (mode 0600)\n"
        f"public:  {pub}\n{new.public_pem.decode().rstrip()}",
    )  # fmt: skip


@key.command("rotate")
@click.argument("role", type=click.Choice(["timestamp", "snapshot", "targets", "bins"]))
@project_option
@click.option("--new-key", default=None, help="Key URI or PUBKEY.pem (default: generate).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@json_option
def key_rotate(
    role: str, project_dir: str, new_key: str | None, out: Path | None, as_json: bool
) -> None:
    """Replace ROLE's key (a new root for timestamp/snapshot/targets)."""
    from ota.repository._keyadmin import rotate

    project = _project(project_dir)
    spec = _key_here(project, new_key) if new_key else None
    c = rotate(project, role, spec, out=out)
    emit(c.to_dict(), as_json, lambda: _change_text(c))


@key.command("revoke")
@click.argument("keyid")
@project_option
@click.option("--replacement", default=None, help="TUF key: PUBKEY.pem or key URI.")
@click.option("--replacement-signing", default=None, help="Model-signing P-256 public key.")
@click.option("--force", is_flag=True, help="Let a team or model glob fall under threshold.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@json_option
def key_revoke(
    keyid: str,
    project_dir: str,
    replacement: str | None,
    replacement_signing: str | None,
    force: bool,
    out: Path | None,
    as_json: bool,
) -> None:
    """Remove a compromised key wherever it is listed."""
    from ota.repository._keyadmin import revoke
    from ota.repository._keyspec import model_signing_pem

    project = _project(project_dir)
    c = revoke(
        project,
        keyid,
        replacement=_key_here(project, replacement) if replacement else None,
        signing_replacement=model_signing_pem(replacement_signing) if replacement_signing else None,
        force=force,
        out=out,
    )
    emit(c.to_dict(), as_json, lambda: _change_text(c))


@click.command()
@project_option
@click.option("--within-days", type=float, default=None, help="Default: half of each lifetime.")
@json_option
def refresh(project_dir: str, within_days: float | None, as_json: bool) -> None:
    """Re-sign online roles that expire soon (safe from cron)."""
    from ota.repository._keyadmin import refresh as do

    r = do(_project(project_dir), within_days)
    emit(
        r.to_dict(),
        as_json,
        lambda: "\n".join(
            [f"re-signed {', '.join(_short(r.resigned))}" if r.resigned else "nothing due"]
            + [f"warning: {w}" for w in r.warnings]
        ),
    )


def _short(roles: list[str]) -> list[str]:
    bins = [r for r in roles if r.startswith("bins-")]
    rest = [r for r in roles if not r.startswith("bins-")]
    return rest + ([f"{len(bins)} bins"] if bins else [])


def register(group: click.Group) -> None:
    for cmd in (delegate, root, key, refresh):
        group.add_command(cmd)
