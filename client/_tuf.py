"""The device's TUF session: python-tuf's ``Updater`` decides every metadata trust question.

This module only wires the updater to our fetcher and state directory, reads the
TUF-verified custom data of the index and release targets, downloads the verified manifest and
signer list, and maps python-tuf's exceptions to ours:

* ``RepositoryError`` (bad signature, rollback, freeze / expiry, mix-and-match, hash
  mismatch) and ``DownloadLengthMismatchError`` (endless data) -> :class:`SecurityError`;
* ``SlowRetrievalError`` -> :class:`~ota.client._fetch.SlowRetrievalError`;
* other ``DownloadError`` -> :class:`TransientError`; ``OSError`` -> :class:`LocalError`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import urllib3
from tuf.api import exceptions as tuf_exc
from tuf.ngclient.config import UpdaterConfig
from tuf.ngclient.updater import Updater

from ota.bundle import (
    DEFAULT_LIMITS,
    MAX_SIGNERS_BYTES,
    SIGNERS_TARGET,
    FormatError,
    Limits,
    Manifest,
    ModelIndex,
    SignerEntry,
    TargetFacts,
    index_target_path,
    manifest_target_path,
    parse_signers,
)
from ota.errors import LocalError, OtaError, SecurityError, TransientError

from ._fetch import FetchConfig, FetchStats, SlowRetrievalError, TufFetcher

if TYPE_CHECKING:  # defined there; re-exported untyped by tuf.api.metadata
    from tuf.api._payload import TargetFile


def updater_config() -> UpdaterConfig:
    """Explicit bounds on every metadata file the device accepts."""
    return UpdaterConfig(
        max_root_rotations=32,
        max_delegations=32,
        root_max_length=512_000,
        timestamp_max_length=16_384,
        snapshot_max_length=2_000_000,
        targets_max_length=5_000_000,
        prefix_targets_with_hash=True,
    )


# Versioned snapshot and delegated targets metadata (``<v>.<role>.json``, not root): what a
# device downloads after a publish. The timestamp and the next-root probe (every idle poll) go
# without the header, so an idle poll stays as small as it was (ADR 0010).
_COMPRESSIBLE = re.compile(r"/metadata/[0-9]+\.(?!root\.json\Z)[^/]+\.json\Z")


class MetadataPool:
    """Our urllib3 pool, asking for ``Content-Encoding: gzip`` on the metadata that grows with
    the repository (snapshot, model roles). urllib3 decodes the body as it streams (bounded per
    read since urllib3 2.6); python-tuf then checks the *decoded* bytes against the signed
    length and signatures, exactly as for an uncompressed body. A server that ignores the
    header sends the plain file: nothing else changes."""

    def __init__(self, pool: urllib3.PoolManager) -> None:
        self._pool = pool

    def request(self, method: str, url: str, **kw: Any) -> Any:
        if _COMPRESSIBLE.search(url.split("?", 1)[0]):
            kw["headers"] = {**self._pool.headers, "Accept-Encoding": "gzip"}
        return self._pool.request(method, url, **kw)


@contextlib.contextmanager
def tuf_errors(what: str) -> Iterator[None]:
    """Translate python-tuf and OS errors raised inside the block (see module docstring)."""
    try:
        yield
    except OtaError:
        raise
    except tuf_exc.DownloadLengthMismatchError as e:
        raise SecurityError(f"{what}: endless data: {e}") from e
    except tuf_exc.SlowRetrievalError as e:
        raise SlowRetrievalError(f"{what}: slow retrieval: {e}") from e
    except tuf_exc.RepositoryError as e:
        raise SecurityError(f"{what}: {type(e).__name__}: {e}") from e
    except tuf_exc.DownloadError as e:
        raise TransientError(f"{what}: {e}") from e
    except OSError as e:
        raise LocalError(f"{what}: {e}") from e


class TufSession:
    """One refresh worth of trusted metadata. Single-use, like python-tuf's Updater."""

    def __init__(
        self,
        metadata_dir: Path,
        cache_dir: Path,
        repo_url: str,
        root: bytes,
        *,
        pool: urllib3.PoolManager,
        fetch_cfg: FetchConfig,
        stats: FetchStats | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        base = repo_url.rstrip("/")
        self.signers_raw: bytes | None = None  # trust/signers.json as verified, for the slot
        self.cache_dir = cache_dir
        self.limits = limits
        metadata_dir.mkdir(parents=True, exist_ok=True)
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tuf_errors("loading the trusted root"):
            self.updater = Updater(
                str(metadata_dir),
                f"{base}/metadata/",
                str(cache_dir),
                f"{base}/targets/",
                fetcher=TufFetcher(cast(urllib3.PoolManager, MetadataPool(pool)), fetch_cfg, stats),
                config=updater_config(),
                bootstrap=root,
            )

    def refresh(self) -> None:
        """TUF client workflow steps 5.1-5.5 (root, timestamp, snapshot, targets)."""
        with tuf_errors("metadata refresh"):
            self.updater.refresh()

    def _info(self, path: str) -> TargetFile | None:
        with tuf_errors(f"looking up {path}"):
            return self.updater.get_targetinfo(path)

    def index(self, name: str) -> ModelIndex | None:
        """The model's TUF-verified index, or None if the repository has none."""
        info = self._info(index_target_path(name))
        if info is None:
            return None
        idx = ModelIndex.from_custom(info.custom)
        if idx.name != name:
            raise SecurityError(f"index target for {name} describes {idx.name}")
        return idx

    def release(self, name: str, version: str) -> tuple[TargetFile, TargetFacts] | None:
        info = self._info(manifest_target_path(name, version))
        if info is None:
            return None
        return info, TargetFacts.from_custom(info.custom)

    def _download(self, info: TargetFile, max_bytes: int) -> bytes:
        if info.length > max_bytes:
            raise FormatError(f"target {info.path} is {info.length} bytes, limit {max_bytes}")
        dest = self.cache_dir / "download.tmp"
        with tuf_errors(f"downloading {info.path}"):
            self.updater.download_target(info, str(dest))
            try:
                return dest.read_bytes()
            finally:
                dest.unlink(missing_ok=True)

    def manifest(self, info: TargetFile) -> Manifest:
        """Download the release manifest (hash and length verified by python-tuf), parse it.

        Raises:
            SecurityError: verification or parsing failed.
        """
        return Manifest.from_bytes(
            self._download(info, self.limits.max_manifest_bytes), self.limits
        )

    def signers(self, name: str) -> list[SignerEntry]:
        """Model-signing keys the offline targets role allows for ``name`` (may be empty).

        Raises:
            FormatError: the document is malformed. SecurityError: TUF refused it.
        """
        info = self._info(SIGNERS_TARGET)
        if info is None:
            return []
        data = self._download(info, MAX_SIGNERS_BYTES)
        self.signers_raw = data
        return [s for s in parse_signers(data) if s.allows(name)]
