"""``ota audit`` and ``ota verify``: the auditor's report of one release (``docs/audit.md``).

The TUF chain is verified by python-tuf itself: an ``ngclient.Updater`` bootstrapped with the
project's trusted ``root.json`` reads the repository through :class:`SourceFetcher` (storage,
HTTP, or an exported folder), then the report is read from the metadata it verified and
cached (keys, thresholds, versions, expiries of root -> targets -> delegated role(s)). The
manifest and ``trust/signers.json`` are downloaded as TUF targets; every chunk of every file
is streamed and hashed; :mod:`ota.repository._verify` checks signature, provenance, SBOM and
vulnerabilities. ``--export DIR`` materialises the verified bundle and replayable metadata.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile

from ota import _atomic
from ota.bundle import (
    DEFAULT_LIMITS,
    MAX_SIGNERS_BYTES,
    SIGNERS_TARGET,
    FileEntry,
    Manifest,
    ModelIndex,
    SignerEntry,
    TargetFacts,
    index_target_path,
    manifest_target_path,
    parse_signers,
    validate_name,
    validate_version,
)
from ota.errors import InputError, OtaError, SecurityError
from ota.repository._auditlog import ANCHOR_CUSTOM_KEY, ANCHOR_TARGET
from ota.repository._tufview import DirSource, Source, StorageSource, TufView
from ota.repository._verify import MAX_SMALL_FILE, Report, check_bundle, hash_local_files

if TYPE_CHECKING:
    from ota.repository._project import Project

_TUF_ERRORS = (tuf_exc.RepositoryError, tuf_exc.DownloadError, ValueError)


def _tuf_reason(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


@dataclass
class AuditOptions:
    osv: Path | None = None
    fail_on: str = "low"
    export: Path | None = None


def audit(source: Source, trusted_root: bytes, name: str, version: str,
          options: AuditOptions | None = None) -> Report:  # fmt: skip
    """Audit one release. Never raises for a failed check: see :meth:`Report.raise_for_failures`.

    Raises:
        InputError: bad name or version; an export folder that is not empty.
        UnknownRelease: the verified metadata does not list the release (exit 3, with the
            closest published versions as a hint); refused metadata is a failed check.
        LocalError: the export cannot be written.
    """
    opts = options or AuditOptions()
    validate_name(name)
    validate_version(version)
    if opts.export is not None and opts.export.exists() and any(opts.export.iterdir()):
        raise InputError(f"{opts.export} is not empty", remedy="export into a new folder")
    report = Report(f"{name} {version}", source.label)
    with tempfile.TemporaryDirectory(prefix="ota-audit-") as tmp:
        tuf = _tuf_step(report, source, trusted_root, manifest_target_path(name, version),
                        Path(tmp), lambda view: _not_published(view, name, version))  # fmt: skip
        if tuf is None:
            return _skip_rest(report)
        view, info = tuf
        manifest = _manifest_step(report, view, info, name, version)
        if manifest is None:
            return _skip_rest(report)
        facts, signers = _facts_step(report, view, info)
        small, bad = _files_step(report, source, manifest, opts.export)
        check_bundle(report, manifest, {p: small.get(p) for p in MAX_SMALL_FILE}, facts,
                     signers, osv=opts.osv, fail_on=opts.fail_on)  # fmt: skip
        if opts.export is not None and not bad and facts is not None:
            _export_meta(opts.export, view, info, manifest)
    return report


def _skip_rest(report: Report) -> Report:
    for name in ("files", "release", "signature", "provenance", "sbom", "vulns"):
        if all(c.name != name for c in report.checks):
            report.add(name, "skipped", "not checked: an earlier check failed")
    return report


def _tuf_step(report: Report, source: Source, root: bytes, path: str, work: Path,
              missing: Callable[[TufView], None] | None = None,
              ) -> tuple[TufView, TargetFile] | None:  # fmt: skip
    """Verify the metadata down to ``path``. A target that the verified metadata does not
    list is handed to ``missing`` (which raises :class:`UnknownRelease` for an audit: the
    metadata was verified, so the release is simply not published), else a failed check."""
    view: TufView | None = None
    try:
        view = TufView(source, root, work)
        info = view.target(path)
    except _TUF_ERRORS as e:
        where = f" (reading {view.fetcher.last})" if view and view.fetcher.last else ""
        report.add("tuf", "failed", f"metadata refused by python-tuf{where}: {_tuf_reason(e)}")
        return None
    if info is None and missing is not None:
        missing(view)
    if info is None:
        report.add("tuf", "failed", f"{path} is not a target of the verified metadata")
        return None
    chain = view.chain(path)
    report.add("tuf", "ok", "root -> " + " -> ".join(r["role"] for r in chain[3:]) + f" -> {path}",
               chain=chain, target={"path": path, "length": info.length,
                                    "sha256": info.hashes.get("sha256")})  # fmt: skip
    return view, info


def _not_published(view: TufView, name: str, version: str) -> None:
    """Raise :class:`UnknownRelease` for a release the *verified* metadata does not list,
    suggesting the closest published versions (from the model's TUF-verified index).

    Raises:
        UnknownRelease: the release is not published (exit 3: a typo is not a security
            failure).
        SecurityError: the model's index target is malformed, or lists the release.
    """
    from ota.repository._index import UnknownRelease

    try:
        index_info = view.target(index_target_path(name))
    except _TUF_ERRORS as e:
        raise SecurityError(f"metadata refused by python-tuf: {_tuf_reason(e)}") from e
    if index_info is None:
        raise UnknownRelease(
            f"{name} {version} is not published: no model {name!r} in the verified metadata",
            remedy="check the model name (`ota releases`)",
        )
    try:
        versions = [r.version for r in ModelIndex.from_custom(index_info.custom).releases]
    except OtaError as e:
        raise SecurityError(f"{index_target_path(name)} is malformed: {e}") from e
    if version in versions:  # hidden from the bins, still listed: not a typo
        raise SecurityError(
            f"the verified index of {name} lists {version} but the verified metadata has no "
            "target for it: an inconsistent repository (a hidden release)",
            remedy="treat the online keys as compromised (docs/runbooks/incident.md)",
        )
    close = difflib.get_close_matches(version, versions, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}?" if close else (
        "live versions: " + (", ".join(versions[-5:]) or "none"))  # fmt: skip
    raise UnknownRelease(f"{name} {version} is not published", remedy=hint)


def _manifest_step(report: Report, view: TufView, info: TargetFile, name: str,
                   version: str) -> Manifest | None:  # fmt: skip
    try:
        manifest = Manifest.from_bytes(view.download(info, DEFAULT_LIMITS.max_manifest_bytes))
    except (*_TUF_ERRORS, OtaError) as e:
        report.add("manifest", "failed", f"manifest refused: {_tuf_reason(e)}")
        return None
    if (manifest.name, manifest.version) != (name, version):
        report.add("manifest", "failed", f"manifest describes {manifest.name} {manifest.version}")
        return None
    report.add("manifest", "ok", f"{len(manifest.files)} files, {manifest.total_size} bytes, "
               "length and sha256 verified by python-tuf", sha256=info.hashes.get("sha256"),
               files=[{"path": f.path, "sha256": f.sha256, "size": f.size,
                       "chunks": len(f.chunks)} for f in manifest.files])  # fmt: skip
    return manifest


def _facts_step(
    report: Report, view: TufView, info: TargetFile
) -> tuple[TargetFacts | None, list[SignerEntry] | None]:
    """The target's custom facts and the TUF-verified signer list."""
    facts: TargetFacts | None = None
    try:
        facts = TargetFacts.from_custom(info.custom)
    except OtaError as e:
        report.add("target-facts", "failed", str(e))
    signers: list[SignerEntry] | None = None
    try:
        sinfo = view.target(SIGNERS_TARGET)
        if sinfo is None:
            raise SecurityError(f"{SIGNERS_TARGET} is not a target")
        signers = parse_signers(view.download(sinfo, MAX_SIGNERS_BYTES))
        report.add("signers", "ok", f"{SIGNERS_TARGET}: {len(signers)} keys (TUF target)",
                   keyids=[s.keyid for s in signers])  # fmt: skip
    except (*_TUF_ERRORS, OtaError) as e:
        report.add("signers", "failed", f"{SIGNERS_TARGET} refused: {_tuf_reason(e)}")
    return facts, signers


def _files_step(report: Report, source: Source, manifest: Manifest,
                export: Path | None) -> tuple[dict[str, bytes], set[str]]:  # fmt: skip
    """Stream every chunk, check it and its file's sha256; keep the small special files."""
    small: dict[str, bytes] = {}
    bad: set[str] = set()
    problems: list[str] = []
    for f in manifest.files:
        keep = f.path in MAX_SMALL_FILE and f.size <= MAX_SMALL_FILE[f.path]
        try:
            if export is None:
                data = _stream_file(source, f, None, keep)
            else:
                with _atomic.open_atomic(export / "bundle" / f.path) as sink:
                    data = _stream_file(source, f, sink, keep)
        except SecurityError as e:
            bad.add(f.path)
            problems.append(str(e))
            continue
        if keep:
            small[f.path] = data
    chunks = sum(len(f.chunks) for f in manifest.files)
    if problems:
        report.add("files", "failed", "altered or missing: " + ", ".join(sorted(bad)),
                   problems=problems)  # fmt: skip
    else:
        report.add("files", "ok", f"{len(manifest.files)} files, {chunks} chunks: sha256 verified")
    return small, bad


def _stream_file(source: Source, f: FileEntry, sink: BinaryIO | None, keep: bool) -> bytes:
    """Read a file chunk by chunk, each bounded by its size and checked by its sha256.

    Raises:
        SecurityError: a chunk is missing, altered, or the file's digest differs.
    """
    from ota.repository._blobread import iter_chunks

    buf = bytearray()
    file_hash = hashlib.sha256()
    chunks = iter_chunks(f, source.read, source.read_range)  # either layout (ADR 0017)
    while True:
        try:
            got = next(chunks, None)
        except SecurityError as e:
            raise SecurityError(f"{f.path}: {e}") from e
        except OtaError as e:
            raise SecurityError(f"{f.path}: a chunk is unavailable: {e}") from e
        if got is None:
            break
        _, data = got
        file_hash.update(data)
        if keep:
            buf += data
        if sink is not None:
            sink.write(data)
    if file_hash.hexdigest() != f.sha256:
        raise SecurityError(f"{f.path}: file sha256 differs from the manifest")
    return bytes(buf)


def _export_meta(dest: Path, view: TufView, info: TargetFile, manifest: Manifest) -> None:
    """Write the manifest, the target facts, signers.json and the TUF files served."""
    _atomic.write_bytes(dest / "manifest.json", manifest.to_bytes())
    _atomic.write_bytes(
        dest / "target.json",
        json.dumps({"path": info.path, "info": info.to_dict()}, sort_keys=True, indent=1).encode(),
    )
    for key, data in view.fetcher.served.items():
        _atomic.write_bytes(dest / "tuf" / key, data)
        if key.startswith("targets/trust/"):
            _atomic.write_bytes(dest / "signers.json", data)


def read_anchor(
    source: Source, trusted_root: bytes, metadata_cache: Path
) -> tuple[int, str] | None:
    """The signed head of the audit log, read through python-tuf (``None`` if never anchored).

    ``metadata_cache`` persists the verified metadata between runs, so that python-tuf refuses
    a repository rolled back to older metadata (which could hide a truncated log).

    Raises:
        SecurityError: the metadata is refused, or the anchor is malformed.
    """
    try:
        view = TufView(source, trusted_root, metadata_cache)
        info = view.target(ANCHOR_TARGET)
    except _TUF_ERRORS as e:
        raise SecurityError(f"metadata refused by python-tuf: {_tuf_reason(e)}") from e
    if info is None:
        return None
    doc = info.custom.get(ANCHOR_CUSTOM_KEY)
    if not isinstance(doc, dict) or not isinstance(doc.get("seq"), int):
        raise SecurityError("malformed audit log anchor")
    return int(doc["seq"]), str(doc.get("hash", ""))


def verify_dir(folder: Path, *, trusted_root: bytes | None = None,
               signer_key: bytes | None = None, osv: Path | None = None,
               fail_on: str = "low") -> Report:  # fmt: skip
    """``ota verify``: the audit's checks, offline, for a bundle already on disk.

    ``folder`` is an export (``bundle/``, ``manifest.json``, ``target.json``, ``tuf/``) or a
    device slot (``slots/a`` with ``a.manifest.json`` beside it). With ``trusted_root`` the
    exported TUF metadata is replayed through python-tuf (expiry included) and the target
    facts and signer list come from it; else the target facts are unverified claims.

    Invariant: the trust anchor is what the operator gives, never a file in ``folder``.
    ``signer_key`` (a PEM public key), when given, is the *only* key the signature and the
    provenance are checked with (even beside ``--root``); a slot's own ``a.signers.json`` is
    evidence of what the device trusted, not a trust anchor, so a slot without
    ``signer_key`` fails the signature check.

    Raises:
        InputError: ``folder`` is neither layout; ``signer_key`` is not a PEM public key.
        SecurityError: a malformed manifest.
    """
    folder = Path(folder).resolve()
    if (folder / "manifest.json").is_file() and (folder / "bundle").is_dir():
        layout, bundle, manifest_path = "export", folder / "bundle", folder / "manifest.json"
    elif (folder.parent / f"{folder.name}.manifest.json").is_file():
        layout, bundle = "slot", folder
        manifest_path = folder.parent / f"{folder.name}.manifest.json"
    else:
        raise InputError(f"{folder} is neither an `ota audit --export` folder nor a device slot")
    operator = _operator_signer(signer_key) if signer_key is not None else None
    raw = _read_bounded(manifest_path, DEFAULT_LIMITS.max_manifest_bytes)
    manifest = Manifest.from_bytes(raw)
    report = Report(f"{manifest.name} {manifest.version}", f"{folder} ({layout})")
    facts, signers = None, None
    if layout == "slot":
        report.add("tuf", "skipped", "slot evidence was verified by TUF at install time")
        facts = _slot_evidence(report, folder, operator)
    elif trusted_root is None:
        report.add("tuf", "skipped", "no --root: target facts are unverified claims")
        facts = _claimed_facts(report, folder)
    else:
        facts, signers = _replay(report, folder, trusted_root, manifest, raw)
    if operator is not None:
        signers = [operator]
        if layout != "slot":
            report.add("signers", "ok", f"the operator's key {operator.keyid[:16]} (--signer-key)"
                       " is the only trusted signer", keyids=[operator.keyid])  # fmt: skip
    problems, small = hash_local_files(bundle, manifest)
    if problems:
        report.add("files", "failed", f"{len(problems)} problems", problems=problems)
    else:
        report.add("files", "ok", f"{len(manifest.files)} files: sha256 and size verified")
    check_bundle(report, manifest, {p: small.get(p) for p in MAX_SMALL_FILE}, facts, signers,
                 osv=osv, fail_on=fail_on)  # fmt: skip
    if layout == "slot":
        _check_unpacked(report, folder)
    return report


def _check_unpacked(report: Report, slot: Path) -> None:
    """A runtime slot's wheels unpacked beside it (what apps import) are checked too."""
    from ota.client._runtime import check_unpacked

    try:
        found = check_unpacked(slot)
    except (OtaError, OSError, zipfile.BadZipFile) as e:
        report.add("unpacked", "failed", f"the slot's wheels cannot be re-read: {e}")
        return
    if found is None:
        return
    dest, problems = found
    if problems:
        report.add("unpacked", "failed", f"{dest.name}: {len(problems)} problems",
                   problems=problems[:100])  # fmt: skip
    else:
        report.add("unpacked", "ok", f"{dest.name}: every file as its wheel's RECORD lists")


def _operator_signer(pem: bytes) -> SignerEntry:
    """The operator's ``--signer-key`` as the one trusted signer (any model name).

    Raises:
        InputError: not a PEM public key.
    """
    from ota.repository._keygen import key_fingerprint

    try:
        return SignerEntry(key_fingerprint(pem), pem.decode("ascii"), ("*",))
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise InputError(f"--signer-key is not a PEM public key: {e}") from e


def _read_bounded(path: Path, limit: int) -> bytes:
    if path.stat().st_size > limit:
        raise SecurityError(f"{path} is larger than {limit} bytes")
    return path.read_bytes()


def _slot_evidence(report: Report, slot: Path,
                   operator: SignerEntry | None) -> TargetFacts | None:  # fmt: skip
    """The target facts a device recorded beside a slot when it installed it
    (``<slot>.target.json``), reported as unverified claims. The recorded signer list
    (``<slot>.signers.json``) is only reported: files in the slot are never their own trust."""
    target = slot.parent / f"{slot.name}.target.json"
    signers_path = slot.parent / f"{slot.name}.signers.json"
    recorded = ""
    if signers_path.is_file():
        try:
            ids = [s.keyid for s in parse_signers(_read_bounded(signers_path, MAX_SIGNERS_BYTES))]
            recorded = f"; {signers_path.name} lists {len(ids)} keys, not trusted"
        except (OSError, ValueError, OtaError) as e:
            recorded = f"; {signers_path.name} is unusable ({e}), not trusted"
    if operator is None:
        report.add("signers", "skipped", "no --signer-key: a slot's own signer list is not a "
                   f"trust anchor{recorded}")  # fmt: skip
    else:
        report.add("signers", "ok", f"the operator's key {operator.keyid[:16]} (--signer-key) "
                   f"is the only trusted signer{recorded}", keyids=[operator.keyid])  # fmt: skip
    if not target.is_file():
        report.add("target-facts", "skipped", "the slot has no recorded target facts")
        return None
    return _claimed_facts(report, slot.parent, target.name)


def _claimed_facts(report: Report, folder: Path, name: str = "target.json") -> TargetFacts | None:
    try:
        doc = json.loads(_read_bounded(folder / name, MAX_SIGNERS_BYTES))
        return TargetFacts.from_custom(doc["info"]["custom"])
    except (OSError, ValueError, KeyError, TypeError, OtaError) as e:
        report.add("target-facts", "failed", f"target.json is unusable: {e}")
        return None


def _replay(report: Report, folder: Path, root: bytes, manifest: Manifest,
            raw: bytes) -> tuple[TargetFacts | None, list[SignerEntry] | None]:  # fmt: skip
    path = manifest_target_path(manifest.name, manifest.version)
    with tempfile.TemporaryDirectory(prefix="ota-verify-") as tmp:
        got = _tuf_step(report, DirSource(folder / "tuf"), root, path, Path(tmp))
        if got is None:
            return None, None
        view, info = got
        try:
            info.verify_length_and_hashes(raw)
        except tuf_exc.LengthOrHashMismatchError as e:
            report.add("manifest", "failed", f"manifest.json is not the signed target: {e}")
            return None, None
        report.add("manifest", "ok", "manifest.json matches the TUF target (python-tuf)")
        return _facts_step(report, view, info)


def read_release_file(project: Project, name: str, version: str, path: str,
                      max_bytes: int = 16 * 1024 * 1024) -> bytes:  # fmt: skip
    """One file of a published release from the publisher's storage (``ota sbom``, ``ota
    vulns``): the manifest is checked against its target, each chunk against the manifest.

    Raises:
        UnknownRelease: not published. SecurityError: a mismatch, or larger than max_bytes.
    """
    from ota.repository._index import load_manifest
    from ota.repository._txn import Transaction

    validate_name(name)
    validate_version(version)
    txn = Transaction.begin(project.storage, project.signers, project.expiry())
    entry = load_manifest(project.storage, txn, name, version).file(path)
    if entry.size > max_bytes:
        raise SecurityError(f"{path} of {name} {version} is larger than {max_bytes} bytes")
    return _stream_file(StorageSource(project.storage), entry, None, True)
