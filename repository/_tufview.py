"""A python-tuf session over repository files, wherever they are (storage, HTTP, a folder).

Every trust decision is python-tuf's: an ``ngclient.Updater`` bootstrapped with a trusted
root reads metadata and targets through :class:`SourceFetcher`. :class:`TufView` then reports
the chain from the metadata the updater verified and cached (root -> targets -> delegated
role(s)): key ids, thresholds, which keys' signatures verify (python-tuf's
``get_verification_result``), versions and expiries. The fetcher remembers what it served,
so a session can be replayed offline from an exported folder (``ota verify``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib import parse

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.api.serialization.json import CanonicalJSONSerializer
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from ota.errors import OtaError, SecurityError, TransientError
from ota.repository._storage import NotFound, Storage, TooLarge

MAX_FETCH_BYTES = 16 * 1024 * 1024
_BASE = "ota-source://repository/"


class Source(ABC):
    """Where repository files come from. One private hook, like python-tuf's fetcher."""

    label: str = ""

    @abstractmethod
    def read(self, key: str, max_bytes: int) -> bytes:
        """Bytes of ``key`` (e.g. ``metadata/1.root.json``, ``blobs/sha256/…``).

        Raises:
            NotFound: no such file. TooLarge (exit 4): larger than ``max_bytes`` (or, in a
            folder, a symlink). StorageError / TransientError: unreadable.
        """

    def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of ``key`` (fewer if it is shorter): a chunk of a file blob
        (ADR 0017). This default reads at most ``end`` bytes of it whole.

        Raises:
            NotFound, TooLarge, StorageError, TransientError: as :meth:`read`.
        """
        return self.read(key, end)[start:end]


class StorageSource(Source):
    def __init__(self, storage: Storage) -> None:
        self.storage, self.label = storage, storage.url

    def read(self, key: str, max_bytes: int) -> bytes:
        return self.storage.get(key, max_bytes=max_bytes)[0]

    def read_range(self, key: str, start: int, end: int) -> bytes:
        from ota.repository._blobread import storage_range

        return storage_range(self.storage, key, start, end)


class HttpSource(Source):
    """A served repository (``ota serve``, a CDN, an S3 website), read with bounded requests."""

    def __init__(self, base_url: str, timeout: float = 30.0) -> None:
        import urllib3

        self.base, self.label = base_url.rstrip("/"), base_url
        self._pool = urllib3.PoolManager(timeout=urllib3.Timeout(connect=10.0, read=timeout))

    def read(self, key: str, max_bytes: int) -> bytes:
        return self._get(key, max_bytes, {})

    def read_range(self, key: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        return self._get(key, end - start, {"Range": f"bytes={start}-{end - 1}"}, (206,))

    def _get(self, key: str, max_bytes: int, headers: dict[str, str],
             ok: tuple[int, ...] = (200,)) -> bytes:  # fmt: skip
        import urllib3

        try:
            r = self._pool.request("GET", f"{self.base}/{key}", preload_content=False,
                                   headers=headers,
                                   retries=urllib3.Retry(2, redirect=0))  # fmt: skip
        except urllib3.exceptions.HTTPError as e:
            raise TransientError(f"cannot fetch {key}: {e}") from e
        try:
            if r.status in (403, 404):
                raise NotFound(key)
            if r.status == 416 and 206 in ok:  # a range past the end: an empty slice
                return b""
            if r.status not in ok:  # a 200 to a range (Range ignored) is refused too
                raise TransientError(f"GET {key}: HTTP {r.status}")
            data = r.read(max_bytes + 1)
            if len(data) > max_bytes:
                r.close()  # unread bytes remain on that connection: never reuse it
        except urllib3.exceptions.HTTPError as e:  # a body cut short, reset, undecodable
            r.close()
            raise TransientError(f"cannot read {key}: {e}") from e
        finally:
            r.release_conn()
        if len(data) > max_bytes:
            raise TooLarge(f"{key} is larger than {max_bytes} bytes")
        return bytes(data)


class DirSource(Source):
    """An exported folder (``ota audit --export``): its ``tuf/`` and ``blobs/`` subfolders."""

    def __init__(self, root: Path) -> None:
        self.root, self.label = Path(root).resolve(), str(root)

    def read(self, key: str, max_bytes: int) -> bytes:
        if any(p in ("", ".", "..") for p in key.split("/")):
            raise NotFound(key)
        path = self.root / key
        try:
            if path.is_symlink() or path.stat().st_size > max_bytes:
                raise TooLarge(f"{key} is larger than {max_bytes} bytes or a symlink")
            return path.read_bytes()
        except FileNotFoundError as e:
            raise NotFound(key) from e

    def read_range(self, key: str, start: int, end: int) -> bytes:
        if any(p in ("", ".", "..") for p in key.split("/")):
            raise NotFound(key)
        path = self.root / key
        try:
            if path.is_symlink():
                raise TooLarge(f"{key} is a symlink")
            with path.open("rb") as f:
                f.seek(start)
                return f.read(max(end - start, 0))
        except FileNotFoundError as e:
            raise NotFound(key) from e


class SourceFetcher(FetcherInterface):
    """python-tuf fetcher over a :class:`Source`; remembers what it served (for export)."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.served: dict[str, bytes] = {}
        self.last = ""  # the last file asked for: names the culprit when python-tuf refuses

    def _fetch(self, url: str) -> Iterator[bytes]:
        key = url.removeprefix(_BASE)
        self.last = key
        try:
            data = self.source.read(parse.unquote(key), MAX_FETCH_BYTES)
        except NotFound as e:
            raise tuf_exc.DownloadHTTPError(f"{key} not found", 404) from e
        except OtaError as e:
            raise tuf_exc.DownloadError(str(e)) from e
        self.served[key] = data
        yield data


def updater_config() -> UpdaterConfig:
    return UpdaterConfig(max_root_rotations=32, max_delegations=32, root_max_length=512_000,
                         timestamp_max_length=16_384, snapshot_max_length=2_000_000,
                         targets_max_length=5_000_000, prefix_targets_with_hash=True)  # fmt: skip


class TufView:
    """One python-tuf session over a source; everything it returns was verified by it."""

    def __init__(self, source: Source, trusted_root: bytes, work: Path) -> None:
        self.fetcher = SourceFetcher(source)
        self.mdir = work / "metadata"
        self.mdir.mkdir(parents=True, exist_ok=True)
        (work / "targets").mkdir(exist_ok=True)
        self.work = work
        self.updater = Updater(str(self.mdir), f"{_BASE}metadata/", str(work / "targets"),
                               f"{_BASE}targets/", fetcher=self.fetcher, config=updater_config(),
                               bootstrap=trusted_root)  # fmt: skip

    def target(self, path: str) -> TargetFile | None:
        """Refresh (once) and look a target up through the delegations."""
        return self.updater.get_targetinfo(path)

    def download(self, info: TargetFile, max_bytes: int) -> bytes:
        """Download a target; python-tuf checks its length and hashes."""
        if info.length > max_bytes:
            raise SecurityError(f"target {info.path} is {info.length} bytes, limit {max_bytes}")
        dest = self.work / "download.tmp"
        self.updater.download_target(info, str(dest))
        try:
            return dest.read_bytes()
        finally:
            dest.unlink(missing_ok=True)

    def _cached(self, role: str) -> Metadata[Any] | None:
        path = self.mdir / f"{parse.quote(role, '')}.json"
        return Metadata.from_bytes(path.read_bytes()) if path.exists() else None

    def chain(self, target_path: str) -> list[dict[str, Any]]:
        """Root, timestamp, snapshot, targets and the delegated role(s) leading to
        ``target_path``, as cached by the updater after it verified them."""
        root = self._cached("root")
        targets = self._cached("targets")
        if root is None or targets is None:
            raise SecurityError("the updater cached no root or targets metadata")
        out = [_role_row("root", root, root)]
        for role in ("timestamp", "snapshot", "targets"):
            md = targets if role == "targets" else self._cached(role)
            if md is not None:
                out.append(_role_row(role, md, root))
        out += self._walk(targets, target_path, depth=0)
        return out

    def _walk(self, parent: Metadata[Any], path: str, depth: int) -> list[dict[str, Any]]:
        signed = parent.signed
        if not isinstance(signed, Targets):
            return []
        if path in signed.targets or signed.delegations is None or depth > 8:
            return []
        for role, _terminating in signed.delegations.get_roles_for_target(path):
            child = self._cached(role)
            if child is None:
                continue
            if path in child.signed.targets:
                return [_role_row(role, child, parent)]
            deeper = self._walk(child, path, depth + 1)
            if deeper:
                return [_role_row(role, child, parent), *deeper]
        return []


def _role_row(role: str, md: Metadata[Any], delegator: Metadata[Any]) -> dict[str, Any]:
    payload = CanonicalJSONSerializer().serialize(md.signed)
    result = delegator.signed.get_verification_result(role, payload, md.signatures)
    return {
        "role": role,
        "version": md.signed.version,
        "expires": md.signed.expires.isoformat().replace("+00:00", "Z"),
        "threshold": result.threshold,
        "keyids": sorted(result.signed) + sorted(result.unsigned),
        "signed_by": sorted(result.signed),
    }
