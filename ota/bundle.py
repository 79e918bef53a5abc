"""The bundle format: manifests over content-addressed chunks, and the signed release facts.

See ``docs/adr/0001-bundle-format.md``. A bundle version is one TUF target, its *manifest*: a
canonical JSON document listing every file of the bundle with its sha256, size and the chunks it
is cut into. Chunks are stored once, by hash, at ``blobs/sha256/<hh>/<hex>``.

Everything parsed here comes from the network or from a bundle: every field is validated and
every quantity bounded by :class:`Limits`. Parsing raises :class:`FormatError` (a
:class:`~ota.errors.SecurityError`): a manifest that fails validation was produced by an attacker
or a broken publisher, never by us.

Layout of a bundle (paths are relative to the bundle root):

* ``release.json`` - the release facts (:class:`Release`), inside the signed file set so that a
  compromised online key cannot re-label a signed bundle with another name, version or counter.
* ``model/…`` - the ONNX model and its external-data files (model bundles).
* ``runtime/…`` - wheels or libraries (runtime bundles).
* ``smoke/inputs.npz``, ``smoke/golden.npz`` - reference inputs and golden outputs.
* ``sbom.cdx.json`` - CycloneDX 1.6 ML-BOM.
* ``provenance.intoto.json`` - in-toto statement with SLSA provenance, as a DSSE envelope.
* ``model.sig`` - the OpenSSF model-signing signature (a Sigstore bundle) over all other files.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ota.errors import InputError, SecurityError

MANIFEST_FORMAT = "edge-ota.manifest/1"
RELEASE_FORMAT = "edge-ota.release/1"
TARGET_CUSTOM_KEY = "edge-ota"

RELEASE_FILE = "release.json"
SIGNATURE_FILE = "model.sig"
SBOM_FILE = "sbom.cdx.json"
PROVENANCE_FILE = "provenance.intoto.json"
SMOKE_INPUTS_FILE = "smoke/inputs.npz"
SMOKE_GOLDEN_FILE = "smoke/golden.npz"

SIGNERS_TARGET = "trust/signers.json"
MAX_SIGNERS_BYTES = 256 * 1024
MAX_SIGNERS = 256

RINGS = ("canary", "pilot", "ga")
Kind = Literal["model", "runtime"]

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")
# SemVer 2.0.0 (https://semver.org), with an upper bound on length.
_VERSION_RE = re.compile(
    r"^(0|[1-9]\d{0,8})\.(0|[1-9]\d{0,8})\.(0|[1-9]\d{0,8})"
    r"(?:-[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?\Z"
)
_HEX64_RE = re.compile(r"^[0-9a-f]{64}\Z")
_PATH_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
# Device ids also admit ':' so that MAC-address ids (b8:27:eb:00:00:01), common on fleets that
# predate edge-ota, keep working; they are never used as a file name, and URLs quote them.
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._:-]{0,127}\Z")  # the fleet service too
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,64}\Z")


class FormatError(SecurityError):
    """A manifest, release document or target custom field is malformed or out of bounds."""


@dataclass(frozen=True)
class Limits:
    """Bounds on everything a device parses from a bundle. Defaults suit edge devices."""

    max_manifest_bytes: int = 8 * 1024 * 1024
    max_release_bytes: int = 64 * 1024
    max_files: int = 4096
    max_chunks: int = 1 << 17  # 128 GiB at FastCDC's 1 MiB average; bounds the manifest parse
    max_chunk_size: int = 8 * 1024 * 1024
    max_file_size: int = 64 * 1024**3
    max_bundle_size: int = 128 * 1024**3
    max_path_len: int = 255
    max_path_depth: int = 8


DEFAULT_LIMITS = Limits()


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid model or runtime name, else raise InputError."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InputError(
            f"invalid name {name!r:.80}",
            remedy="use 1-64 characters of a-z, 0-9, '.', '_' or '-', starting alphanumeric",
        )
    return name


def validate_version(version: str) -> str:
    """Return ``version`` if it is a SemVer 2.0 version string, else raise InputError."""
    if not isinstance(version, str) or len(version) > 128 or not _VERSION_RE.match(version):
        raise InputError(
            f"invalid version {version!r:.80}",
            remedy="use a SemVer version such as 1.4.0 or 2.0.0-rc.1",
        )
    return version


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` if it is safe as a URL path part and in logs (1-128 of
    A-Z a-z 0-9 ``_ . - :``, not starting with ``.``, ``-`` or ``:``), else raise InputError."""
    if not isinstance(device_id, str) or not DEVICE_ID_RE.match(device_id):
        raise InputError(
            f"invalid device id {device_id!r:.80}",
            remedy="use 1-128 characters of A-Z, a-z, 0-9, '_', '.', ':' or '-', "
            "starting with a letter, digit or '_'",
        )
    return device_id


def validate_bundle_path(path: str, limits: Limits = DEFAULT_LIMITS) -> str:
    """Return ``path`` if it is a safe relative path inside a bundle, else raise FormatError.

    Safe means: ``/``-separated, no empty, ``.`` or ``..`` part, no leading dot or dash, no
    backslash, no absolute path, bounded length and depth. Such a path cannot escape a slot
    directory on any platform we support.
    """
    if not isinstance(path, str) or not 0 < len(path) <= limits.max_path_len:
        raise FormatError(f"bundle path has a bad length: {path!r:.80}")
    parts = path.split("/")
    if len(parts) > limits.max_path_depth:
        raise FormatError(f"bundle path too deep: {path!r}")
    for part in parts:
        if not _PATH_PART_RE.match(part) or part in (".", ".."):
            raise FormatError(f"unsafe bundle path: {path!r}")
    return path


def blob_key(sha256: str) -> str:
    """Storage key of a content-addressed blob (relative to the repository root)."""
    return f"blobs/sha256/{sha256[:2]}/{sha256}"


def manifest_target_path(name: str, version: str) -> str:
    """TUF target path of a release's manifest."""
    return f"releases/{name}/{version}.json"


def index_target_path(name: str) -> str:
    """TUF target path of a model's release index (rollout state of its live releases)."""
    return f"index/{name}.json"


@dataclass(frozen=True)
class Chunk:
    sha256: str
    size: int


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    size: int
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class Manifest:
    """The TUF target of one release: which files, which bytes, which chunks."""

    name: str
    version: str
    files: tuple[FileEntry, ...]
    format: str = MANIFEST_FORMAT

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise FormatError(f"manifest of {self.name} {self.version} lacks {path}")

    def chunk_digests(self) -> set[str]:
        return {c.sha256 for f in self.files for c in f.chunks}

    def to_bytes(self) -> bytes:
        doc = {
            "format": self.format,
            "name": self.name,
            "version": self.version,
            "files": [
                {
                    "path": f.path,
                    "sha256": f.sha256,
                    "size": f.size,
                    "chunks": [[c.sha256, c.size] for c in f.chunks],
                }
                for f in self.files
            ],
        }
        return canonical_json(doc)

    @classmethod
    def from_bytes(cls, data: bytes, limits: Limits = DEFAULT_LIMITS) -> Manifest:
        """Parse and validate a manifest.

        Raises:
            FormatError: the document is not a valid, bounded manifest.
        """
        if len(data) > limits.max_manifest_bytes:
            raise FormatError(f"manifest of {len(data)} bytes exceeds the limit")
        # Bound what json.loads may allocate before it runs: names, versions, paths and hex
        # digests cannot contain these characters, so a real manifest has about 10 per file
        # and 3 per chunk. 8 MiB of "[]," would otherwise cost ~200 MiB to parse.
        tokens = sum(data.count(c) for c in (b"{", b"[", b",", b":"))
        if tokens > 64 + 16 * limits.max_files + 4 * limits.max_chunks:
            raise FormatError("manifest has more JSON structure than its limits allow")
        doc = _load_json(data, "manifest")
        _expect_keys(doc, {"format", "name", "version", "files"}, "manifest")
        if doc["format"] != MANIFEST_FORMAT:
            raise FormatError(f"unsupported manifest format {doc['format']!r:.80}")
        name, version = _name_version(doc)
        raw_files = doc["files"]
        if not isinstance(raw_files, list) or not 0 < len(raw_files) <= limits.max_files:
            raise FormatError("manifest has no files or too many")
        files: list[FileEntry] = []
        seen: set[str] = set()
        n_chunks = 0
        total = 0
        for raw in raw_files:
            entry = _parse_file_entry(raw, limits)
            if entry.path in seen or any(
                p.startswith(entry.path + "/") or entry.path.startswith(p + "/") for p in seen
            ):
                raise FormatError(f"duplicate or overlapping path {entry.path!r}")
            seen.add(entry.path)
            n_chunks += len(entry.chunks)
            total += entry.size
            if n_chunks > limits.max_chunks or total > limits.max_bundle_size:
                raise FormatError("manifest exceeds chunk or size limits")
            files.append(entry)
        if RELEASE_FILE not in seen:
            raise FormatError(f"manifest lacks {RELEASE_FILE}")
        return cls(name=name, version=version, files=tuple(files))


def _parse_file_entry(raw: object, limits: Limits) -> FileEntry:
    if not isinstance(raw, dict):
        raise FormatError("manifest file entry is not an object")
    _expect_keys(raw, {"path", "sha256", "size", "chunks"}, "file entry")
    path = validate_bundle_path(raw["path"], limits)
    sha = _hex64(raw["sha256"], "file sha256")
    size = _count(raw["size"], limits.max_file_size, "file size")
    raw_chunks = raw["chunks"]
    if not isinstance(raw_chunks, list) or len(raw_chunks) > limits.max_chunks:
        raise FormatError(f"bad chunk list for {path}")
    chunks: list[Chunk] = []
    for rc in raw_chunks:
        if not isinstance(rc, list) or len(rc) != 2:
            raise FormatError(f"bad chunk entry in {path}")
        c_size = _count(rc[1], limits.max_chunk_size, "chunk size")
        if c_size == 0:
            raise FormatError(f"empty chunk in {path}")
        chunks.append(Chunk(_hex64(rc[0], "chunk sha256"), c_size))
    if sum(c.size for c in chunks) != size:
        raise FormatError(f"chunks of {path} do not add up to its size")
    return FileEntry(path=path, sha256=sha, size=size, chunks=tuple(chunks))


@dataclass(frozen=True)
class Compat:
    """Which devices may install a release. Empty tuples mean "any"."""

    arch: tuple[str, ...] = ()
    tiers: tuple[str, ...] = ()
    runtime: str = ""  # a PEP 440 specifier on the onnxruntime version, e.g. ">=1.20,<2"
    min_client: str = "0.0.0"
    providers: tuple[str, ...] = ()  # onnxruntime execution providers required

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": list(self.arch),
            "tiers": list(self.tiers),
            "runtime": self.runtime,
            "min_client": self.min_client,
            "providers": list(self.providers),
        }

    @classmethod
    def from_dict(cls, doc: object) -> Compat:
        if not isinstance(doc, dict):
            raise FormatError("compat is not an object")
        _expect_keys(doc, {"arch", "tiers", "runtime", "min_client", "providers"}, "compat")
        runtime = doc["runtime"]
        if not isinstance(runtime, str) or len(runtime) > 128:
            raise FormatError("bad runtime range")
        min_client = doc["min_client"]
        if not isinstance(min_client, str) or not _VERSION_RE.match(min_client):
            raise FormatError("bad min_client")
        return cls(
            arch=_tokens(doc["arch"], "arch"),
            tiers=_tokens(doc["tiers"], "tiers"),
            runtime=runtime,
            min_client=min_client,
            providers=_tokens(doc["providers"], "providers"),
        )


@dataclass(frozen=True)
class Budget:
    """Smoke budget for one hardware tier."""

    latency_ms_p95: float | None = None
    peak_mem_mb: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "latency_ms_p95": _fstr(self.latency_ms_p95),
            "peak_mem_mb": _fstr(self.peak_mem_mb),
        }


SMOKE_CHECKS = ("values", "shapes")
"""How a device compares smoke outputs: ``values`` (with the golden outputs, within rtol/atol)
or ``shapes`` (names, dtypes, shapes and finiteness only: models whose outputs vary)."""
MAX_SMOKE_SETS = 16


@dataclass(frozen=True)
class SmokeSpec:
    """How a device checks a bundle before committing it.

    ``inputs``/``golden`` are the first reference set; ``extra_sets`` holds further
    ``(inputs, golden)`` pairs, each checked the same way (at most ``MAX_SMOKE_SETS`` in all).
    ``check`` is one of :data:`SMOKE_CHECKS`. The two optional keys are written only when they
    differ from the defaults, so a release that uses neither has the same bytes as before, and a
    device too old to know them refuses a release that needs them (fail closed).
    """

    inputs: str = SMOKE_INPUTS_FILE
    golden: str = SMOKE_GOLDEN_FILE
    rtol: float = 1e-3
    atol: float = 1e-4
    runs: int = 5
    budgets: Mapping[str, Budget] = field(default_factory=dict)  # tier name, or "*" for any
    check: str = "values"
    extra_sets: tuple[tuple[str, str], ...] = ()

    def sets(self) -> tuple[tuple[str, str], ...]:
        """Every ``(inputs, golden)`` pair, the first one first."""
        return ((self.inputs, self.golden), *self.extra_sets)

    def files(self) -> tuple[str, ...]:
        """Every smoke file's bundle path."""
        return tuple(p for pair in self.sets() for p in pair)

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "inputs": self.inputs,
            "golden": self.golden,
            "rtol": _fstr(self.rtol),
            "atol": _fstr(self.atol),
            "runs": self.runs,
            "budgets": {k: v.to_dict() for k, v in sorted(self.budgets.items())},
        }
        if self.check != "values":
            doc["check"] = self.check
        if self.extra_sets:
            doc["extra_sets"] = [{"inputs": i, "golden": g} for i, g in self.extra_sets]
        return doc

    @classmethod
    def from_dict(cls, doc: object) -> SmokeSpec:
        if not isinstance(doc, dict):
            raise FormatError("smoke spec is not an object")
        base = {"inputs", "golden", "rtol", "atol", "runs", "budgets"}
        _expect_keys(doc, base | ({"check", "extra_sets"} & set(doc)), "smoke spec")
        budgets_raw = doc["budgets"]
        if not isinstance(budgets_raw, dict) or len(budgets_raw) > 64:
            raise FormatError("bad smoke budgets")
        budgets: dict[str, Budget] = {}
        for tier, b in budgets_raw.items():
            if not isinstance(b, dict) or not (tier == "*" or _TOKEN_RE.match(tier)):
                raise FormatError("bad smoke budget")
            _expect_keys(b, {"latency_ms_p95", "peak_mem_mb"}, "budget")
            budgets[tier] = Budget(
                _opt_float(b["latency_ms_p95"], "latency budget"),
                _opt_float(b["peak_mem_mb"], "memory budget"),
            )
        runs = _count(doc["runs"], 1000, "smoke runs")
        check = doc.get("check", "values")
        if check not in SMOKE_CHECKS or ("check" in doc and check == "values"):
            raise FormatError(f"bad smoke check {check!r:.40}")
        extra_raw = doc.get("extra_sets", [])
        if not isinstance(extra_raw, list) or ("extra_sets" in doc and not extra_raw):
            raise FormatError("bad smoke extra_sets")
        if len(extra_raw) >= MAX_SMOKE_SETS:
            raise FormatError(f"more than {MAX_SMOKE_SETS} smoke sets")
        extra: list[tuple[str, str]] = []
        for item in extra_raw:
            if not isinstance(item, dict):
                raise FormatError("bad smoke set")
            _expect_keys(item, {"inputs", "golden"}, "smoke set")
            extra.append(
                (validate_bundle_path(item["inputs"]), validate_bundle_path(item["golden"]))
            )
        spec = cls(
            inputs=validate_bundle_path(doc["inputs"]),
            golden=validate_bundle_path(doc["golden"]),
            rtol=_float(doc["rtol"], "rtol"),
            atol=_float(doc["atol"], "atol"),
            runs=max(runs, 1),
            budgets=budgets,
            check=check,
            extra_sets=tuple(extra),
        )
        if len(set(spec.files())) != len(spec.files()):
            raise FormatError("smoke sets name one file twice")
        return spec

    def budget_for(self, tier: str) -> Budget | None:
        return self.budgets.get(tier) or self.budgets.get("*")


@dataclass(frozen=True)
class Release:
    """Immutable facts of one release: carried in ``release.json`` (signed by the model key via
    the bundle signature) and repeated in the TUF target's custom data (signed by TUF)."""

    name: str
    version: str
    counter: int
    kind: Kind = "model"
    compat: Compat = field(default_factory=Compat)
    security_floor: int = 0  # devices must refuse any release with a lower counter afterwards
    smoke: SmokeSpec | None = field(default_factory=SmokeSpec)
    model_path: str = "model/model.onnx"
    rollback_of: str | None = None  # version whose files this release re-publishes
    created: str = ""  # RFC 3339 UTC
    # Rollbacks only: the counter of the release whose content this one carries (issue 12).
    # Serialised only when set, so release documents written before it stay byte-identical.
    content_counter: int | None = None
    # Issue 9: the reference output distribution (``edge-ota.telemetry/1``, ADR 0009), the
    # fixed bins devices summarise outputs into. Serialised only when set (same reason).
    telemetry: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.content_counter is not None:
            extra["content_counter"] = self.content_counter
        if self.telemetry is not None:
            extra["telemetry"] = self.telemetry
        return {
            **extra,
            "format": RELEASE_FORMAT,
            "name": self.name,
            "version": self.version,
            "counter": self.counter,
            "kind": self.kind,
            "compat": self.compat.to_dict(),
            "security_floor": self.security_floor,
            "smoke": self.smoke.to_dict() if self.smoke else None,
            "model_path": self.model_path,
            "rollback_of": self.rollback_of,
            "created": self.created,
        }

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, doc: object) -> Release:
        """Validate a release document.

        Raises:
            FormatError: missing, extra or invalid fields.
        """
        if not isinstance(doc, dict):
            raise FormatError("release is not an object")
        _expect_keys(
            doc,
            {
                "format",
                "name",
                "version",
                "counter",
                "kind",
                "compat",
                "security_floor",
                "smoke",
                "model_path",
                "rollback_of",
                "created",
                *(("content_counter",) if "content_counter" in doc else ()),
                *(("telemetry",) if "telemetry" in doc else ()),
            },
            "release",
        )
        if doc["format"] != RELEASE_FORMAT:
            raise FormatError(f"unsupported release format {doc['format']!r:.80}")
        name, version = _name_version(doc)
        kind = doc["kind"]
        if kind not in ("model", "runtime"):
            raise FormatError(f"bad release kind {kind!r:.80}")
        rollback_of = doc["rollback_of"]
        if rollback_of is not None:
            _name_version({"name": name, "version": rollback_of})
        created = doc["created"]
        if not isinstance(created, str) or len(created) > 40:
            raise FormatError("bad created timestamp")
        content = doc.get("content_counter")
        if content is not None:
            content = _count(content, 2**53, "content counter")
            if rollback_of is None:
                raise FormatError("content_counter is only for rollback releases")
        return cls(
            name=name,
            version=version,
            counter=_count(doc["counter"], 2**53, "release counter"),
            kind=kind,
            compat=Compat.from_dict(doc["compat"]),
            security_floor=_count(doc["security_floor"], 2**53, "security floor"),
            smoke=None if doc["smoke"] is None else SmokeSpec.from_dict(doc["smoke"]),
            model_path=validate_bundle_path(doc["model_path"]),
            rollback_of=rollback_of,
            created=created,
            content_counter=content,
            telemetry=_telemetry_reference(doc["telemetry"]) if "telemetry" in doc else None,
        )

    @classmethod
    def from_bytes(cls, data: bytes, limits: Limits = DEFAULT_LIMITS) -> Release:
        if len(data) > limits.max_release_bytes:
            raise FormatError("release document too large")
        return cls.from_dict(_load_json(data, "release"))


def _telemetry_reference(doc: object) -> Mapping[str, Any]:
    """A release's reference distribution, validated by the telemetry format's own checker
    (imported here, lazily: ``ota.client`` imports this module). Present means not null: a
    release without one omits the key, so each release has one encoding."""
    from ota.client._telemetry_format import TelemetryError, validate_reference

    try:
        validate_reference(doc)
    except TelemetryError as e:
        raise FormatError(f"bad telemetry reference: {e}") from e
    assert isinstance(doc, dict)
    return doc


@dataclass(frozen=True)
class TargetFacts:
    """Custom data of a release's TUF target (signed with the bins key)."""

    release: Release
    digests: Mapping[str, str]  # bundle file path -> sha256, for release.json, sbom, signature…

    def to_custom(self) -> dict[str, Any]:
        return {
            TARGET_CUSTOM_KEY: {
                "release": self.release.to_dict(),
                "digests": dict(sorted(self.digests.items())),
            }
        }

    @classmethod
    def from_custom(cls, custom: Mapping[str, Any]) -> TargetFacts:
        if not isinstance(custom, Mapping):  # python-tuf passes whatever the metadata holds
            raise FormatError("target custom data is not an object")
        doc = custom.get(TARGET_CUSTOM_KEY)
        if not isinstance(doc, dict):
            raise FormatError("target lacks edge-ota custom data")
        _expect_keys(doc, {"release", "digests"}, "target custom data")
        digests = doc["digests"]
        if not isinstance(digests, dict) or len(digests) > 64:
            raise FormatError("bad digests in target custom data")
        return cls(
            release=Release.from_dict(doc["release"]),
            digests={validate_bundle_path(k): _hex64(v, "digest") for k, v in digests.items()},
        )


@dataclass(frozen=True)
class RolloutState:
    """Mutable rollout state of one release, kept in the model's index target."""

    version: str
    counter: int
    ring: str = "canary"
    percent: float = 100.0
    paused: bool = False
    yanked: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "counter": self.counter,
            "ring": self.ring,
            "percent": _fstr(self.percent),
            "paused": self.paused,
            "yanked": self.yanked,
        }

    @classmethod
    def from_dict(cls, doc: object) -> RolloutState:
        if not isinstance(doc, dict):
            raise FormatError("rollout entry is not an object")
        _expect_keys(doc, {"version", "counter", "ring", "percent", "paused", "yanked"}, "rollout")
        version = doc["version"]
        if not isinstance(version, str) or not _VERSION_RE.match(version):
            raise FormatError("bad version in rollout entry")
        if doc["ring"] not in RINGS:
            raise FormatError(f"unknown ring {doc['ring']!r:.80}")
        percent = _float(doc["percent"], "percent")
        if not 0.0 <= percent <= 100.0:
            raise FormatError("percent out of range")
        paused, yanked = doc["paused"], doc["yanked"]
        if not isinstance(paused, bool) or not isinstance(yanked, bool):
            raise FormatError("paused and yanked must be booleans")
        return cls(
            version=version,
            counter=_count(doc["counter"], 2**53, "counter"),
            ring=doc["ring"],
            percent=percent,
            paused=paused,
            yanked=yanked,
        )


@dataclass(frozen=True)
class ModelIndex:
    """The index target of one model: its live releases and their rollout state, and the floor.

    Devices read it to find candidates (hash bins cannot be listed); it is bounded to the newest
    ``max_live`` releases so that it stays small however long the history grows.
    """

    name: str
    releases: tuple[RolloutState, ...] = ()
    security_floor: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "security_floor": self.security_floor,
            "releases": [r.to_dict() for r in self.releases],
        }

    def to_bytes(self) -> bytes:
        return canonical_json({TARGET_CUSTOM_KEY: self.to_dict()})

    def to_custom(self) -> dict[str, Any]:
        return {TARGET_CUSTOM_KEY: self.to_dict()}

    @classmethod
    def from_custom(cls, custom: Mapping[str, Any], max_releases: int = 1024) -> ModelIndex:
        if not isinstance(custom, Mapping):
            raise FormatError("index custom data is not an object")
        doc = custom.get(TARGET_CUSTOM_KEY)
        if not isinstance(doc, dict):
            raise FormatError("index lacks edge-ota custom data")
        _expect_keys(doc, {"name", "security_floor", "releases"}, "index")
        name = validate_name_fmt(doc["name"])
        raw = doc["releases"]
        if not isinstance(raw, list) or len(raw) > max_releases:
            raise FormatError("bad release list in index")
        return cls(
            name=name,
            releases=tuple(RolloutState.from_dict(r) for r in raw),
            security_floor=_count(doc["security_floor"], 2**53, "security floor"),
        )

    def get(self, version: str) -> RolloutState | None:
        for r in self.releases:
            if r.version == version:
                return r
        return None


@dataclass(frozen=True)
class SignerEntry:
    """One model-signing public key (PEM) of ``trust/signers.json`` and the model-name globs it
    may sign. The document is a target of the offline top-level targets role."""

    keyid: str
    public_key_pem: str
    models: tuple[str, ...]

    def allows(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, m) for m in self.models)


def parse_signers(data: bytes) -> list[SignerEntry]:
    """Parse ``trust/signers.json`` (bounded: size and number of keys).

    Raises:
        FormatError: too large or malformed.
    """
    if len(data) > MAX_SIGNERS_BYTES:
        raise FormatError(f"{SIGNERS_TARGET} is too large")
    doc = _load_json(data, SIGNERS_TARGET)
    raw = doc.get("signers")
    if not isinstance(raw, list) or len(raw) > MAX_SIGNERS:
        raise FormatError(f"{SIGNERS_TARGET} has no signer list or too many signers")
    out = []
    for s in raw:
        if not isinstance(s, dict):
            raise FormatError(f"{SIGNERS_TARGET}: a signer is not an object")
        _expect_keys(s, {"keyid", "public_key_pem", "models"}, "signer")
        keyid, pem, models = s["keyid"], s["public_key_pem"], s["models"]
        if not isinstance(keyid, str) or not _HEX64_RE.match(keyid):
            raise FormatError(f"{SIGNERS_TARGET}: bad key id {keyid!r:.80}")
        if not isinstance(pem, str) or len(pem) > 16 * 1024:
            raise FormatError(f"{SIGNERS_TARGET}: bad public key for {keyid}")
        if not isinstance(models, list) or len(models) > 64:
            raise FormatError(f"{SIGNERS_TARGET}: bad model globs for {keyid}")
        if not all(isinstance(m, str) and 0 < len(m) <= 128 for m in models):
            raise FormatError(f"{SIGNERS_TARGET}: bad model glob for {keyid}")
        out.append(SignerEntry(keyid, pem, tuple(models)))
    return out


def signers_document(entries: Iterable[SignerEntry]) -> bytes:
    """Canonical ``trust/signers.json`` for ``entries`` (sorted, so the bytes are stable)."""
    signers = [
        {"keyid": e.keyid, "public_key_pem": e.public_key_pem, "models": sorted(e.models)}
        for e in sorted(entries, key=lambda e: e.keyid)
    ]
    return canonical_json({"signers": signers})


# -- helpers -------------------------------------------------------------------------------


def _fstr(value: float | None) -> str | None:
    """Floats travel as decimal strings: TUF's canonical JSON has no floats."""
    return None if value is None else repr(float(value))


def canonical_json(doc: object) -> bytes:
    """Deterministic JSON: sorted keys, no whitespace, UTF-8. Hashes of it are stable."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def validate_name_fmt(name: object) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise FormatError(f"bad name {name!r:.80}")
    return name


def _name_version(doc: Mapping[str, Any]) -> tuple[str, str]:
    name = validate_name_fmt(doc["name"])
    version = doc["version"]
    if not isinstance(version, str) or len(version) > 128 or not _VERSION_RE.match(version):
        raise FormatError(f"bad version {version!r:.80}")
    return name, version


def strict_json(data: bytes | str) -> Any:
    """``json.loads`` refusing duplicate keys and NaN/Infinity (ValueError). Bad UTF-8 is a
    ValueError too; deep nesting a RecursionError: callers map both to their error class."""
    return json.loads(data, object_pairs_hook=_unique_keys, parse_constant=_no_constant)


def _load_json(data: bytes, what: str) -> dict[str, Any]:
    """A JSON object with unique keys; deep nesting, NaN and bad UTF-8 are FormatErrors."""
    try:
        doc = strict_json(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise FormatError(f"{what} is not valid JSON: {str(e)[:200]}") from e
    if not isinstance(doc, dict):
        raise FormatError(f"{what} is not a JSON object")
    return doc


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise ValueError("duplicate key")
    return doc


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _expect_keys(doc: Mapping[str, Any], keys: Iterable[str], what: str) -> None:
    want = set(keys)
    have = set(doc)
    if have != want:
        missing, extra = sorted(want - have), sorted(have - want)
        raise FormatError(f"{what}: missing {missing}, unexpected {str(extra)[:200]}")


def _hex64(value: object, what: str) -> str:
    if not isinstance(value, str) or not _HEX64_RE.match(value):
        raise FormatError(f"bad {what}: {value!r:.80}")
    return value


def _count(value: object, maximum: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise FormatError(f"bad {what}: {value!r:.40}")
    return value


def _float(value: object, what: str) -> float:
    """A finite number given as a decimal string (or an int/float from older writers)."""
    if isinstance(value, str) and len(value) <= 32:
        try:
            value = float(value)
        except ValueError:
            raise FormatError(f"bad {what}: {value!r:.40}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FormatError(f"bad {what}: {value!r:.40}")
    return float(value)


def _opt_float(value: object, what: str) -> float | None:
    return None if value is None else _float(value, what)


def _tokens(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > 64:
        raise FormatError(f"bad {what} list")
    out = []
    for v in value:
        if not isinstance(v, str) or not _TOKEN_RE.match(v):
            raise FormatError(f"bad {what} entry {v!r:.40}")
        out.append(v)
    return tuple(out)
