"""A publisher's project: ``ota.toml``, key URIs, storage, and ``ota init``.

The project folder holds the configuration and, in the demo, the key files. Keys are named by
securesystemslib URIs (``file2:``, ``envvar:``, ``awskms:``…) in the ``[signers]`` table, keyed by
TUF key id, so the same code signs with a file in the demo and a KMS in production. Relative
``file2:`` paths are relative to the project folder.
"""

from __future__ import annotations

import contextlib
import json
import tomllib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from securesystemslib.signer import Signer, SSlibKey
from tuf.api.metadata import (
    DelegatedRole,
    Key,
    Metadata,
    MetaFile,
    Role,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from ota import _atomic
from ota.bundle import SIGNERS_TARGET, SignerEntry, signers_document
from ota.errors import ConfigError, InputError
from ota.repository._keygen import (
    generate_ed25519,
    generate_p256,
    generate_role_keys,
    key_fingerprint,
)
from ota.repository._layout import RELEASES_PATHS, releases_delegation, top_level
from ota.repository._storage import PreconditionFailed, Storage, open_storage
from ota.repository._txn import (
    HEAD_KEY,
    RELEASES_ROLE,
    Expiry,
    SignerSet,
    md_key,
)

CONFIG_NAME = "ota.toml"
TRUSTED_ROOT_NAME = "root.json"
_SERIALIZER = JSONSerializer(compact=True)
_ONLINE_ROLES = ("snapshot", "timestamp", "bins")


@dataclass(frozen=True)
class ProjectConfig:
    """Everything ``ota.toml`` says."""

    storage: str
    base_url: str = "http://127.0.0.1:8765"
    s3_endpoint: str | None = None
    bins: int = 256
    max_live_releases: int = 32
    expiry: Expiry = field(default_factory=Expiry)
    signers: dict[str, str] = field(default_factory=dict)  # keyid -> URI
    release_key: str = ""  # path of the P-256 model-signing private key (PEM)
    release_pub: str = ""
    team: str = ""  # if set, this project publishes only the models of this team role
    # "concurrent" (the store must honour conditional writes) or "single" (one publisher host;
    # see ota.repository._condwrite and docs/runbooks/publish.md)
    publishers: str = "concurrent"
    # ADR 0017: also store each multi-chunk file's chunks as blobs, for devices whose client
    # predates ADR 0014 (they fetch chunk blobs only); off: each payload byte is written once
    chunk_blobs: bool = False
    # ADR 0017: store each multi-chunk file whole (devices fetch the chunks they lack as ranges
    # of it: a few requests per file). false: chunk blobs only (the pre-ADR 0014 layout): a
    # re-publish uploads only the chunks the store lacks, devices fetch one request per chunk
    file_blobs: bool = True

    def to_toml(self) -> str:
        def q(v: str) -> str:
            return json.dumps(v)

        lines = [
            "# edge-ota repository configuration (see docs/runbooks/publish.md)",
            "[repository]",
            f"storage = {q(self.storage)}",
            f"base_url = {q(self.base_url)}",
            f"s3_endpoint = {q(self.s3_endpoint or '')}",
            f"bins = {self.bins}",
            f"max_live_releases = {self.max_live_releases}",
            f"team = {q(self.team)}",
            "# concurrent: the store must honour conditional writes (probed);"
            " single: ONE publisher host only",
            f"publishers = {q(self.publishers)}",
            "# true: also store chunk blobs, for devices older than ADR 0014 (docs/adr/0017)",
            f"chunk_blobs = {'true' if self.chunk_blobs else 'false'}",
            "# false: no whole-file blobs; a re-publish uploads only new chunks, devices fetch"
            " per chunk (docs/adr/0017)",
            f"file_blobs = {'true' if self.file_blobs else 'false'}",
            "",
            "[expiry]  # days",
            *(f"{k} = {getattr(self.expiry, k)}" for k in _EXPIRY_FIELDS),
            "",
            "[release]",
            f"signing_key = {q(self.release_key)}",
            f"public_key = {q(self.release_pub)}",
            "",
            "[signers]  # TUF key id -> signer URI",
            *(f"{q(k)} = {q(v)}" for k, v in sorted(self.signers.items())),
            "",
        ]
        return "\n".join(lines)

    @classmethod
    def from_toml(cls, text: str) -> ProjectConfig:
        try:
            doc = tomllib.loads(text)
            repo = doc["repository"]
            exp = doc.get("expiry", {})
            return cls(
                storage=str(repo["storage"]),
                base_url=str(repo.get("base_url", cls.base_url)),
                s3_endpoint=str(repo.get("s3_endpoint") or "") or None,
                bins=int(repo.get("bins", 256)),
                max_live_releases=int(repo.get("max_live_releases", 32)),
                expiry=Expiry(**{k: float(exp[k]) for k in _EXPIRY_FIELDS if k in exp}),
                signers={str(k): str(v) for k, v in doc.get("signers", {}).items()},
                release_key=str(doc.get("release", {}).get("signing_key", "")),
                release_pub=str(doc.get("release", {}).get("public_key", "")),
                team=str(repo.get("team", "")),
                publishers=_publishers(repo.get("publishers", "concurrent")),
                chunk_blobs=_flag("chunk_blobs", repo.get("chunk_blobs", False)),
                file_blobs=_flag("file_blobs", repo.get("file_blobs", True)),
            )
        except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"bad {CONFIG_NAME}: {e}") from e


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, not {value!r}")
    return value


def _publishers(value: object) -> str:
    if value not in ("concurrent", "single"):
        raise ValueError(f'publishers must be "concurrent" or "single", not {value!r}')
    return str(value)


_EXPIRY_FIELDS = ("root", "targets", "bins", "snapshot", "timestamp", "team")


@dataclass
class Project:
    """An opened project: config, storage, signers."""

    root_dir: Path
    config: ProjectConfig
    storage: Storage
    signers: SignerSet

    @classmethod
    def open(cls, root_dir: Path, *, storage_override: str | None = None) -> Project:
        """Open the project in ``root_dir`` (the folder holding ``ota.toml``).

        Raises:
            ConfigError: no or bad ``ota.toml``, unknown storage, unusable key URIs.
        """
        root_dir = Path(root_dir).resolve()
        path = root_dir / CONFIG_NAME
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(
                f"cannot read {path}", remedy="run `ota init` or pass --project"
            ) from e
        config = ProjectConfig.from_toml(text)
        if storage_override:
            config = replace(config, storage=storage_override)
        storage = open_storage(
            config.storage,
            s3_endpoint=config.s3_endpoint,
            single_publisher=config.publishers == "single",
        )
        return cls(root_dir, config, storage, _LazySigners(root_dir, config.signers))

    def abspath(self, rel: str) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else self.root_dir / p

    def expiry(self) -> Expiry:
        return self.config.expiry

    def relpath(self, path: Path) -> str:
        """``path`` relative to the project folder when inside it (portable ``ota.toml``)."""
        path = Path(path).absolute()
        inside = path.is_relative_to(self.root_dir)
        return str(path.relative_to(self.root_dir)) if inside else str(path)

    def set_signer(self, keyid: str, uri: str | None) -> None:
        """Name (or, with ``None``, forget) the private key URI of a TUF key, in memory.

        Call :meth:`save_config` to persist it.
        """
        if uri is None:
            self.config.signers.pop(keyid, None)
            self.signers.forget(keyid)
        else:
            if uri.startswith("file2:"):
                uri = "file2:" + self.relpath(Path(uri[len("file2:") :]))
            self.config.signers[keyid] = uri

    def save_config(self) -> None:
        """Write ``ota.toml`` atomically (keys and URIs changed by key management)."""
        _atomic.write_bytes(self.root_dir / CONFIG_NAME, self.config.to_toml().encode())


class _LazySigners(SignerSet):
    """Loads each signer from its URI the first time it is needed (public keys come from the
    metadata that names the role, so a swapped key file is caught as a key mismatch)."""

    def __init__(self, root_dir: Path, uris: dict[str, str]) -> None:
        super().__init__({})
        self._root_dir = root_dir
        self._uris = uris

    def _signer(self, keyid: str, public: Key) -> Signer | None:
        if keyid not in self._signers and keyid in self._uris:
            self._signers[keyid] = load_signer(
                _resolve_uri(self._uris[keyid], self._root_dir), public
            )
        return self._signers.get(keyid)


def load_signer(uri: str, public_key: Key) -> Signer:
    """Load a signer by URI, mapping failures to :class:`ConfigError`."""
    from ota.signing import load_signer as _load  # keys by URI, incl. envvar: and awskms:

    try:
        return _load(uri, public_key)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"cannot load signer {uri}: {e}", remedy="check the key URI") from e


def _resolve_uri(uri: str, root_dir: Path) -> str:
    if uri.startswith("file2:"):
        path = Path(uri[len("file2:") :])
        if not path.is_absolute():
            return f"file2:{root_dir / path}"
    return uri


@dataclass(frozen=True)
class InitResult:
    project: Path
    storage: str
    trusted_root: Path
    base_url: str
    metadata_url: str
    targets_url: str
    bins: int
    keys: dict[str, list[str]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "project": str(self.project),
            "storage": self.storage,
            "trusted_root": str(self.trusted_root),
            "base_url": self.base_url,
            "metadata_url": self.metadata_url,
            "targets_url": self.targets_url,
            "bins": self.bins,
            "keys": self.keys,
        }


def init_project(
    project_dir: Path,
    storage_url: str,
    *,
    base_url: str = "http://127.0.0.1:8765",
    s3_endpoint: str | None = None,
    bins: int = 256,
    root_keys: int = 1,
    root_threshold: int = 1,
    keys_dir: Path | None = None,
    expiry: Expiry | None = None,
    single_publisher: bool = False,
    legacy_bins: bool = False,
) -> InitResult:
    """Create keys, ``ota.toml``, and a new, empty TUF repository in ``storage_url``.

    The delegation layout is ADR 0010's (per-model roles, a self-splitting archive): ``bins``
    is validated and recorded but sizes nothing, unless ``legacy_bins`` builds the ADR 0002
    layout of ``bins`` hash bins (only to test ``ota migrate-layout``).

    Offline keys (root, targets) go to ``keys/offline``, online ones (snapshot, timestamp,
    bins) to ``keys/online``, the model-signing key to ``keys/release``: three folders that a
    real deployment keeps on three different machines.

    The store's conditional writes are probed before any key is made
    (``ota.repository._condwrite``); ``single_publisher`` records single-publisher mode.

    Raises:
        InputError: bad ``bins`` or threshold; the project or repository already exists.
        ConfigError / TransientError: storage unusable, or it ignores conditional writes
            (outside single-publisher mode).
    """
    if bins < 2 or bins > 65536 or bins & (bins - 1):
        raise InputError(f"--bins must be a power of two between 2 and 65536, not {bins}")
    if not 1 <= root_threshold <= root_keys <= 16:
        raise InputError("root threshold must be between 1 and the number of root keys (<=16)")
    project_dir = Path(project_dir).resolve()
    if (project_dir / CONFIG_NAME).exists():
        raise InputError(f"{project_dir / CONFIG_NAME} already exists")
    storage = open_storage(storage_url, s3_endpoint=s3_endpoint, single_publisher=single_publisher)
    try:
        return _init_in(
            storage,
            project_dir,
            storage_url,
            base_url,
            s3_endpoint,
            bins,
            root_keys,
            root_threshold,
            keys_dir,
            expiry,
            single_publisher,
            legacy_bins,
        )
    finally:
        storage.close()  # single-publisher mode: release the host lock


def _init_in(
    storage: Storage,
    project_dir: Path,
    storage_url: str,
    base_url: str,
    s3_endpoint: str | None,
    bins: int,
    root_keys: int,
    root_threshold: int,
    keys_dir: Path | None,
    expiry: Expiry | None,
    single_publisher: bool,
    legacy_bins: bool = False,
) -> InitResult:
    if storage.exists(HEAD_KEY):
        raise InputError(f"a repository already exists at {storage.url}")
    storage.check_conditional_writes()
    expiry = expiry or Expiry()
    keys_dir = Path(keys_dir or project_dir / "keys").resolve()

    def rel(p: Path) -> str:
        return str(p.relative_to(project_dir)) if p.is_relative_to(project_dir) else str(p)

    uris, role_keys = generate_role_keys(keys_dir, root_keys, rel)
    release_key = keys_dir / "release" / "release-signing.pem"
    release_pub_path = keys_dir / "release" / "release-signing.pub.pem"
    release_pub = (
        release_pub_path.read_bytes()
        if release_key.exists() and release_pub_path.exists()
        else generate_p256(release_key, release_pub_path)
    )

    config = ProjectConfig(
        storage=storage_url if storage_url.startswith("s3://") else storage.url,
        base_url=base_url.rstrip("/"),
        s3_endpoint=s3_endpoint,
        bins=bins,
        expiry=expiry,
        signers=uris,
        release_key=rel(release_key),
        release_pub=rel(release_pub_path),
        publishers="single" if single_publisher else "concurrent",
    )
    signers = _LazySigners(project_dir, uris)
    now = datetime.now(UTC).replace(microsecond=0)

    root, targets, releases, succinct = top_level(
        role_keys, root_threshold, bins, expiry, now, legacy_bins=legacy_bins
    )
    signers_doc = signers_document(
        [SignerEntry(key_fingerprint(release_pub), release_pub.decode(), ("*",))]
    )
    targets.targets[SIGNERS_TARGET] = TargetFile.from_data(SIGNERS_TARGET, signers_doc)

    def signed_bytes(md: Metadata[Any], keys: list[SSlibKey], threshold: int, role: str) -> bytes:
        signers.sign(md, {k.keyid: k for k in keys}, threshold, role)
        return md.to_bytes(_SERIALIZER)

    bin_docs, targets_bytes, snapshot_bytes, timestamp = _first_versions(
        signed_bytes, role_keys, targets, releases, succinct, expiry, now
    )
    root_bytes = signed_bytes(Metadata(root), role_keys["root"], root_threshold, "root")
    _put_target_file(storage, SIGNERS_TARGET, signers_doc)
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda kv: storage.put(kv[0], kv[1], if_none_match=True), bin_docs))
    storage.put(md_key("root", 1), root_bytes, if_none_match=True)
    storage.put("metadata/root.json", root_bytes)
    storage.put(md_key("targets", 1), targets_bytes, if_none_match=True)
    storage.put(md_key("snapshot", 1), snapshot_bytes, if_none_match=True)
    try:
        storage.put(
            HEAD_KEY,
            signed_bytes(Metadata(timestamp), role_keys["timestamp"], 1, "timestamp"),
            if_none_match=True,
        )
    except PreconditionFailed as e:
        raise InputError(f"a repository was created concurrently at {storage.url}") from e

    project_dir.mkdir(parents=True, exist_ok=True)
    _atomic.write_bytes(project_dir / TRUSTED_ROOT_NAME, root_bytes)
    _atomic.write_bytes(project_dir / CONFIG_NAME, config.to_toml().encode())
    return InitResult(
        project=project_dir,
        storage=config.storage,
        trusted_root=project_dir / TRUSTED_ROOT_NAME,
        base_url=config.base_url,
        metadata_url=f"{config.base_url}/metadata/",
        targets_url=f"{config.base_url}/targets/",
        bins=bins,
        keys={role: [uris[k.keyid] for k in ks] for role, ks in role_keys.items()}
        | {"release": [rel(release_key)]},
    )


def target_storage_key(path: str, sha256: str) -> str:
    """Storage key of a TUF target under consistent snapshots: ``targets/<dir>/<hash>.<name>``."""
    dirname, _, base = path.rpartition("/")
    return f"targets/{dirname}/{sha256}.{base}" if dirname else f"targets/{sha256}.{base}"


def _first_versions(
    signed_bytes: Callable[[Metadata[Any], list[SSlibKey], int, str], bytes],
    role_keys: dict[str, list[SSlibKey]],
    targets: Targets,
    releases: Targets,
    succinct: Any,
    expiry: Expiry,
    now: datetime,
) -> tuple[list[tuple[str, bytes]], bytes, bytes, Timestamp]:
    """Version 1 of the bins, ``releases``, ``targets`` and ``snapshot`` roles, signed, and
    the unsigned first timestamp. Every meta entry carries its file's length: python-tuf then
    downloads at most that many bytes before checking a signature (a mirror cannot feed a
    device megabytes)."""
    snapshot = Snapshot(expires=now + expiry.for_role("snapshot"))
    bin_docs: list[tuple[str, bytes]] = []
    for name in succinct.get_roles():
        md = Metadata(Targets(expires=now + expiry.for_role(name)))
        data = signed_bytes(md, role_keys["bins"], 1, name)
        bin_docs.append((md_key(name, 1), data))
        snapshot.meta[f"{name}.json"] = MetaFile(version=1, length=len(data))
    releases_bytes = signed_bytes(Metadata(releases), role_keys["bins"], 1, RELEASES_ROLE)
    bin_docs.append((md_key(RELEASES_ROLE, 1), releases_bytes))
    snapshot.meta[f"{RELEASES_ROLE}.json"] = MetaFile(version=1, length=len(releases_bytes))
    targets_bytes = signed_bytes(Metadata(targets), role_keys["targets"], 1, "targets")
    snapshot.meta["targets.json"] = MetaFile(version=1, length=len(targets_bytes))
    snapshot_bytes = signed_bytes(Metadata(snapshot), role_keys["snapshot"], 1, "snapshot")
    timestamp = Timestamp(expires=now + expiry.for_role("timestamp"),
                          snapshot_meta=MetaFile(1, length=len(snapshot_bytes)))
    return bin_docs, targets_bytes, snapshot_bytes, timestamp


def _put_target_file(storage: Storage, path: str, data: bytes) -> TargetFile:
    info = TargetFile.from_data(path, data)
    key = target_storage_key(path, info.hashes["sha256"])
    with contextlib.suppress(PreconditionFailed):  # content-addressed: same bytes already there
        storage.put(key, data, if_none_match=True)
    return info


put_target_file = _put_target_file

__all__ = [
    "CONFIG_NAME",
    "RELEASES_PATHS",
    "SIGNERS_TARGET",
    "TRUSTED_ROOT_NAME",
    "generate_ed25519",
    "generate_p256",
    "key_fingerprint",
    "releases_delegation",
    "DelegatedRole",
    "InitResult",
    "Project",
    "ProjectConfig",
    "Role",
    "init_project",
    "put_target_file",
    "target_storage_key",
]
