"""When the snapshot may forget retired roles (ADR 0010): after a snapshot-key rotation
without a bridge.

A retired role (an old hash bin of a migrated repository, a split archive segment) is delegated
by nobody, but the snapshot must keep listing it: python-tuf (``TrustedMetadataSet.
update_snapshot``, tuf 7.0.1) refuses a new snapshot that drops a role listed in the *trusted*
snapshot. The trusted snapshot is the device's stored one, loaded at each refresh only if its
signatures verify under the device's newest root (``Updater._load_snapshot`` loads it with
``_load_data(Snapshot, data, self.root)``; one that does not verify is discarded, and the new
snapshot is then compared with nothing: TUF 5.6's fast-forward recovery after a snapshot key
rotation).

So the entries may go once **no snapshot that lists them can verify under the newest root**.
Checked conservatively, from what the repository holds:

* the snapshot being replaced (the newest, which lists them) does not verify under the newest
  root: it was signed by keys the newest root no longer lists for ``snapshot``; and
* none of the newest root's snapshot keys is listed for ``snapshot`` by any earlier root; and
* no stored older snapshot verifies under the newest root. The roots alone do not rule that
  out: a bridged rotation signs snapshots with the new key *before* root N+1 exists, and one
  whose root write then failed, retried later without the old key (no bridge), publishes a
  root N+1 whose key no earlier root lists while devices may hold those bridged snapshots.
  This scan reads the stored snapshots once per such rotation (the first commit after it
  either drops the entries or signs a snapshot the newest root accepts, ending the checks).

A bridged rotation (old and new keys sign the snapshot before root N+1 appears, ADR 0004) fails
the first test, so it never drops anything: ``ota migrate-layout --drop-retired`` rotates the
snapshot key to a freshly generated key without a bridge. Only entries without a length that
no delegation reaches are dropped (a retired role is written with no length; a reachable role
always has one).
"""

from __future__ import annotations

from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Snapshot

from ota.errors import SecurityError
from ota.repository._meta import MAX_METADATA_BYTES, md_key
from ota.repository._meta import parse_metadata as _parse
from ota.repository._storage import NotFound, Storage


def lengthless(snapshot: Snapshot) -> list[str]:
    """Role names listed in ``snapshot`` without a length (retired roles are, and only them)."""
    return [name.removesuffix(".json") for name, m in snapshot.meta.items() if m.length is None]


def may_forget(store: Storage, root: Metadata[Root], snapshot: Metadata[Snapshot]) -> bool:
    """Whether no snapshot listing the current entries can verify under ``root`` (the newest
    root), so a new snapshot may drop entries without any client refusing it (module
    docstring). Reads the earlier roots only when the cheap test passes.
    """
    try:
        root.signed.verify_delegate(Snapshot.type, snapshot.signed_bytes, snapshot.signatures)
        return False  # a device may hold exactly this snapshot as trusted
    except UnsignedMetadataError:
        pass
    current = set(root.signed.roles[Snapshot.type].keyids)
    for version in range(1, root.signed.version):
        raw, _ = store.get(md_key(Root.type, version), max_bytes=MAX_METADATA_BYTES)
        old = _parse(raw, Root, f"root {version}")
        if current & set(old.signed.roles[Snapshot.type].keyids):
            return False
    return not _older_snapshot_verifies(store, root, current, snapshot.signed.version)


def _older_snapshot_verifies(
    store: Storage, root: Metadata[Root], keyids: set[str], latest: int
) -> bool:
    """Whether a stored snapshot older than ``latest`` verifies under ``root`` (a bridge's,
    signed by a key of ``root`` before ``root`` was published). Only files naming one of
    ``keyids`` in their bytes are parsed."""
    needles = [k.encode() for k in keyids]
    for key in store.list("metadata/"):
        version, _, rest = key.removeprefix("metadata/").partition(".")
        if rest != "snapshot.json" or not version.isdigit() or int(version) >= latest:
            continue
        try:
            raw, _ = store.get(key, max_bytes=MAX_METADATA_BYTES)
        except NotFound:
            continue
        if not any(n in raw for n in needles):
            continue
        try:
            old = _parse(raw, Snapshot, f"snapshot {version}")
        except SecurityError:
            return True  # cannot rule it out: keep the entries
        try:
            root.signed.verify_delegate(Snapshot.type, old.signed_bytes, old.signatures)
        except UnsignedMetadataError:
            continue
        return True
    return False
