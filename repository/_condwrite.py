"""Does the store honour conditional writes? The probe, its cache, and single-publisher mode.

The publish transaction (``docs/adr/0003-publish-transaction.md``) and the audit log are safe
between publishers only if the store decides ``If-None-Match: *`` and ``If-Match`` atomically.
Some S3-compatible stores accept both headers and ignore them (the npm ``s3rver`` 3.7 answers
200 and overwrites): there, two publishers silently lose releases. So before the first
conditional write of a :class:`~ota.repository._s3.S3Storage`, the store is probed:

* **Full probe** (first use of a store): a fresh canary key is created with ``If-None-Match: *``,
  created again (must be refused), replaced with a wrong ``If-Match`` (must be refused), read
  back (must hold the first bytes), then deleted. On success a *marker* object
  (:data:`MARKER_KEY`) is created, recording that this store passed.
* **Quick check** (every later use, one per process and storage): the marker is re-created with
  ``If-None-Match: *`` and replaced with a wrong ``If-Match``; both must be refused. Two tiny
  requests instead of five, and still a real test of the store's behaviour, so a store swapped
  under the project (a bucket synced, marker included, to a store that ignores the headers) is
  caught: there the "refused" writes succeed. The marker's bytes never change, so a store that
  ignores the headers overwrites it with the same bytes and loses nothing.

A store that fails raises :class:`~ota.errors.ConfigError` (exit 9) naming the requirement,
unless the project chose **single-publisher mode** (``publishers = "single"`` in ``ota.toml``).
There the storage takes an exclusive ``flock`` on a lock file named after the store
(:class:`HostLock`) at its first use and holds it until it is closed or the process exits, so
whole commands (publish, promote, key rotation...) run one at a time on this host, reads
included (such a store may also rewrite objects in place: s3rver does, and a read racing a write
sees a cut-short object). Under the lock, conditional writes are emulated: a HEAD, compare, then
an unconditional PUT. That is correct only between processes that share this machine's
``/tmp`` (never TMPDIR, which differs between sessions; ``$OTA_LOCK_DIR`` to choose another);
two publisher machines (or containers) would race exactly as before. The mode says so; the
operator promises that one publisher host runs at a time.

Invariant: :func:`check` returns only after the store refused both wrong conditional writes in
this process (mode ``native``), or in single-publisher mode (mode ``emulated``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from ota.errors import ConfigError, ConflictError, LocalError
from ota.repository._storage import NotFound, PreconditionFailed

PROBE_PREFIX = "_ota/"
MARKER_KEY = f"{PROBE_PREFIX}conditional-writes.json"
MARKER = (
    b'{"what":"edge-ota: this store refused a conditional write that had to fail; '
    b'see docs/adr/0003-publish-transaction.md","version":1}\n'
)
# An etag no store hands out for these bytes (a valid MD5-sized hex, so stores parse it).
WRONG_ETAG = "0" * 32
REQUIREMENT = (
    "the store must honour conditional writes (PutObject with If-None-Match: * and If-Match "
    "refused with 412 when they do not hold)"
)

Mode = Literal["native", "emulated"]
# put(key, data, if_none_match, if_match) on the raw store, without any probe or emulation
RawPut = Callable[[str, bytes, bool, "str | None"], str]
RawGet = Callable[[str], bytes]
RawDelete = Callable[[str], None]


class NotHonoured(Exception):
    """The store accepted a conditional write that had to fail (internal to this module)."""


@dataclass(frozen=True)
class ProbeResult:
    """What :func:`probe` found: ``honoured`` and, if not, which check failed."""

    honoured: bool
    full: bool  # the full canary probe ran (False: the quick check on the marker)
    failed: str = ""


def probe(put: RawPut, get: RawGet, delete: RawDelete) -> ProbeResult:
    """Test the store's conditional writes (the quick check if the marker exists, else the full
    canary probe, which then creates the marker). Never leaves a canary behind.

    Raises:
        TransientError, ConfigError, StorageError: the store failed (not "not honoured").
    """
    try:
        put(MARKER_KEY, MARKER, True, None)
    except PreconditionFailed:
        # The marker exists and the store refused to create it again: now the wrong If-Match.
        try:
            put(MARKER_KEY, MARKER, False, WRONG_ETAG)
        except PreconditionFailed:
            return ProbeResult(honoured=True, full=False)
        return ProbeResult(False, False, "a PutObject with a wrong If-Match was accepted")
    # No marker (a new store, or one that ignored If-None-Match on it): the full probe.
    try:
        _canary(put, get, delete)
    except NotHonoured as e:
        with contextlib.suppress(Exception):
            delete(MARKER_KEY)  # never leave a marker on a store that failed
        return ProbeResult(False, True, str(e))
    return ProbeResult(honoured=True, full=True)


def _canary(put: RawPut, get: RawGet, delete: RawDelete) -> None:
    key = f"{PROBE_PREFIX}probe-{uuid.uuid4().hex}"
    first = b"first\n"
    try:
        put(key, first, True, None)
        try:
            put(key, b"second\n", True, None)
        except PreconditionFailed:
            pass
        else:
            raise NotHonoured("a second PutObject with If-None-Match: * was accepted")
        try:
            put(key, b"third\n", False, WRONG_ETAG)
        except PreconditionFailed:
            pass
        else:
            raise NotHonoured("a PutObject with a wrong If-Match was accepted")
        try:
            if get(key) != first:
                raise NotHonoured("a refused conditional write changed the object")
        except NotFound as e:
            raise NotHonoured("the canary object vanished") from e
    finally:
        with contextlib.suppress(Exception):
            delete(key)


def refusal(store_url: str, endpoint: str, result: ProbeResult) -> ConfigError:
    """The error for a store that does not honour conditional writes (exit 9)."""
    return ConfigError(
        f"refusing to write to {store_url} (endpoint {endpoint}): {REQUIREMENT}; "
        f"this store does not: {result.failed}. Concurrent publishers would lose releases "
        "and audit-log entries without an error",
        remedy="use a store that honours them (AWS S3 does since 2024; `ota` probes any other "
        "store on first use), or, if exactly one publisher host will ever write to this "
        'repository, set publishers = "single" under [repository] in ota.toml '
        "(docs/runbooks/publish.md, single-publisher mode)",
    )


def lock_path(store_id: str) -> Path:
    """The host-wide lock file of one store (``$OTA_LOCK_DIR``, else ``/tmp``).

    Not ``tempfile.gettempdir()``: it follows TMPDIR/TEMP/TMP, which differ between a login
    shell, a CI job and a service on one host, and two publishers would hold two locks."""
    folder = os.environ.get("OTA_LOCK_DIR") or (
        "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()  # noqa: S108 - shared on purpose
    )
    digest = hashlib.sha256(store_id.encode()).hexdigest()[:24]
    return Path(folder) / f"edge-ota-publish-{digest}.lock"


class HostLock:
    """The exclusive, host-wide lock of one store, shared by every holder in this process.

    ``acquire`` blocks (polling, up to ``wait_s``) while another process holds it; holders in
    this process share one ``flock`` (counted), so two storages of one store in one process do
    not deadlock. The lock is released when the last holder releases it or the process exits.
    """

    _held: ClassVar[dict[str, tuple[int, int]]] = {}  # store id -> (fd, holders)
    _mutex: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def acquire(cls, store_id: str, wait_s: float = 600.0) -> None:
        """Take the lock of ``store_id``.

        Raises:
            ConflictError: another process held it for ``wait_s`` seconds.
            LocalError: the lock file cannot be opened.
        """
        with cls._mutex:
            if store_id in cls._held:
                fd, n = cls._held[store_id]
                cls._held[store_id] = (fd, n + 1)
                return
            fd = _open_lock(lock_path(store_id))
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        os.close(fd)
                        raise ConflictError(
                            f"another publisher on this host has held {lock_path(store_id)} "
                            f"for {wait_s:g} s (single-publisher mode)",
                            remedy="wait for it to finish, then retry",
                        ) from None
                    time.sleep(0.05)
            cls._held[store_id] = (fd, 1)

    @classmethod
    def release(cls, store_id: str) -> None:
        """Drop one hold of ``store_id``'s lock (the last one unlocks)."""
        with cls._mutex:
            if store_id not in cls._held:
                return
            fd, n = cls._held.pop(store_id)
            if n > 1:
                cls._held[store_id] = (fd, n - 1)
            else:
                os.close(fd)  # closing the only descriptor releases the flock


def _open_lock(path: Path) -> int:
    flags = os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        try:
            return os.open(path, flags | os.O_RDWR, 0o666)
        except PermissionError:  # created by another user: a read-only fd locks as well
            return os.open(path, flags | os.O_RDONLY)
    except OSError as e:
        reason = "a symlink" if e.errno == errno.ELOOP else (e.strerror or str(e))
        raise LocalError(f"cannot open the publish lock {path}: {reason}") from e


__all__ = [
    "MARKER_KEY",
    "PROBE_PREFIX",
    "REQUIREMENT",
    "Mode",
    "ProbeResult",
    "HostLock",
    "lock_path",
    "probe",
    "refusal",
]
