"""The S3 storage backend (AWS S3 and S3-compatible stores such as MinIO, Ceph RGW, Cloudflare
R2; whether one honours conditional writes is probed, never assumed).

Same semantics as :class:`~ota.repository._storage.FileStorage`, over boto3:

* Conditional writes are S3's own: ``IfNoneMatch="*"`` creates only if absent, ``IfMatch=etag``
  replaces only the version the writer read. The store decides atomically; a loser gets HTTP 412
  (or 409 ``ConditionalRequestConflict`` while another conditional write is in flight), which is
  raised as :class:`PreconditionFailed`. No lock is taken anywhere, so publishers on different
  machines are serialised by the store alone.
* Not every S3-compatible store honours them, so the first conditional write of an instance
  probes the store (:mod:`ota.repository._condwrite`): a store that ignores them is refused with
  :class:`ConfigError`, or, in single-publisher mode, conditional writes are emulated under a
  host-wide lock.
* Every upload carries a ``Cache-Control`` header chosen by its key
  (:func:`~ota.repository._storage.cache_control`), the same rules as ``ota serve`` and
  ``docs/serving/nginx-site.conf``, so a bucket served directly or through a CDN caches right.
* Versioned snapshot and role metadata of at least 1 KiB
  (:func:`~ota.repository._storage.gzip_eligible`) is stored **gzip-compressed** with
  ``Content-Encoding: gzip`` (ADR 0010): S3 and CDNs serve it with that header to every client
  (S3 does not negotiate), and urllib3, requests and python-tuf's fetcher decode it as they
  stream; python-tuf checks the signed length and hashes on the decoded bytes, and urllib3
  decodes a bounded amount per read, so a bomb is cut at the signed length. :meth:`get`
  decodes it again (bounded by ``max_bytes``), so everything above this backend sees the
  signed bytes; etags are of the stored (compressed) object, in ``get`` and ``put`` alike.
* Etags are S3's ETag header with the quotes stripped, in ``get``, ``put`` and ``head`` alike, so
  ``get`` then ``put(if_match=etag)`` is a compare-and-swap.
* Every network call is bounded: a connect timeout, a read timeout and a few retries
  (:class:`S3Limits`). Errors are mapped at this boundary, by who must react:
  connection failures, timeouts, 5xx and throttling are :class:`TransientError`; a missing
  bucket, refused credentials or a bad endpoint are :class:`ConfigError`; a missing key is
  :class:`NotFound`; anything else is :class:`StorageError` (:mod:`ota.repository._s3errors`).

Credentials and the endpoint come from boto3's standard chain (environment, profile, instance
role; ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``) unless an endpoint is passed explicitly.

Caveat of every compare-and-swap over a network: if a conditional write lands but its response
is lost, the SDK's retry of it fails its own precondition. A :class:`PreconditionFailed` therefore
means "the object is not the version you read", which may be your own write; a caller that must
tell the two apart re-reads and compares the content (e.g. a transaction id inside the object).
"""

from __future__ import annotations

import contextlib
import gzip
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlparse

import boto3.session
import botocore.exceptions as bex
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config

from ota.errors import ConfigError, LocalError, OtaError
from ota.repository import _condwrite
from ota.repository._s3errors import bad_endpoint as _bad_endpoint
from ota.repository._s3errors import error_code as _code
from ota.repository._s3errors import etag as _etag
from ota.repository._s3errors import raise_mapped
from ota.repository._storage import (
    GZIP_MIN_BYTES,
    PreconditionFailed,
    Storage,
    StorageError,
    TooLarge,
    cache_control,
    gzip_eligible,
)

# boto3-stubs types `boto3.client("s3")` only with mypy-boto3-s3 of the same minor release, which
# is not published for boto3 1.44; the client is therefore typed `Any` here, on purpose.
_S3Client = Any

_MiB = 1 << 20


@dataclass(frozen=True)
class S3Limits:
    """Bounds on every S3 call. The defaults make an unreachable endpoint fail in seconds.

    Attributes:
        connect_timeout: seconds to open a TCP (and TLS) connection.
        read_timeout: seconds without a byte from the server before a read fails.
        max_attempts: total attempts per call, first one included (botocore "standard" retries:
            connection errors, 5xx and throttling, with jittered exponential backoff).
        part_size: multipart part size for :meth:`S3Storage.put_file`; also its threshold.
        max_concurrency: parts uploaded at once by :meth:`S3Storage.put_file`.
        max_pool_connections: HTTP connections kept per client (the chunk uploader's threads
            and :meth:`S3Storage.put_file` share one client).
    """

    connect_timeout: float = 3.0
    read_timeout: float = 30.0
    max_attempts: int = 3
    part_size: int = 8 * _MiB
    max_concurrency: int = 4
    max_pool_connections: int = 16


class S3Storage(Storage):
    """Objects under ``s3://bucket/prefix``. Keys are ``/``-separated, relative to the prefix.

    Creating the storage opens no connection; the first call does. One instance may be shared
    by threads (boto3 clients are thread-safe); child processes must open their own.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        endpoint_url: str | None = None,
        limits: S3Limits | None = None,
        single_publisher: bool = False,
    ) -> None:
        """Configure a client for ``s3://bucket/prefix`` from boto3's standard chain.

        Args:
            bucket: the bucket; it must exist (a missing one is reported on first use).
            prefix: the folder of the repository inside the bucket ("" for the bucket root).
            endpoint_url: an S3-compatible endpoint; None means boto3's own resolution
                (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, the profile, then AWS).
            limits: timeouts, retries and transfer bounds.
            single_publisher: the operator chose single-publisher mode (``ota.toml``): on a
                store that ignores conditional writes, emulate them under a host-wide lock
                instead of refusing.

        Raises:
            ConfigError: the endpoint URL is malformed or not http(s).
        """
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.limits = limits or S3Limits()
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        config = Config(
            connect_timeout=self.limits.connect_timeout,
            read_timeout=self.limits.read_timeout,
            retries={"total_max_attempts": self.limits.max_attempts, "mode": "standard"},
            max_pool_connections=self.limits.max_pool_connections,
        )
        try:
            # endpoint_url=None lets boto3 resolve AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / config.
            # A session per storage: boto3's default session is not safe to create from threads.
            session = boto3.session.Session()
            self._client: _S3Client = session.client("s3", endpoint_url=endpoint_url, config=config)
        except ValueError as e:  # botocore: "Invalid endpoint: ..."
            raise _bad_endpoint(endpoint_url) from e
        except bex.BotoCoreError as e:
            raise ConfigError(f"cannot configure the S3 client: {e}") from e
        self.endpoint: str = self._client.meta.endpoint_url
        parsed = urlparse(self.endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise _bad_endpoint(self.endpoint)
        self._bucket_checked = False
        self.single_publisher = single_publisher
        self._mode: _condwrite.Mode | None = None
        self._mode_lock = threading.Lock()
        self.probes: list[_condwrite.ProbeResult] = []  # what this instance found (tests, CLI)
        self._locked = False

    # -- keys -------------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in key.split("/")):
            raise StorageError(f"bad storage key {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    # -- Storage ----------------------------------------------------------------------------

    def get(self, key: str, *, max_bytes: int | None = None) -> tuple[bytes, str]:
        """Return an object's bytes and its etag (one GET: the etag is of exactly these bytes).

        The size is checked from ``Content-Length`` before the body is read, and the read is
        bounded as well, so a lying server cannot make this read more than ``max_bytes + 1``.

        Raises:
            NotFound: no such key.
            StorageError: the object is larger than ``max_bytes``, or S3 refused the request.
            TransientError: the endpoint is unreachable, timed out, throttled or failed (5xx).
            ConfigError: the bucket does not exist or the credentials are refused.
        """
        self._enter()
        return self._get(key, max_bytes=max_bytes)

    def _get(self, key: str, *, max_bytes: int | None = None) -> tuple[bytes, str]:
        s3key = self._key(key)
        try:
            resp = self._client.get_object(Bucket=self.bucket, Key=s3key)
            body = resp["Body"]
            with contextlib.closing(body):
                if max_bytes is None:
                    data: bytes = body.read()
                else:
                    if resp.get("ContentLength", 0) > max_bytes:
                        raise TooLarge(f"{key} is larger than {max_bytes} bytes")
                    data = body.read(max_bytes + 1)
                    if len(data) > max_bytes:
                        raise TooLarge(f"{key} is larger than {max_bytes} bytes")
        except OtaError:
            raise
        except Exception as e:
            self._raise(e, key)
        if resp.get("ContentEncoding") == "gzip":
            data = _gunzip(key, data, _MAX_DECODED if max_bytes is None else max_bytes)
        return data, _etag(resp["ETag"])

    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Return bytes ``[start, end)`` of an object (Python slice bounds; ``end`` exclusive).

        A range past the end of the object is truncated like a slice; an empty range returns
        ``b""`` without a request.

        Raises:
            NotFound: no such key.
            StorageError: a negative ``start`` or a server that ignored the range.
            TransientError, ConfigError: as :meth:`get`.
        """
        if start < 0 or end < start:
            raise StorageError(f"bad range [{start}, {end}) for {key}")
        if end == start:
            return b""
        self._enter()
        s3key = self._key(key)
        try:
            resp = self._client.get_object(
                Bucket=self.bucket, Key=s3key, Range=f"bytes={start}-{end - 1}"
            )
            with contextlib.closing(resp["Body"]) as body:
                data: bytes = body.read(end - start + 1)
        except Exception as e:
            if _code(e) == "InvalidRange":  # start at or past the end: an empty slice
                return b""
            self._raise(e, key)
        if len(data) > end - start:
            raise StorageError(f"{self._where(key)}: the server ignored the byte range")
        return data

    def put(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        """Store ``data`` at ``key``; return the new etag (quotes stripped).

        ``if_none_match`` wins over ``if_match`` when both are given, as in FileStorage. The
        first conditional write of this instance probes the store (:meth:`conditional_mode`).

        Raises:
            PreconditionFailed: ``if_none_match`` and the key exists, or ``if_match`` and the
                current etag differs or the key is gone (HTTP 412, 409 or 404).
            ConfigError: a conditional write on a store that does not honour them, outside
                single-publisher mode.
            TransientError, ConfigError, StorageError: as :meth:`get`.
        """
        self._enter()
        if not if_none_match and if_match is None:
            return self._raw_put(key, data, False, None)
        if self.conditional_mode() == "native":
            return self._raw_put(key, data, if_none_match, if_match)
        # Emulated: this process holds the host lock (single-publisher mode, see _condwrite).
        current = self._head_etag(key)
        if if_none_match and current is not None:
            raise PreconditionFailed(f"{key} already exists")
        if not if_none_match and current != _etag(if_match or ""):
            raise PreconditionFailed(
                f"{key} vanished" if current is None else f"{key} was changed by another writer"
            )
        return self._raw_put(key, data, False, None)

    def put_blob(self, key: str, data: bytes | memoryview) -> bool:
        """Store a content-addressed blob if absent; return whether it was written.

        The same key always holds the same bytes, so where conditional writes are emulated a
        HEAD then PUT without the host lock is enough (a racing writer writes the same bytes).
        """
        self._enter()
        if self.conditional_mode() == "native":
            return super().put_blob(key, data)
        if self.exists(key):
            return False
        self._raw_put(key, bytes(data), False, None)
        return True

    @property
    def store_id(self) -> str:
        """Names this store on this host (the single-publisher lock is per store): the bucket
        and prefix only. The endpoint's spelling (``localhost`` or ``127.0.0.1``, a trailing
        slash, a DNS alias) must not split one store into two locks; two stores that share a
        bucket name and prefix merely wait for each other."""
        return self.url

    def check_conditional_writes(self) -> str:
        return self.conditional_mode()

    def conditional_mode(self) -> _condwrite.Mode:
        """``native`` if the store honours conditional writes (probed once per instance),
        ``emulated`` if it does not and single-publisher mode was chosen.

        Raises:
            ConfigError: the store does not honour them, outside single-publisher mode.
            TransientError, StorageError: the probe itself failed.
        """
        with self._mode_lock:
            if self._mode is None:
                result = _condwrite.probe(self._raw_put, self._raw_get, self._delete)
                self.probes.append(result)
                if not result.honoured and not self.single_publisher:
                    raise _condwrite.refusal(self.url, self.endpoint, result)
                if not result.honoured:
                    _condwrite.HostLock.acquire(self.store_id)
                    self._locked = True
                self._mode = "native" if result.honoured else "emulated"
            return self._mode

    def _enter(self) -> None:
        """In single-publisher mode, settle the mode (and take the host lock) before the first
        call of any kind: reads must not race another publisher's in-place rewrites."""
        if self.single_publisher and self._mode is None:
            self.conditional_mode()

    def close(self) -> None:
        """Release the host lock if this storage holds it (single-publisher mode on a store
        that ignores conditional writes); the next call takes it again."""
        with self._mode_lock:
            if self._locked:
                _condwrite.HostLock.release(self.store_id)
                self._locked = False
                self._mode = None

    def _raw_get(self, key: str) -> bytes:
        return self._get(key, max_bytes=1 << 16)[0]

    def _head_etag(self, key: str) -> str | None:
        try:
            resp = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:
            if _code(e) in ("404", "NoSuchKey", "NotFound"):
                self._check_bucket()
                return None
            self._raise(e, key)
        return _etag(resp["ETag"])

    def _raw_put(self, key: str, data: bytes, if_none_match: bool, if_match: str | None) -> str:
        """One PutObject with the headers asked for, whatever the store makes of them."""
        s3key = self._key(key)
        extra: dict[str, str] = {"CacheControl": cache_control(key)}
        if gzip_eligible(key) and len(data) >= GZIP_MIN_BYTES:
            data = gzip.compress(data, 6, mtime=0)  # deterministic: a retried put is identical
            extra |= {"ContentEncoding": "gzip", "ContentType": "application/json"}
        if if_none_match:
            extra["IfNoneMatch"] = "*"
        elif if_match is not None:
            extra["IfMatch"] = f'"{_etag(if_match)}"'
        try:
            resp = self._client.put_object(Bucket=self.bucket, Key=s3key, Body=data, **extra)
        except Exception as e:
            code = _code(e)
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                raise PreconditionFailed(
                    f"{key} was changed by another writer ({code})",
                    remedy="re-read the object and retry",
                ) from e
            if extra.get("IfMatch") and code in ("NoSuchKey", "404"):
                raise PreconditionFailed(f"{key} vanished") from e
            self._raise(e, key)
        return _etag(resp["ETag"])

    def put_file(self, key: str, path: Path) -> None:
        """Stream a local file to ``key``, unconditionally; multipart above ``limits.part_size``.

        Parts go up ``limits.max_concurrency`` at a time; the object appears atomically when the
        upload completes, and a failed upload is aborted (no partial object is ever visible).

        Raises:
            LocalError: ``path`` cannot be read.
            TransientError, ConfigError, StorageError: as :meth:`get`.
        """
        self._enter()
        s3key = self._key(key)
        config = TransferConfig(
            multipart_threshold=self.limits.part_size,
            multipart_chunksize=self.limits.part_size,
            max_concurrency=self.limits.max_concurrency,
            use_threads=True,
            preferred_transfer_client="classic",
        )
        try:
            with create_transfer_manager(self._client, config) as manager:
                manager.upload(
                    str(path), self.bucket, s3key, extra_args={"CacheControl": cache_control(key)}
                ).result()
        except (bex.BotoCoreError, bex.ClientError) as e:
            # first: botocore's timeout and SSL errors are also OSErrors
            self._raise(e, key)
        except OSError as e:
            raise LocalError(f"cannot read {path}: {e.strerror or e}") from e
        except Exception as e:
            self._raise(e, key)

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists (one HEAD).

        Raises:
            TransientError, ConfigError, StorageError: as :meth:`get`. A missing bucket is a
                ConfigError, not ``False``.
        """
        self._enter()
        s3key = self._key(key)
        try:
            self._client.head_object(Bucket=self.bucket, Key=s3key)
        except Exception as e:
            if _code(e) in ("404", "NoSuchKey", "NotFound"):
                # A HEAD 404 has no body: it cannot say whether the key or the bucket is missing.
                self._check_bucket()
                return False
            self._raise(e, key)
        return True

    def list(self, prefix: str) -> Iterator[str]:
        """Yield every key that starts with ``prefix``, relative to the storage prefix.

        Raises:
            TransientError, ConfigError, StorageError: as :meth:`get`, possibly mid-iteration.
        """
        for key, _size, _mtime in self.list_detailed(prefix):
            yield key

    def list_detailed(self, prefix: str) -> Iterator[tuple[str, int, float | None]]:
        """Yield ``(key, size, mtime)`` for keys under ``prefix``; mtime is S3's LastModified.

        ``ota gc`` relies on the mtime to spare the blobs of a publish in progress.

        Raises:
            TransientError, ConfigError, StorageError: as :meth:`get`, possibly mid-iteration.
        """
        self._enter()
        root = f"{self.prefix}/" if self.prefix else ""
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=root + prefix):
                for obj in page.get("Contents", ()):
                    name: str = obj["Key"]
                    if name.startswith(root):
                        modified = obj.get("LastModified")
                        mtime = modified.timestamp() if modified is not None else None
                        yield name[len(root) :], int(obj.get("Size", 0)), mtime
        except Exception as e:
            self._raise(e, prefix or "/")

    def delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing key is not an error.

        Raises:
            TransientError, ConfigError, StorageError: as :meth:`get`.
        """
        self._enter()
        self._delete(key)

    def _delete(self, key: str) -> None:
        s3key = self._key(key)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=s3key)
        except Exception as e:
            if _code(e) in ("NoSuchKey", "404"):
                return
            self._raise(e, key)

    # -- errors -----------------------------------------------------------------------------

    def _check_bucket(self) -> None:
        """Raise ConfigError if the bucket is missing; checked once per instance."""
        if self._bucket_checked:
            return
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except Exception as e:
            if _code(e) in ("404", "NoSuchBucket", "NotFound"):
                raise self._no_bucket() from e
            self._raise(e, "/")
        self._bucket_checked = True

    def _no_bucket(self) -> ConfigError:
        return ConfigError(
            f"S3 bucket {self.bucket!r} does not exist at {self.endpoint}",
            remedy="create the bucket, or fix the storage URL or AWS_ENDPOINT_URL",
        )

    def _raise(self, e: Exception, key: str) -> NoReturn:
        """Map a boto3/botocore exception to the caller-facing family and raise it from ``e``."""
        # No key validation here: a listing prefix ("blobs/") is not a key, and an error
        # path must never hide the error it reports.
        root = f"{self.prefix}/" if self.prefix else ""
        where = f"s3://{self.bucket}/{root}{key.lstrip('/')}"
        raise_mapped(e, key, where, self.endpoint, self._no_bucket())


_MAX_DECODED = 64 << 20  # a gzip-encoded object read without a bound: metadata, never larger


def _gunzip(key: str, data: bytes, max_bytes: int) -> bytes:
    """Decode a ``Content-Encoding: gzip`` object, reading at most ``max_bytes + 1`` decoded.

    Raises:
        TooLarge: it decodes to more than ``max_bytes`` (a bomb, or simply too large).
        StorageError: it is not valid gzip, or truncated.
    """
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, max_bytes + 1)
    except zlib.error as e:
        raise StorageError(f"{key} is stored gzip-encoded but does not decode: {e}") from e
    if len(out) > max_bytes:
        raise TooLarge(f"{key} decodes to more than {max_bytes} bytes")
    if not d.eof or d.unused_data:
        raise StorageError(f"{key} is stored gzip-encoded but is truncated or has trailing data")
    return out
