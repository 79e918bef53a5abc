"""``trust/signers.json``: which model-signing keys devices accept for which model names.

The document is a target of the top-level ``targets`` role (offline key), so only the holder of
that key can change who may sign which model; devices refuse a bundle whose model-signing
signature is not by a key listed for its name (``fnmatch`` on the model globs). The publisher
checks the same rule before committing a release (:func:`check_publisher`), so a team cannot
publish a model the devices would refuse.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tuf.api.exceptions import LengthOrHashMismatchError

from ota.bundle import (
    MAX_SIGNERS_BYTES,
    SIGNERS_TARGET,
    FormatError,
    SignerEntry,
    parse_signers,
    signers_document,
)
from ota.errors import ConfigError, InputError, SecurityError
from ota.repository._project import key_fingerprint, put_target_file, target_storage_key
from ota.repository._txn import Transaction

if TYPE_CHECKING:
    from ota.repository._project import Project


def read_signers(project: Project, txn: Transaction) -> list[SignerEntry]:
    """The committed (or pending) ``trust/signers.json``; empty if there is none.

    Raises:
        SecurityError: the stored document does not match its signed target, or is malformed.
    """
    info = txn.targets().signed.targets.get(SIGNERS_TARGET)
    if info is None:
        return []
    sha = info.hashes["sha256"]
    data, _ = project.storage.get(target_storage_key(info.path, sha), max_bytes=MAX_SIGNERS_BYTES)
    try:
        info.verify_length_and_hashes(data)
    except LengthOrHashMismatchError as e:
        raise SecurityError(f"stored {SIGNERS_TARGET} does not match its target: {e}") from e
    try:
        return parse_signers(data)
    except FormatError as e:
        raise SecurityError(f"stored {SIGNERS_TARGET} is malformed: {e}") from e


def write_signers(project: Project, txn: Transaction, entries: list[SignerEntry]) -> None:
    """Upload a new ``trust/signers.json`` and list it in ``targets`` (offline key at commit)."""
    doc = signers_document(entries)
    info = put_target_file(project.storage, SIGNERS_TARGET, doc)
    txn.edit("targets").targets[SIGNERS_TARGET] = info


def release_fingerprint(project: Project) -> str | None:
    """Key id (DER sha256) of the project's model-signing public key, if one is configured.

    Raises:
        ConfigError: the configured public key cannot be read.
    """
    if not project.config.release_pub:
        return None
    path = project.abspath(project.config.release_pub)
    try:
        return key_fingerprint(path.read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the release public key {path}: {e}") from e


def check_publisher(project: Project, txn: Transaction, name: str, target_path: str) -> None:
    """Refuse to publish ``name`` unless devices would accept it from this publisher.

    The release target's role must be this project's team role (when ``[repository] team`` is
    set), and the project's model-signing key must be listed for ``name`` in
    ``trust/signers.json``.

    Raises:
        InputError: the model is outside the team's globs, or the signing key is not allowed.
    """
    team = project.config.team
    role = txn.bin_for(target_path)
    if team and role != team:
        raise InputError(
            f"{name} is not a model of team {team} (its releases belong to role {role})",
            remedy="publish it from the owning team's project, or widen the team's --models",
        )
    fingerprint = release_fingerprint(project)
    if fingerprint is None:
        return
    entries = read_signers(project, txn)
    if not any(e.keyid == fingerprint and e.allows(name) for e in entries):
        raise InputError(
            f"the model-signing key {fingerprint[:16]} is not allowed to sign {name} "
            f"in {SIGNERS_TARGET}: devices would refuse this release",
            remedy="use the owning team's signing key, or `ota delegate add` it for this model",
        )
