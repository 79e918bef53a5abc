"""Before a command writes anything: does this machine hold every key the command signs with?

A command that finds a missing key half-way (after chunks were uploaded, an audit-log entry was
appended or a new key was recorded) leaves debris and a confusing message. Every writing command
(publish, promote, pause, yank, rollback, key rotation and revocation) calls
:func:`require_keys` first; it loads each signer the command will need exactly as the commit
will (``_LazySigners``: URI from ``ota.toml``, public key from the stored metadata, so a swapped
key file is caught too) and raises one :class:`MissingKeys` naming all that are missing.

Invariant: :func:`require_keys` writes nothing, to storage or to disk.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from securesystemslib.signer import Key

from ota.errors import ConfigError

if TYPE_CHECKING:
    from ota.repository._project import Project
    from ota.repository._txn import Transaction

_REMEDY = (
    "restore the key files, or fix the URIs under [signers] / [release] in ota.toml "
    "(`ota key list` shows which keys sign here); nothing was written"
)


class MissingKeys(ConfigError):
    """One or more signing keys the command needs are not usable on this machine (exit 9)."""

    def __init__(self, what: str, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{what} needs keys this machine cannot use:\n{lines}", remedy=_REMEDY)


def key_problem(project: Project, keyid: str, public: Key) -> str | None:
    """Why this machine cannot sign with ``keyid`` (None when it can). Writes nothing."""
    from ota.repository._project import _resolve_uri, load_signer

    uri = project.config.signers.get(keyid)
    if uri is None:
        return f"key {keyid[:16]} is not configured here (no URI under [signers])"
    try:
        load_signer(_resolve_uri(uri, project.root_dir), public)
    except ConfigError as e:
        return f"key {keyid[:16]} ({uri}): {e}"
    return None


def release_key_problem(project: Project) -> str | None:
    """Why the model-signing (release) key cannot sign here, or None."""
    from ota.repository._publish import load_release_signer

    cfg = project.config
    if not cfg.release_key or not cfg.release_pub:
        return "release signing key: not configured ([release] signing_key / public_key)"
    priv, pub = project.abspath(cfg.release_key), project.abspath(cfg.release_pub)
    for what, path in (("private", priv), ("public", pub)):
        if not path.is_file():
            return f"release signing key: {what} key file {path} not found"
    try:
        load_release_signer(priv, pub)
    except ConfigError as e:
        return f"release signing key: {e}"
    return None


def role_problems(project: Project, txn: Transaction, role: str) -> list[str]:
    """Why ``role`` cannot be signed here (its threshold of keys is not usable); [] if it can."""
    keys, threshold = txn.role_keys(role)
    problems = {k: key_problem(project, k, pub) for k, pub in keys.items()}
    usable = sum(1 for p in problems.values() if p is None)
    if usable >= threshold:
        return []
    return [
        f"cannot sign {role} ({usable} of its keys usable, threshold {threshold}): {p}"
        for p in problems.values()
        if p
    ]


def require_keys(
    project: Project,
    what: str,
    *,
    targets: Iterable[str] = (),
    roles: Iterable[str] = (),
    release_key: bool = False,
    extra: Iterable[str] = (),
    logged: bool = True,
    head: bool = True,
    publishes: str | None = None,
) -> None:
    """Raise :class:`MissingKeys` unless every key needed is usable here.

    ``targets``: target paths the command adds or edits (the role answering for each, as the
    client walks the tree, must be signed); ``roles``: further roles; snapshot and timestamp
    are needed unless ``head`` is False; ``logged``: the command anchors an audit-log entry
    (the role holding the anchor must be signed); ``release_key``: the model-signing key;
    ``extra``: problems the caller found; ``publishes``: the model a new release of which is
    committed (its first target path): the project's model-signing key must be listed for it
    and, in a team project, the path must be the team's
    (:func:`~ota.repository._trust.check_publisher`, checked again at commit).

    Raises:
        MissingKeys: listing every problem at once.
        InputError: this project may not publish ``publishes`` (see ``check_publisher``).
    """
    from ota.repository._auditlog import ANCHOR_TARGET
    from ota.repository._txn import Transaction

    txn = Transaction.begin(project.storage, project.signers, project.expiry())
    targets = list(targets)
    needed: dict[str, None] = {}
    for path in [*targets, *([ANCHOR_TARGET] if logged else [])]:
        needed[txn.bin_for(path)] = None
    for role in [*roles, *(["snapshot", "timestamp"] if head else [])]:
        needed[role] = None
    problems = list(extra)
    for role in needed:
        problems += role_problems(project, txn, role)
    if release_key and (p := release_key_problem(project)) is not None:
        problems.append(p)
    if problems:
        raise MissingKeys(what, problems)
    if publishes is not None:
        from ota.repository._trust import check_publisher

        check_publisher(project, txn, publishes, targets[0])
