"""Updates from, and reports to, offline media (ADR 0013): a folder or a tar archive written by
``ota offline export``, carried to a device with no route to the repository.

Update (``ota device update --from``): the ordinary update cycle of :mod:`._updater` (same
python-tuf session, same choice, staging, signature check, smoke test and A/B switch), with
one substitution: the connection pool. :class:`MediumPool` answers the fetchers' ``GET``
requests for ``<repo_url>/...`` from the medium, read-only (``O_RDONLY``; an archive is read
in place with ``pread``, never extracted). So:

* every trust decision is python-tuf's, over the device's own metadata folder (shared with
  network updates): an expired, altered or foreign medium, or one older than metadata the
  device has verified from any source, is refused as a network update would be;
* what the medium is for (the releases it carries, the hardware tier, the delta base) is read
  only from its *verified* timestamp (``x-ota-medium``); a medium for another tier is refused;
  only carried releases are considered (a subset of what the signed index allows: it can never
  make the device take a release the index and the device's policy would refuse);
* nothing on the medium is trusted for its name: paths are checked (no ``..``, no absolute
  names, no symlinks, regular files only), reads are bounded by the sizes the verified
  metadata announces (python-tuf, :class:`~._fetch.BlobFetcher`).

Reports (``ota device report --to``): the pending events, in the exact body the network path
posts (:func:`._report._body`), each file authenticated with HMAC-SHA256 keyed by the SHA-256
of the device's fleet credential (the value the fleet service stores; the credential itself
never touches the medium). Events stay queued until an acknowledgement written by ``ota fleet
import`` (authenticated the same way) comes back on a medium; an acknowledgement is honoured
only up to the first pending event outside the seq ranges the import stored (a report file
lost on the way is never forgotten) and the highest sequence number this device wrote to
media for that queue epoch. Folders on the medium that are links are refused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import stat
import tarfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Timestamp

from ota._atomic import write_bytes
from ota.bundle import DEFAULT_LIMITS, Limits, ModelIndex
from ota.errors import ConfigError, InputError, OtaError, SecurityError, TransientError

from . import _updater
from ._device import Device
from ._events import Snapshot
from ._fetch import FetchConfig, FetchStats
from ._install import Progress, SmokeRunner, Verifier, default_smoke, default_verifier
from ._report import MAX_BATCH, _body, _token
from ._tuf import TufSession

MEDIUM_FIELD = "x-ota-medium"
MEDIUM_FORMAT = "edge-ota.medium/1"
REPORT_FORMAT = "edge-ota.medium-report/1"
ACK_FORMAT = "edge-ota.medium-ack/1"
# A medium holds at most the chunks of its releases (2 x a manifest's bound is far beyond any
# stick) plus metadata: bounds the member table (~200 bytes a member) of an archive.
MAX_MEMBERS = 2 * DEFAULT_LIMITS.max_chunks + 65_536
MAX_HEADER_BYTES = 1024 * 1024  # what tarfile may read to parse one member's headers
MAX_ACK_BYTES = 64 * 1024
MAX_ACK_RANGES = 1024
MAX_REPORT_FILES = 64  # per ``report --to`` (64 x 100 events: the queue holds at most 512)
_COMPONENT = re.compile(r"^[A-Za-z0-9@+_~-][A-Za-z0-9@+_.~%=-]{0,254}\Z")
_MEDIUM_SEEN = "medium-reports.json"  # per queue epoch: highest seq written to media


class MediumError(SecurityError):
    """The medium cannot be used by this device (refused before anything was installed)."""

    remedy = "use a medium exported for this device (`ota offline export --device-class`)"


# -- reading a medium -------------------------------------------------------------------------


def safe_key(key: str) -> str | None:
    """``key`` if it is a plain relative path of safe components, else None."""
    parts = key.split("/")
    if len(key) > 1024 or not all(_COMPONENT.match(p) for p in parts):
        return None
    return key


class MediumReader:
    """Read-only access to the files of a medium by key (``metadata/1.root.json``)."""

    label: str

    def size(self, key: str) -> int | None:
        """The size of regular file ``key``, or None if there is none (or it is unsafe)."""
        raise NotImplementedError

    def pread(self, key: str, offset: int, n: int) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        """Release file handles."""


_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NOFOLLOW_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def open_regular(root: Path, parts: list[str]) -> int | None:
    """A read-only descriptor of the regular file ``root/parts...``, or None. No symlink
    below ``root`` is followed (each folder is opened with ``O_NOFOLLOW`` relative to the
    last, so swapping one for a link after a check changes nothing); nothing but a regular
    file is ever opened (``lstat`` first: opening a device node can act on the device), and
    the open cannot block (``O_NONBLOCK``: a FIFO swapped in after the ``lstat``); the
    opened file is checked again with ``fstat``, so what is read is what was checked."""
    if not parts:
        return None
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        for part in parts[:-1]:
            nxt = os.open(part, _NOFOLLOW_DIR, dir_fd=fd)
            os.close(fd)
            fd = nxt
        if not stat.S_ISREG(os.stat(parts[-1], dir_fd=fd, follow_symlinks=False).st_mode):
            return None
        ffd = os.open(parts[-1], _NOFOLLOW_FILE, dir_fd=fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(ffd).st_mode):
        os.close(ffd)
        return None
    return ffd


def read_regular(path: Path, max_bytes: int) -> bytes | None:
    """The content of regular file ``path`` (not a symlink, FIFO or device: never blocks), or
    None if it is not one or holds more than ``max_bytes``. Reads at most ``max_bytes + 1``."""
    fd = open_regular(path.parent, [path.name])
    if fd is None:
        return None
    try:
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(max_bytes + 1)
    finally:
        os.close(fd)
    return None if len(data) > max_bytes else data


class DirReader(MediumReader):
    """A medium folder. Symlinks anywhere below the root are refused, and so is anything but
    a regular file (see :func:`open_regular`: no check-then-use race)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.label = str(root)

    def _open(self, key: str) -> int | None:
        if safe_key(key) is None:
            return None
        return open_regular(self.root, key.split("/"))

    def size(self, key: str) -> int | None:
        fd = self._open(key)
        if fd is None:
            return None
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def pread(self, key: str, offset: int, n: int) -> bytes:
        fd = self._open(key)
        if fd is None:
            return b""
        try:
            return os.pread(fd, n, offset)
        finally:
            os.close(fd)


class _HeaderBudget:
    """The archive file as tarfile sees it while it parses headers: member data is skipped
    with ``seek``, so only headers are ever read, and at most ``budget`` bytes of them per
    member (a pax or GNU long-name header claiming gigabytes, or endless sparse extension
    blocks, would otherwise be read whole into memory)."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh
        self.budget = MAX_HEADER_BYTES

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > self.budget:
            raise _HeaderTooLarge(f"a member header of over {MAX_HEADER_BYTES} bytes")
        self.budget -= n
        data: bytes = self._fh.read(n)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        pos: int = self._fh.seek(offset, whence)
        return pos

    def tell(self) -> int:
        pos: int = self._fh.tell()
        return pos


class _HeaderTooLarge(Exception):
    pass


class TarReader(MediumReader):
    """An uncompressed tar archive, read in place: members are located once, then read with
    ``pread`` (thread-safe; no extraction, nothing written). Only regular members with safe
    names count; a name that appears twice makes the archive unusable (which copy is meant?).

    Bounded: at most :data:`MAX_MEMBERS` members and :data:`MAX_HEADER_BYTES` of headers per
    member are parsed, and only the safe regular members are kept (tarfile's own member list
    is emptied as it goes); a member whose data runs past the end of the file (a truncated
    copy) makes the archive unusable."""

    def __init__(self, path: Path) -> None:
        self.label = str(path)
        self._members: dict[str, tuple[int, int]] = {}
        real = path.resolve()  # the operator's own path may be a link; nothing in it may
        fd = open_regular(real.parent, [real.name])
        if fd is None:
            raise InputError(f"{path} is not a regular file", remedy="give the folder or "
                             "archive file written by `ota offline export`")  # fmt: skip
        self._fd = fd
        try:
            self._index(path)
        except BaseException:
            os.close(fd)
            raise

    def _index(self, path: Path) -> None:
        end = os.fstat(self._fd).st_size
        try:
            with os.fdopen(os.dup(self._fd), "rb") as fh:
                budget = _HeaderBudget(fh)
                with tarfile.open(fileobj=budget, mode="r:") as tar:  # type: ignore[call-overload]
                    for i in range(MAX_MEMBERS + 1):
                        budget.budget = MAX_HEADER_BYTES
                        info = tar.next()
                        tar.members.clear()
                        if info is None:
                            return
                        if i >= MAX_MEMBERS:
                            raise InputError(f"{path} has more than {MAX_MEMBERS} members")
                        if not info.isreg() or info.sparse or safe_key(info.name) is None:
                            continue
                        if info.offset_data + info.size > end:
                            raise InputError(
                                f"{path} is truncated: {info.name} runs past its end",
                                remedy="copy the medium again",
                            )
                        if info.name in self._members:
                            raise MediumError(f"{path} holds {info.name} twice")
                        self._members[info.name] = (info.offset_data, info.size)
        except _HeaderTooLarge as e:
            raise InputError(f"cannot read the medium archive {path}: {e}") from None
        except (OSError, tarfile.TarError) as e:
            raise InputError(f"cannot read the medium archive {path}: {e}") from e

    def size(self, key: str) -> int | None:
        m = self._members.get(key)
        return None if m is None else m[1]

    def pread(self, key: str, offset: int, n: int) -> bytes:
        start, size = self._members[key]
        n = max(0, min(n, size - offset))
        return os.pread(self._fd, n, start + offset)

    def close(self) -> None:
        os.close(self._fd)


def open_medium(path: Path | str) -> MediumReader:
    """A folder or a ``.tar`` file.

    Raises:
        InputError: nothing usable at ``path``.
    """
    p = Path(path)
    if p.is_dir():
        return DirReader(p)
    if p.is_file():
        return TarReader(p)
    raise InputError(f"no medium at {p}", remedy="give the folder or archive file written by "
                     "`ota offline export`")  # fmt: skip


class _Response:
    """The part of urllib3's ``HTTPResponse`` the fetchers use, over one medium file."""

    def __init__(self, reader: MediumReader | None, key: str, status: int, start: int = 0,
                 end: int = 0) -> None:  # fmt: skip
        self._reader, self._key = reader, key
        self.status = status
        self._pos, self._end = start, end
        self.headers: dict[str, str] = {}
        if status == 206:
            self.headers["Content-Range"] = f"bytes {start}-{end - 1}/{end}"
        self._closed = False

    def read1(self, n: int = -1) -> bytes:
        if self._closed or self._reader is None or self._pos >= self._end:
            return b""
        want = self._end - self._pos if n is None or n < 0 else min(n, self._end - self._pos)
        data = self._reader.pread(self._key, self._pos, want)
        self._pos += len(data)
        if not data:
            self._pos = self._end
        return data

    read = read1

    def isclosed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True

    def release_conn(self) -> None:
        self._closed = True

    def drain_conn(self) -> None:
        self._closed = True


class MediumPool:
    """Stands in for the urllib3 pool of :mod:`._fetch`: ``GET <prefix>/<key>`` is answered
    from the medium (200, or 206 for ``Range: bytes=N-``; 404 for anything absent, unsafe or
    outside ``prefix``). Read-only; thread-safe (the chunk stager fetches in parallel)."""

    def __init__(self, prefix: str, reader: MediumReader) -> None:
        self._prefix = prefix.rstrip("/") + "/"
        self._reader = reader
        self._lock = threading.Lock()
        self.requests = 0
        self.headers: dict[str, str] = {}  # the pool API's default headers (none on a medium)

    def request(self, method: str, url: str, headers: dict[str, str] | None = None,
                **_: Any) -> _Response:  # fmt: skip
        with self._lock:
            self.requests += 1
        if method != "GET" or not url.startswith(self._prefix):
            return _Response(None, "", 404)
        key = urllib.parse.unquote(url[len(self._prefix) :].split("?", 1)[0])
        size = self._reader.size(key) if safe_key(key) else None
        if size is None:
            return _Response(None, key, 404)
        rng = (headers or {}).get("Range", "")
        m = re.fullmatch(r"bytes=(\d{1,15})-", rng)
        if m and 0 < int(m.group(1)) < size:
            return _Response(self._reader, key, 206, int(m.group(1)), size)
        return _Response(self._reader, key, 200, 0, size)

    def clear(self) -> None:
        """Nothing pooled (the pool API's ``clear``)."""


# -- the update cycle over a medium -----------------------------------------------------------


@dataclass(frozen=True)
class MediumInfo:
    """What the verified timestamp says the medium is for (None fields: not restricted)."""

    releases: dict[str, str] | None
    device_class: str | None
    delta_from: dict[str, str]
    timestamp_version: int
    expires: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "releases": self.releases,
            "device_class": self.device_class,
            "delta_from": self.delta_from,
            "timestamp_version": self.timestamp_version,
            "expires": self.expires,
        }


def medium_info(timestamp: bytes) -> MediumInfo:
    """Parse the ``x-ota-medium`` field of a timestamp python-tuf has verified.

    A timestamp without it (a plain repository copy, e.g. a site mirror on a stick) restricts
    nothing. Raises SecurityError on a malformed field (it is signed: a bug or an attack)."""
    md = Metadata[Timestamp].from_bytes(timestamp)
    signed = md.signed
    doc = signed.unrecognized_fields.get(MEDIUM_FIELD)
    expires = signed.expires.isoformat()
    if doc is None:
        return MediumInfo(None, None, {}, signed.version, expires)
    try:
        if doc["format"] != MEDIUM_FORMAT:
            raise ValueError(f"format {doc['format']!r}")
        rel, dc, delta = doc["releases"], doc["device_class"], doc.get("delta_from", {})
        if not isinstance(rel, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in rel.items()
        ):
            raise ValueError("releases")
        if dc is not None and not isinstance(dc, str):
            raise ValueError("device_class")
        if not isinstance(delta, dict):
            raise ValueError("delta_from")
    except (KeyError, TypeError, ValueError) as e:
        raise SecurityError(f"the medium's description is malformed: {e}") from e
    return MediumInfo(dict(rel), dc, {str(k): str(v) for k, v in delta.items()},
                      signed.version, expires)  # fmt: skip


class MediumSession(TufSession):
    """A :class:`TufSession` over a medium that offers only the releases the medium carries
    (plus the index's yanked entries, so a yank still reverts). Dropping entries of a verified
    index can only narrow the choice; floors are kept as the index says."""

    carried: dict[str, str] | None = None

    def index(self, name: str) -> ModelIndex | None:
        idx = super().index(name)
        if idx is None or self.carried is None:
            return idx
        want = self.carried.get(name)
        kept = tuple(r for r in idx.releases if r.yanked or r.version == want)
        return replace(idx, releases=kept)


def update_from_medium(state_dir: Path | str, medium: Path | str, *, model: str | None = None,
                       verifier: Verifier = default_verifier, smoke: SmokeRunner = default_smoke,
                       limits: Limits = DEFAULT_LIMITS, clock: Callable[[], float] = time.time,
                       progress: Progress | None = None) -> _updater.UpdateResult:  # fmt: skip
    """One update cycle (recover, health window, verify, then each followed model the medium
    carries) reading ``medium`` instead of the repository. No events are forwarded (no link).

    Raises:
        ConfigError: not initialised; ``model`` not followed. InputError: no medium there.
        ConflictError: another updater holds the state dir's lock.
    """
    dev = Device(state_dir, clock=clock)
    if model is not None and model not in dev.cfg.models:
        raise ConfigError(f"this device does not follow {model!r}")
    names = dev.cfg.models if model is None else (model,)
    reader = open_medium(medium)
    fcfg = FetchConfig(retries=0, parallel=4)  # a local file reads or it does not
    stats = FetchStats()
    t0 = time.monotonic()
    try:
        with dev.locked():
            ctx = _updater._Ctx(fcfg, stats, limits, verifier, smoke, progress)
            outcomes = _cycle(dev, names, MediumPool(dev.cfg.repo_url, reader), ctx)
    finally:
        reader.close()
    return _updater.UpdateResult(tuple(outcomes), stats.requests, stats.bytes,
                                 time.monotonic() - t0, None)  # fmt: skip


def _cycle(dev: Device, names: tuple[str, ...], pool: MediumPool,
           ctx: _updater._Ctx) -> list[_updater.ModelOutcome]:  # fmt: skip
    """:func:`._updater._cycle` with the medium's pool and the medium's restrictions."""
    try:
        dev.recover()
        trial = dev.check_trial()
    except OtaError as e:
        return [_updater._failure(dev, "*", None, e)]
    if trial is not None:
        status, txn = trial
        st = {"pending": "pending_confirmation"}.get(status, status)
        return [_updater.ModelOutcome(txn.name, st, txn.version)]
    try:
        session = MediumSession(
            dev.sd.metadata_dir,
            dev.sd.cache_dir,
            dev.cfg.repo_url,
            dev.sd.bootstrap_root(),
            pool=pool,  # type: ignore[arg-type]
            fetch_cfg=ctx.fcfg,
            stats=ctx.stats,
            limits=ctx.limits,
        )
        session.refresh()
        info = medium_info((dev.sd.metadata_dir / "timestamp.json").read_bytes())
        if info.device_class is not None and info.device_class != dev.cfg.tier:
            raise MediumError(f"this medium is for hardware tier {info.device_class}, "
                              f"this device is {dev.cfg.tier}")  # fmt: skip
        session.carried = info.releases
    except OtaError as e:
        return [_updater._failure(dev, "*", None, _explained(e))]
    except OSError as e:
        return [_updater._failure(dev, "*", None, ConfigError(f"the device metadata: {e}"))]
    outcomes = []
    for name in names:
        if info.releases is not None and name not in info.releases:
            outcomes.append(_updater.ModelOutcome(name, "up_to_date", None,
                                                  "not carried by this medium"))  # fmt: skip
            continue
        outcomes.append(_never_transient(dev, _updater._one(dev, session, name, pool, ctx)))
        if outcomes[-1].status == "pending_confirmation":
            break  # one release on trial at a time
    return outcomes


_INCOMPLETE = "the medium is incomplete or altered (a file missing or cut short)"
_INCOMPLETE_REMEDY = "copy the medium again from the export, or export a new one"


def _never_transient(dev: Device, o: _updater.ModelOutcome) -> _updater.ModelOutcome:
    """A local medium is never "unreachable, retry later": what the fetchers report as
    transient (a missing file, a body cut short) is a medium that lacks what its verified
    metadata names, refused (and logged) like altered bytes."""
    if o.status != "transient":
        return o
    reason = f"{_INCOMPLETE}: {o.reason}"
    dev.events.append("security", o.model if o.model != "*" else "", o.version or "",
                      reason=reason, error="MediumError")  # fmt: skip
    return replace(o, status="security", reason=reason, remedy=_INCOMPLETE_REMEDY)


def _explained(e: OtaError) -> OtaError:
    """Name the refusals an operator with a stick meets most, in their words."""
    if isinstance(e, TransientError):
        return MediumError(f"{_INCOMPLETE}: {e}", remedy=_INCOMPLETE_REMEDY)
    cause = e.__cause__
    if isinstance(cause, tuf_exc.BadVersionNumberError):
        return MediumError(f"this medium is older than metadata the device has already "
                           f"verified (rollback refused): {cause}",
                           remedy="use a newer medium, or update over the network")  # fmt: skip
    if isinstance(cause, tuf_exc.ExpiredMetadataError):
        return MediumError(
            f"this medium (or the metadata it carries) has expired: {cause}",
            remedy="export a new medium (`ota offline export --expires-in`)",
        )
    return e


# -- reports carried back on media ------------------------------------------------------------


def mac_key(credential: str) -> bytes:
    """The HMAC key of media reports: the SHA-256 (hex) of the fleet credential, which is what
    the fleet service stores (``fleet._secrets.digest``)."""
    return hashlib.sha256(credential.encode("utf-8", "replace")).hexdigest().encode()


def mac(key: bytes, data: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def device_folder(device_id: str) -> str:
    return urllib.parse.quote(device_id, safe="")


@dataclass(frozen=True)
class MediumReport:
    """What ``report --to`` did: ``acked`` events forgotten thanks to an acknowledgement found
    on the medium, ``written`` events put on it (in ``files`` files), ``pending`` still queued."""

    acked: int
    written: int
    files: int
    pending: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "acked": self.acked,
            "written": self.written,
            "files": self.files,
            "pending": self.pending,
        }


def report_to_medium(state_dir: Path | str, dest: Path | str) -> MediumReport:
    """Apply the fleet's acknowledgement on ``dest`` (if any), then write the pending events
    to ``dest/reports/<device>/``. Events stay queued until acknowledged.

    Raises:
        ConfigError: not initialised, or no fleet credential (``report_token_file``).
        InputError: ``dest`` is not a writable folder. ConflictError: the lock is held.
    """
    dev = Device(state_dir)
    token = _token(dev.cfg.report_token_file)
    if not token:
        raise ConfigError(
            "this device has no fleet credential to authenticate reports with",
            remedy="enrol it (`ota device init --fleet-url ... --enroll-token`)",
        )
    key = mac_key(token)
    root = Path(dest)
    if not root.is_dir():
        raise InputError(f"{root} is not a folder", remedy="give the medium's folder")
    folder = _own_folder(root, "reports", device_folder(dev.cfg.device_id))
    seen_path = dev.sd.root / _MEDIUM_SEEN
    with dev.locked(timeout=_updater._REPORT_LOCK_WAIT_S):
        seen = _load_seen(seen_path)
        acked = _apply_ack(dev, root, key, seen)
        events = dev.events.pending()
        snap = dev.events.snapshot(0)
        written = files = 0
        try:
            first = True
            i = 0
            while i < len(events) and files < MAX_REPORT_FILES:
                batch = Snapshot(events[i:i + MAX_BATCH], snap.dropped if first else 0,
                                 snap.epoch)  # fmt: skip
                body, carried = _body(dev, batch)
                doc = {"format": REPORT_FORMAT, "device": dev.cfg.device_id,
                       "body": body.decode(), "mac": mac(key, body)}  # fmt: skip
                name = f"{snap.epoch}-{carried[0].seq:09d}-{carried[-1].seq:09d}.json"
                write_bytes(folder / name, json.dumps(doc, sort_keys=True).encode())
                high = max(seen.get(snap.epoch, {}).get("high", 0), carried[-1].seq)
                dropped = snap.dropped if first else seen.get(snap.epoch, {}).get("dropped", 0)
                seen[snap.epoch] = {"high": high, "dropped": dropped}
                first = False
                i += len(carried)
                written += len(carried)
                files += 1
        except OSError as e:
            raise InputError(f"cannot write reports to {root}: {e}") from e
        finally:
            write_bytes(seen_path, json.dumps(seen, sort_keys=True).encode())
        pending = len(dev.events.pending())
    return MediumReport(acked, written, files, pending)


def _load_seen(path: Path) -> dict[str, dict[str, int]]:
    try:
        doc = json.loads(path.read_bytes())
        return {str(k): {"high": int(v["high"]), "dropped": int(v.get("dropped", 0))}
                for k, v in doc.items()}  # fmt: skip
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}  # nothing written to media yet (or lost): no acknowledgement is honoured


def _own_folder(root: Path, *parts: str) -> Path:
    """``root/parts...``, created if absent; each part must be a real folder, not a symlink
    (a hostile medium would otherwise have the device write wherever the link points).

    Raises:
        InputError: a part is a symlink or not a folder, or cannot be created."""
    path = root
    for part in parts:
        path = path / part
        try:
            path.mkdir(exist_ok=True)
            st = path.lstat()
        except OSError as e:
            raise InputError(f"cannot write reports to {root}: {e}") from e
        if not stat.S_ISDIR(st.st_mode):
            raise MediumError(f"{path} on the medium is a link or not a folder: refused",
                              remedy="use a medium folder written by edge-ota")  # fmt: skip
    return path


def _apply_ack(dev: Device, root: Path, key: bytes, seen: dict[str, dict[str, int]]) -> int:
    """Forget the events an authenticated acknowledgement on the medium covers: the oldest
    pending events up to the first one that lies in no range the fleet says it stored (a
    report file lost, deleted or refused on the way leaves a gap, and nothing from the gap
    on is forgotten), never beyond what this device wrote to media for that queue epoch."""
    stored = _read_ack(dev, root, key)
    epoch = dev.events.snapshot(0).epoch
    mine = seen.get(epoch)
    if stored is None or epoch not in stored or mine is None:
        return 0
    up_to = 0
    for e in dev.events.pending():  # oldest first: stop at the first one not stored
        if e.seq > mine["high"] or not any(lo <= e.seq <= hi for lo, hi in stored[epoch]):
            break
        up_to = e.seq
    dropped = mine["dropped"] if up_to >= mine["high"] else 0
    return dev.events.ack(up_to, dropped_reported=dropped, epoch=epoch)


def _read_ack(dev: Device, root: Path, key: bytes) -> dict[str, list[tuple[int, int]]] | None:
    """Queue epoch -> seq ranges the fleet stored, from this device's authenticated ack on
    the medium; None if there is none usable. The file is read bounded and never blocks (a
    FIFO or a device node is no ack); a forged one is logged as a security event."""
    acks = root / "acks"
    try:
        if not stat.S_ISDIR(acks.lstat().st_mode):
            return None
    except OSError:
        return None
    raw = read_regular(acks / f"{device_folder(dev.cfg.device_id)}.json", MAX_ACK_BYTES)
    try:
        doc = json.loads(raw if raw is not None else b"")
        body = doc["body"].encode()
        if not hmac.compare_digest(mac(key, body), str(doc["mac"])):
            dev.events.append(
                "security", "", "", reason="an acknowledgement on the medium is not the fleet's"
            )
            return None
        ack = json.loads(body)
        if ack["format"] != ACK_FORMAT or ack["device"] != dev.cfg.device_id:
            return None
        stored = {str(q["queue"]): [(int(lo), int(hi)) for lo, hi in q["stored"]]
                  for q in ack["queues"]}  # fmt: skip
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return None
    return stored if all(len(r) <= MAX_ACK_RANGES for r in stored.values()) else None
