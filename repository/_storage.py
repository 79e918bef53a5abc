"""Storage backends, chosen by URL: a path or ``file://`` (default), ``s3://bucket/prefix``.

The interface is small on purpose: whole-object get/put of small documents with conditional
writes (the publish transaction's commit point), streaming put of large files, existence, listing
and deletion. Keys are ``/``-separated and relative to the repository root.

Conditional writes are how concurrent publishers on different machines are serialised
(``docs/adr/0003-publish-transaction.md``): ``if_none_match=True`` creates only if absent,
``if_match=etag`` replaces only the version the writer read. Both raise :class:`PreconditionFailed`
when another writer got there first. Not every S3-compatible store honours them: the S3 backend
probes the store first (``ota.repository._condwrite``).

Every storage error maps to a documented exit code (README, ``ota.errors``): an unreachable or
failing endpoint is a :class:`~ota.errors.TransientError` (5); a store that refuses or cannot do
what was asked (missing bucket, refused credentials, an unexpected 4xx, a missing object the
metadata names) is a :class:`StorageError`, a configuration problem (9); an object larger than the
bound for its kind is :class:`TooLarge` (4: the repository holds what it must not); a local disk
failure is a :class:`~ota.errors.LocalError` (6).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

from ota import _atomic
from ota.errors import ConfigError, ConflictError, ExitCode, LocalError, OtaError


class StorageError(OtaError):
    """The store refused a request or broke its contract: fix the store or its configuration.

    Exit code 9 (configuration), as for a missing bucket or refused credentials.
    """

    exit_code = ExitCode.CONFIG
    remedy = "check the storage URL, the endpoint (AWS_ENDPOINT_URL) and the store's logs"


class NotFound(StorageError):
    """The key does not exist (exit 9 if nobody handles it: the storage URL or the repository
    does not hold what the project expects)."""


class TooLarge(StorageError):
    """An object is larger than the bound for its kind: refused like any oversized input."""

    exit_code = ExitCode.SECURITY
    remedy = "the repository holds an object it must not; inspect it (ota audit) before retrying"


IMMUTABLE = "public, max-age=31536000, immutable"


def cache_control(key: str) -> str:
    """The ``Cache-Control`` a key is served with (``ota serve`` and nginx-site.conf alike).

    Content-addressed blobs, hash-prefixed targets and versioned metadata (``N.role.json``)
    never change: a year, immutable. The head (``metadata/timestamp.json``) and the other
    unversioned metadata change with every publish: ``no-cache`` (revalidate). Everything else
    (the audit log, the probe marker) is never served to devices: ``private, no-store``.
    """
    top, _, rest = key.partition("/")
    if top in ("blobs", "targets"):
        return IMMUTABLE
    if top == "metadata" and "/" not in rest:
        return IMMUTABLE if rest[:1].isdigit() else "no-cache"
    return "private, no-store"


GZIP_MIN_BYTES = 1024  # as nginx-site.conf's gzip_min_length: below that, headers cost more


def gzip_eligible(key: str) -> bool:
    """Whether ``key`` may be served ``Content-Encoding: gzip`` (ADR 0010): versioned snapshot
    and targets-role metadata (``metadata/<v>.<role>.json``), the files that grow with the
    repository. Never ``timestamp.json`` or the other unversioned head files, never a root
    (``<v>.root.json``: the device's next-root probe and its idle poll stay byte-for-byte
    plain), nothing outside ``metadata/``.
    """
    top, _, rest = key.partition("/")
    if top != "metadata" or "/" in rest or not rest[:1].isdigit():
        return False
    version, _, role = rest.partition(".")
    return version.isdigit() and role.endswith(".json") and role != "root.json"


class PreconditionFailed(ConflictError):
    """A conditional write lost to a concurrent writer."""


class Storage(ABC):
    """A flat key/value object store."""

    url: str

    @abstractmethod
    def get(self, key: str, *, max_bytes: int | None = None) -> tuple[bytes, str]:
        """Return an object's bytes and its etag.

        Raises:
            NotFound: no such key.
            StorageError: the object is larger than ``max_bytes``, or the backend failed.
        """

    @abstractmethod
    def put(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        """Store ``data`` at ``key``; return the new etag.

        Raises:
            PreconditionFailed: ``if_none_match`` and the key exists, or ``if_match`` and the
                current etag differs (or the key is gone).
        """

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None:
        """Store a (possibly large) local file at ``key``, unconditionally."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[str]:
        """Yield every key that starts with ``prefix``, in no particular order."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing key is not an error."""

    def local_root(self) -> Path | None:
        """The folder a local backend stores into (for ``ota serve``), else None."""
        return None

    def check_conditional_writes(self) -> str:
        """Make sure conditional writes are safe here before anything is written; return how
        (``native`` or ``emulated``). The file backend implements them itself: ``native``.

        Raises:
            ConfigError: the store ignores them and single-publisher mode was not chosen.
            TransientError, StorageError: the store failed.
        """
        return "native"

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the storage holds (the S3 backend's single-publisher host lock)."""

    def put_blob(self, key: str, data: bytes | memoryview) -> bool:
        """Store a content-addressed blob if absent; return whether it was written.

        Durable only after :meth:`barrier`. The same key always holds the same bytes, so an
        existing blob is left as it is.
        """
        try:
            self.put(key, bytes(data), if_none_match=True)
        except PreconditionFailed:
            return False
        return True

    def barrier(self) -> None:  # noqa: B027 - optional hook, a no-op where writes are durable
        """Make every blob written so far durable (called before metadata that names them)."""

    def list_detailed(self, prefix: str) -> Iterator[tuple[str, int, float | None]]:
        """Yield ``(key, size, mtime)`` for keys under ``prefix``; mtime may be unknown."""
        for key in self.list(prefix):
            yield key, 0, None


def etag_of(data: bytes) -> str:
    """The etag the file backend gives an object: its sha256 in hex."""
    return hashlib.sha256(data).hexdigest()


class FileStorage(Storage):
    """Objects as files under a folder. Conditional writes use ``O_EXCL`` and an fcntl lock,
    so they are safe between processes on one machine (not over NFS)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.url = self.root.as_uri()

    def local_root(self) -> Path:
        return self.root

    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in key.split("/")):
            raise StorageError(f"bad storage key {key!r}")
        return self.root / key

    def get(self, key: str, *, max_bytes: int | None = None) -> tuple[bytes, str]:
        path = self._path(key)
        try:
            with path.open("rb") as f:
                if max_bytes is not None and os.fstat(f.fileno()).st_size > max_bytes:
                    raise TooLarge(f"{key} is larger than {max_bytes} bytes")
                data = f.read()
        except FileNotFoundError as e:
            raise NotFound(key) from e
        except OSError as e:
            raise LocalError(f"cannot read {path}: {e.strerror}") from e
        return data, etag_of(data)

    def put(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        path = self._path(key)
        if if_none_match:
            self._create_exclusive(path, data)
        elif if_match is not None:
            with self._locked(path):
                try:
                    current = etag_of(path.read_bytes())
                except FileNotFoundError as e:
                    raise PreconditionFailed(f"{key} vanished") from e
                if current != if_match:
                    raise PreconditionFailed(f"{key} was changed by another writer")
                _atomic.write_bytes(path, data)
        else:
            _atomic.write_bytes(path, data)
        return etag_of(data)

    def put_blob(self, key: str, data: bytes | memoryview) -> bool:
        # No fsync per blob (hundreds per publish): one barrier() before the metadata commit.
        # A complete temp file renamed into place: a reader never sees a partial blob, and a
        # concurrent writer of the same key writes the same bytes.
        path = self._path(key)
        if path.exists():
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}.{threading.get_ident()}.new"
        try:
            with tmp.open("wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise _local_error(e, path) from e
        return True

    def barrier(self) -> None:
        os.sync()

    def _create_exclusive(self, path: Path, data: bytes | memoryview) -> None:
        # Write a complete temp file, then link() it into place: link fails if the name exists,
        # and readers never see a partial object.
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}.{id(data)}.new"
        try:
            with tmp.open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError as e:
                raise PreconditionFailed(f"{path.name} already exists") from e
            _atomic.fsync_dir(path.parent)
        except OSError as e:
            raise _local_error(e, path) from e
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    @contextlib.contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        lock = path.parent / f".{path.name}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def put_file(self, key: str, path: Path) -> None:
        dest = self._path(key)
        with _atomic.open_atomic(dest) as out, Path(path).open("rb") as src:
            while block := src.read(1 << 20):
                out.write(block)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> Iterator[str]:
        base = self.root
        for dirpath, _dirs, files in os.walk(base):
            rel_dir = Path(dirpath).relative_to(base).as_posix()
            for name in files:
                if name.startswith("."):
                    continue  # temp files and locks
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix):
                    yield key

    def list_detailed(self, prefix: str) -> Iterator[tuple[str, int, float | None]]:
        for key in self.list(prefix):
            with contextlib.suppress(FileNotFoundError):
                st = (self.root / key).stat()
                yield key, st.st_size, st.st_mtime

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()


def _local_error(e: OSError, path: Path) -> OtaError:
    if e.errno == errno.ENOSPC:
        return LocalError(f"disk full while writing {path}")
    return StorageError(f"cannot write {path}: {e.strerror or e}")


def local_path(url: str) -> Path | None:
    """The folder of a local storage URL (a path or ``file:///path``), or None (another
    scheme, or no path): the rule :func:`open_storage` opens a :class:`FileStorage` by."""
    parsed = urlparse(url)
    if parsed.scheme not in ("", "file"):
        return None
    path = unquote(parsed.path) if parsed.scheme == "file" else url
    return Path(path) if path else None


def open_storage(
    url: str, *, s3_endpoint: str | None = None, single_publisher: bool = False
) -> Storage:
    """Open a storage backend by URL: a path, ``file:///path`` or ``s3://bucket/prefix``.

    ``single_publisher`` (``publishers = "single"`` in ``ota.toml``) lets an S3 store that
    ignores conditional writes be used by one publisher host (``ota.repository._condwrite``);
    the file backend always honours them and ignores it.

    Raises:
        ConfigError: unknown scheme or malformed URL.
    """
    path = local_path(url)
    if path is not None:
        return FileStorage(path)
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):  # local, without a path
        raise ConfigError(f"bad storage URL {url!r}")
    if parsed.scheme == "s3":
        from ota.repository._s3 import S3Storage  # boto3 only when asked for

        if not parsed.netloc:
            raise ConfigError(f"bad S3 URL {url!r}", remedy="use s3://bucket/prefix")
        return S3Storage(
            parsed.netloc,
            parsed.path.strip("/"),
            endpoint_url=s3_endpoint,
            single_publisher=single_publisher,
        )
    raise ConfigError(f"unsupported storage URL scheme {parsed.scheme!r}")
