"""``ota publish``: an ONNX model (or a runtime folder) in, a signed release out.

Order (``docs/adr/0003-publish-transaction.md``): static checks; chunk and upload the payload
(dedup by hash, the previous release's chunks skipped outright); smoke files, SBOM, provenance;
then the release facts, the bundle signature and the manifest; last the metadata transaction
(bins, index, snapshot, timestamp). Nothing is visible to devices until the timestamp commit, and
a publish that dies before it leaves only unreferenced blobs.

Overlap (issue 13): the model file's chunks stream out while the static checks run (a failed
check stops them and fails the publish; the blobs already written are unreferenced, as above),
and the golden run, the model card and the imports of the signing and SBOM steps run while the
payload is chunked. Every check still gates the commit; none is skipped or reordered after it.
"""

from __future__ import annotations

import contextlib
import importlib
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from securesystemslib.signer import CryptoSigner, Signer, SSlibKey
from tuf.api.metadata import TargetFile

from ota.bundle import (
    DEFAULT_LIMITS,
    PROVENANCE_FILE,
    RELEASE_FILE,
    RINGS,
    SBOM_FILE,
    SIGNATURE_FILE,
    Budget,
    Compat,
    FileEntry,
    FormatError,
    Kind,
    Manifest,
    ModelIndex,
    Release,
    SmokeSpec,
    TargetFacts,
    index_target_path,
    manifest_target_path,
    validate_bundle_path,
    validate_name,
    validate_version,
)
from ota.errors import ConfigError, InputError, SecurityError
from ota.repository import _auditlog, _early, _policy  # issue 4: policy and audit log
from ota.repository._chunker import MAX_CHUNK, Progress, Uploader, UploadStats, chunk_file
from ota.repository._chunkjob import ChunkJob, take
from ota.repository._deltas import DeltaSettings, DeltaStats  # issue 13: binary deltas
from ota.repository._fileblob import blob_copy_path, copy_folder, new_copy_path, store_file_blob
from ota.repository._index import (
    CounterTaken,
    add_release,
    load_manifest,
    read_facts,
    read_index,
)
from ota.repository._preflight import require_keys
from ota.repository._project import Project, put_target_file
from ota.repository._txn import Transaction, run

if TYPE_CHECKING:
    from ota.repository._storage import Storage
    from ota.sbom import ModelCardFacts

DEFAULT_MAX_MODEL_BYTES = 8 * 1024**3
MODEL_FILE = "model/model.onnx"


class DuplicateVersion(InputError):
    """The version is already published for this model."""


class LowerVersion(InputError):
    """The version does not sort above the newest release of its model (issue 12)."""


def check_version_order(index: ModelIndex | None, name: str, version: str) -> str | None:
    """Raise unless ``version`` sorts above the newest release (highest counter) of ``name``.

    Returns the newest release's version (None for a first release). A rollback release
    (``<v>+rollback.<n>``) sorts as ``<v>``: after rolling back, a fix above ``<v>`` is fine.

    Raises:
        LowerVersion: SemVer precedence (build metadata ignored) not above the newest's.
    """
    from ota.client._policy import semver_key

    if index is None or not index.releases:
        return None
    newest = max(index.releases, key=lambda r: r.counter)
    if semver_key(version) <= semver_key(newest.version):
        raise LowerVersion(
            f"{name} {version} does not sort above the newest release {newest.version} "
            f"(counter {newest.counter}): devices would install it as an update",
            remedy="publish a higher version; to return to older files use `ota rollback`; "
            "to publish it anyway pass --allow-lower-version (recorded in the audit log)",
        )
    return newest.version


def check_floor(index: ModelIndex | None, floor: int) -> None:
    """A release may not set a floor above its own counter (it would refuse itself).

    Raises:
        InputError: ``floor`` above the counter this release will get at the earliest.
    """
    nxt = max([r.counter for r in index.releases] + [0]) + 1 if index else 1
    if floor > nxt:
        raise InputError(
            f"--security-floor {floor} is above this release's counter ({nxt}): devices "
            "would refuse the release itself",
            remedy=f"a floor is a release counter (see `ota releases`); at most {nxt} here",
        )


def check_index_floor(index: ModelIndex | None) -> None:
    """The index's floor is carried into the facts the release key signs; the index is signed
    by the online key alone. A genuine floor is never above a counter the index lists (each
    was set by a release at or above it, :func:`check_floor`), so a higher one is forged.

    Raises:
        SecurityError: the floor is above every counter of the index (or there is none).
    """
    if index is None or not index.security_floor:
        return
    top = max([r.counter for r in index.releases] + [0])
    if index.security_floor > top:
        raise SecurityError(
            f"the index of {index.name} says security floor {index.security_floor}, above every "
            f"release counter it lists (highest {top}): a forged index; nothing was signed",
            remedy="treat the online keys as compromised (docs/runbooks/incident.md), "
            "rotate them and re-sign the index with the floor the audit log records",
        )


@dataclass
class PublishRequest:
    """What ``ota publish`` was asked to do."""

    source: Path
    name: str
    version: str
    kind: Kind = "model"
    ring: str = "canary"
    percent: float = 100.0
    compat: Compat = field(default_factory=Compat)
    inputs_npz: Path | Sequence[Path] | None = None  # one reference set per file
    rtol: float = 1e-3
    atol: float = 1e-4
    runs: int = 5
    budgets: Mapping[str, Budget] = field(default_factory=dict)
    golden_check: str = "values"  # or "shapes": outputs that vary (ota.bundle.SMOKE_CHECKS)
    allow_degenerate_golden: bool = False  # recorded as an override when it applies
    publisher_tier: str = "default"  # this machine's tier: its budget is checked here
    allow_over_budget: bool = False  # recorded as an override when it applies
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES
    security_floor: int = 0
    datasets: Sequence[str] = ()
    licenses: Sequence[str] = ()
    training_data: Sequence[str] = ()
    lineage: Sequence[str] = ()
    builder_id: str = "https://edge-ota.dev/builders/ota-publish@v1"
    runtime_version: str | None = None
    policy: _policy.PolicyContext | None = None  # issue 4; None: the CLI's, else ota.toml
    allow_lower_version: bool = False  # issue 12: recorded in the audit log when it is used
    reference_data: Path | None = None  # issue 9: npz of outputs; default: the golden outputs
    deltas: DeltaSettings = field(default_factory=DeltaSettings)  # issue 13 (ADR 0012)


@dataclass
class PublishResult:
    name: str
    version: str
    counter: int
    target: str
    manifest_sha256: str
    files: int
    total_bytes: int
    upload: UploadStats
    ring: str
    percent: float
    rollback_of: str | None = None
    deltas: DeltaStats | None = None  # issue 13: what computing binary deltas cost

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "counter": self.counter,
            "target": self.target,
            "manifest_sha256": self.manifest_sha256,
            "files": self.files,
            "total_bytes": self.total_bytes,
            "upload": self.upload.to_dict(),
            "ring": self.ring,
            "percent": self.percent,
            "rollback_of": self.rollback_of,
        }


def _validate_request(req: PublishRequest) -> None:
    validate_name(req.name)
    validate_version(req.version)
    if req.ring not in RINGS:
        raise InputError(f"unknown ring {req.ring!r}", remedy=f"use one of {', '.join(RINGS)}")
    if not 0.0 <= req.percent <= 100.0:
        raise InputError("--percent must be between 0 and 100")
    if not req.source.exists():
        raise InputError(f"{req.source} does not exist")


def publish(
    project: Project, req: PublishRequest, *, progress: Progress | None = None
) -> PublishResult:
    """Publish one release. See the module docstring for the order of steps.

    Raises:
        InputError: bad name/version/ring, a model that fails static checks, the same version
            twice (:class:`DuplicateVersion`).
        ConfigError: keys or storage misconfigured.
        TransientError: storage unreachable. Nothing is published in any failure case.
    """
    _validate_request(req)
    require_keys(  # issue 12 (17): every key, before any byte is uploaded
        project, "publish", release_key=True, publishes=req.name,
        targets=[manifest_target_path(req.name, req.version), index_target_path(req.name)],
    )  # fmt: skip
    store = project.storage
    peek = Transaction.begin(store, project.signers, project.expiry())
    if read_facts(peek, req.name, req.version) is not None:
        raise DuplicateVersion(f"{req.name} {req.version} is already published")
    index = read_index(peek, req.name)
    check_index_floor(index)
    check_floor(index, req.security_floor)
    lower_than = _version_order(index, req)
    policy = _policy.resolve(project, req.policy)  # issue 4: checked before any upload
    _policy.check_request(policy, project, req)
    known = _previous_chunks(project, peek, req.name)

    staging_root = project.root_dir / ".staging"
    staging_root.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=staging_root) as tmp, Uploader(store, known=known) as up:
        staging = Path(tmp)
        model_path, entries, (smoke, overrides), card = _chunk_payload(
            req,
            staging,
            up,
            progress,
            policy.actor,
            store,
            project.config.chunk_blobs,
            file_blobs=project.config.file_blobs,
        )
        deltas, delta_stats = _binary_deltas(project, peek, index, req, entries, up)
        if smoke is not None:
            for rel in smoke.files():
                entries[rel] = chunk_file(staging / rel, rel, up)
        reference = _reference(req, smoke, staging)
        waived = [*policy.waived(), *overrides]  # overrides are recorded like policy waivers

        sbom = _sbom(req, model_path, entries, card)
        _policy.check_sbom(policy, req.name, req.version, sbom)  # issue 4: nothing published yet
        (staging / SBOM_FILE).write_bytes(sbom)
        entries[SBOM_FILE] = chunk_file(staging / SBOM_FILE, SBOM_FILE, up)

        prov = _provenance(project, req, entries, waived)
        (staging / PROVENANCE_FILE).write_bytes(prov)
        entries[PROVENANCE_FILE] = chunk_file(staging / PROVENANCE_FILE, PROVENANCE_FILE, up)

        def release_for(counter: int) -> Release:
            return Release(
                name=req.name,
                version=req.version,
                counter=counter,
                kind=req.kind,
                compat=req.compat,
                security_floor=req.security_floor,
                smoke=smoke,
                model_path="model/model.onnx" if req.kind == "model" else "runtime",
                created=_now(),
                telemetry=reference,
            )

        extra = {"allow_lower_version": lower_than} if lower_than else {}
        result = _finish(project, staging, entries, up, release_for, req.ring, req.percent,
                         actor=policy.actor, waived=waived, allow_lower=req.allow_lower_version,
                         audit_extra=extra, deltas=deltas)  # fmt: skip
        return replace(result, deltas=delta_stats)


def _binary_deltas(
    project: Project,
    txn: Transaction,
    index: ModelIndex | None,
    req: PublishRequest,
    entries: Mapping[str, FileEntry],
    up: Uploader,
) -> tuple[list[Any], DeltaStats]:
    """Issue 13 (ADR 0012): deltas from the model's recent releases to its payload files
    (the model and its external data, beside it: ``_model_payload``)."""
    from ota.repository import _deltas

    stats = DeltaStats()
    if req.kind != "model":
        return [], stats
    payload = {p: req.source if p == MODEL_FILE else req.source.parent / p.removeprefix("model/")
               for p in entries if p.startswith("model/")}  # fmt: skip
    found = _deltas.compute(
        project.storage, lambda v: load_manifest(project.storage, txn, req.name, v), index,
        payload, entries, up, req.deltas, stats,
    )  # fmt: skip
    return found, stats


def _chunk_payload(
    req: PublishRequest,
    staging: Path,
    up: Uploader,
    progress: Progress | None,
    actor: str,
    store: Storage,
    blobs: bool = False,
    *,
    file_blobs: bool = True,
) -> tuple[
    Path | None,
    dict[str, FileEntry],
    tuple[SmokeSpec | None, list[dict[str, str]]],
    ModelCardFacts | None,
]:
    """Check the source, chunk and upload its payload, and compute the smoke files and model
    card beside it. Returns (model path or None, payload entries, (smoke spec, overrides),
    model card). ``blobs``: store multi-chunk files' chunk blobs too (ADR 0017, ``chunk_blobs``).
    ``file_blobs=False`` (ADR 0017, ``file_blobs``): no whole-file blobs, chunk blobs only (the
    pre-ADR 0014 layout, whatever ``blobs`` says): a re-publish stores only the chunks the
    store lacks.

    Raises:
        InputError: the checks, the golden run or the budget check fail (see :func:`publish`).
    """
    entries: dict[str, FileEntry] = {}
    copies: dict[str, Path | None] = {}  # ADR 0014 file blobs, written by the chunking pass
    blobs = blobs or not file_blobs  # some form of every byte is stored

    def copy_path(src: Path) -> Path | None:
        return blob_copy_path(store, src, staging) if file_blobs else None

    try:
        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="publish") as side:
            # Overlap (issue 13): hashing and onnxruntime release the GIL, imports do not. The
            # model file is chunked while the checks import onnx and parse the graph; the
            # golden run, the model card and the imports of the later steps (the signers, the
            # SBOM validator) run while the payload is chunked. Nothing is visible before the
            # commit: a check that fails leaves only unreferenced blobs, as any failure does.
            stop = threading.Event()
            # the file blob is the only stored form (the defaults): chunk in a child process
            child = copy_folder(store, staging) if file_blobs and not blobs else None
            early = _chunk_model_early(
                side, req, up, progress, stop, copy_path, copies, blobs, child_folder=child
            )
            try:
                if req.kind == "model":
                    model_path, payload = _model_payload(req)
                else:
                    model_path, payload = None, _runtime_payload(req.source)
            except BaseException:
                stop.set()  # the early chunking stops at its next chunk
                raise
            smoke_job = side.submit(_smoke_files, req, model_path, staging, actor)
            card_job = side.submit(_model_card, model_path)
            side.submit(_warm_imports, model_path is not None)
            if early is not None:
                entries[MODEL_FILE] = early.result()
            for bundle_path, src in payload.items():
                if bundle_path not in entries:
                    copies[bundle_path] = copy_path(src)
                    entries[bundle_path] = chunk_file(
                        src, bundle_path, up, progress, copies[bundle_path], chunk_blobs=blobs
                    )
                # ADR 0014/0017: devices fetch the chunks they lack as ranges of this blob,
                # the only stored form of a multi-chunk file unless chunk_blobs is set
                entry = entries[bundle_path]
                if not file_blobs:
                    continue
                if store_file_blob(store, src, entry, staging, copies.pop(bundle_path, None)):
                    up.stats.file_blobs += 1
                    up.stats.file_blob_bytes += entry.size
                    up.stats.bytes_uploaded += entry.size
            smoke, overrides = smoke_job.result()
            card = card_job.result()
    finally:  # a copy not stored (a failed check, say) is removed, never left in the repository
        _early.discard(req.source)  # an early session not used (a failure) is freed
        for copy in copies.values():
            if copy is not None:
                copy.unlink(missing_ok=True)
    return model_path, entries, (smoke, overrides), card


def _version_order(index: ModelIndex | None, req: PublishRequest) -> str | None:
    """None if ``req.version`` sorts above the newest release; with
    ``--allow-lower-version``, the newest release's version it does not sort above (for the
    audit log).

    Raises:
        LowerVersion: lower or equal, and not allowed.
    """
    try:
        check_version_order(index, req.name, req.version)
    except LowerVersion:
        if not req.allow_lower_version:
            raise
        return max(index.releases, key=lambda r: r.counter).version if index else None
    return None


def _check_device_limits(manifest: Manifest) -> bytes:
    """Refuse to publish what devices would refuse to parse (too many files or chunks, a
    manifest over its size or structure bounds): devices treat that as an attack. Returns
    the manifest's bytes, checked, for upload.

    Raises:
        InputError: the bundle exceeds the device's limits (``ota.bundle.Limits``).
    """
    data = manifest.to_bytes()
    try:
        type(manifest).from_bytes(data, DEFAULT_LIMITS)
    except FormatError as e:
        raise InputError(
            f"devices would refuse this bundle: {e}",
            remedy="split it, or package fewer, larger files",
        ) from e
    return data


def _finish(
    project: Project,
    staging: Path,
    entries: dict[str, FileEntry],
    up: Uploader,
    release_for: Callable[[int], Release],
    ring: str,
    percent: float,
    *,
    actor: str | None = None,  # issue 4: who is recorded in the audit log
    waived: Sequence[Mapping[str, str]] = (),  # issue 4: policy waivers, recorded
    allow_lower: bool = False,  # issue 12: --allow-lower-version
    audit_extra: Mapping[str, Any] | None = None,  # issue 12: overrides, recorded
    deltas: Sequence[Any] = (),  # issue 13: DeltaEntry list, signed into the target
) -> PublishResult:
    """Sign, upload the manifest, and commit; re-sign with the next counter if one was taken.

    Shared by publish and rollback (which reuses every payload entry of an older release).
    The commit also anchors the release's audit log entry (``_auditlog.run_logged``).

    Invariant (DESIGN decision 4): the floor signed into the release facts (and so by the
    release key, through ``release.json``) is never below the model's floor as committed:
    once published, a floor is carried in every later release, whatever the request says.
    The version order (not a rollback) is checked again inside the commit.
    """
    from ota.signing import sign_digests

    store = project.storage
    payload = {p: e for p, e in entries.items() if p not in (RELEASE_FILE, SIGNATURE_FILE)}
    release = release_for(1)
    for _ in range(32):
        peek = Transaction.begin(store, project.signers, project.expiry())
        index = read_index(peek, release.name)
        check_index_floor(index)  # never sign the online key's word for a floor above all
        counter = max([r.counter for r in index.releases] + [0]) + 1 if index else 1
        release = release_for(counter)
        carried = max([index.security_floor if index else 0, release.security_floor])
        release = replace(release, security_floor=carried)
        (staging / RELEASE_FILE).write_bytes(release.to_bytes())
        files = dict(payload)
        files[RELEASE_FILE] = chunk_file(staging / RELEASE_FILE, RELEASE_FILE, up)
        sign_digests(
            {p: e.sha256 for p, e in files.items()},
            project.abspath(project.config.release_key),
            staging / SIGNATURE_FILE,
            model_name=f"{release.name}-{release.version}",
        )
        files[SIGNATURE_FILE] = chunk_file(staging / SIGNATURE_FILE, SIGNATURE_FILE, up)
        up.flush()  # every chunk durable before any metadata names it
        manifest = Manifest(release.name, release.version, tuple(files[p] for p in sorted(files)))
        manifest_bytes = _check_device_limits(manifest)
        target_path = manifest_target_path(release.name, release.version)
        facts = TargetFacts(
            release=release,
            digests={
                p: files[p].sha256
                for p in (RELEASE_FILE, SBOM_FILE, PROVENANCE_FILE, SIGNATURE_FILE)
                if p in files
            },
        )
        info = put_target_file(store, target_path, manifest_bytes)
        info.unrecognized_fields["custom"] = facts.to_custom()
        if deltas:  # issue 13: beside the facts, which devices without deltas read alone
            from ota.client._patch import DELTAS_KEY, deltas_to_custom

            info.unrecognized_fields["custom"][DELTAS_KEY] = deltas_to_custom(deltas)

        def commit(txn: Transaction, i: TargetFile = info, r: Release = release) -> None:
            _commit_release(project, txn, i, r, ring, percent, allow_lower=allow_lower)

        try:
            _auditlog.run_logged(  # issue 4: the commit anchors its audit log entry
                project, "rollback" if release.rollback_of else "publish", commit,
                subject=f"{release.name} {release.version}", actor=actor, waived=waived,
                runner=run,
                details={**_auditlog.release_details(release.to_dict(), info.hashes["sha256"],
                                                     ring, percent),
                         "security_floor": release.security_floor, **(audit_extra or {})},
            )  # fmt: skip
        except CounterTaken:
            continue  # a concurrent publish of this model took the counter: sign the next one
        return PublishResult(
            name=release.name,
            version=release.version,
            counter=release.counter,
            target=target_path,
            manifest_sha256=info.hashes["sha256"],
            files=len(files),
            total_bytes=manifest.total_size,
            upload=up.stats,
            ring=ring,
            percent=percent,
            rollback_of=release.rollback_of,
        )
    raise InputError("could not claim a release counter: too many concurrent publishers")


def _commit_release(
    project: Project,
    txn: Transaction,
    info: TargetFile,
    release: Release,
    ring: str,
    pct: float,
    *,
    allow_lower: bool = False,
) -> None:
    if read_facts(txn, release.name, release.version) is not None:
        raise DuplicateVersion(f"{release.name} {release.version} is already published")
    index = read_index(txn, release.name)
    if index is not None and release.security_floor < index.security_floor:
        raise CounterTaken(f"the floor of {release.name} rose to {index.security_floor}")
    if release.rollback_of is None and not allow_lower:
        check_version_order(index, release.name, release.version)
    add_release(
        project,
        txn,
        info,
        release,
        ring=ring,
        percent=pct,
        max_live=project.config.max_live_releases,
    )


def _previous_chunks(project: Project, txn: Transaction, name: str) -> set[str]:
    """Blob digests of the model's newest release known to be stored, never re-checked: its
    files' digests (a one-chunk file's chunk blob, a multi-chunk file's file blob). Not the
    chunks of its multi-chunk files: since ADR 0017 a release may have stored those only in
    its file blob, so a chunk of it is written again (create-if-absent) when needed."""
    index = read_index(txn, name)
    if index is None or not index.releases:
        return set()
    newest = max(index.releases, key=lambda r: r.counter)
    with contextlib.suppress(Exception):  # only an optimisation: fall back to asking storage
        return {f.sha256 for f in load_manifest(project.storage, txn, name, newest.version).files}
    return set()


def _model_payload(req: PublishRequest) -> tuple[Path, dict[str, Path]]:
    from ota.repository._model_checks import check_model

    if not req.source.is_file():
        raise InputError(f"{req.source} is not a file", remedy="pass the .onnx model file")
    facts = _early.checked(req.source, req.max_model_bytes)  # the CLI's head start (issue 13)
    if facts is None:
        facts = check_model(req.source, max_bytes=req.max_model_bytes)
    payload = {MODEL_FILE: req.source}
    for rel in facts.external_files:
        bundle_path = f"model/{rel}"
        try:
            validate_bundle_path(bundle_path)
        except Exception as e:
            raise InputError(f"external data file name not allowed in a bundle: {rel}") from e
        payload[bundle_path] = req.source.parent / rel
    return req.source, payload


class _Stopped(Exception):
    """The early chunking was told to stop: the checks failed."""


def _chunk_model_early(
    side: ThreadPoolExecutor,
    req: PublishRequest,
    up: Uploader,
    progress: Progress | None,
    stop: threading.Event,
    copy_path: Callable[[Path], Path | None],
    copies: dict[str, Path | None],
    chunk_blobs: bool = True,
    *,
    child_folder: Path | None = None,
) -> Future[FileEntry] | None:
    """Start chunking the model file on ``side`` while the caller checks it, or None (a runtime,
    or a source that is not a regular file within ``max_model_bytes``: the checks then say
    why). Only this job hands chunks to ``up`` until the caller has its result.

    The job stops at its next chunk once ``stop`` is set (the checks failed); its error is then
    never looked at. A failure of its own surfaces from ``result()`` after the checks passed.
    The file-blob copy it writes (``copies[MODEL_FILE]``) is the caller's to store or remove.

    ``child_folder`` (the file blob is the model's only stored form; the folder its temp copy
    goes to): a model file over ``MAX_CHUNK`` is chunked by a child process
    (:mod:`ota.repository._chunkjob`, issue 13), the one the CLI started if it did.
    """
    if req.kind != "model":
        return None
    try:
        if not req.source.is_file() or req.source.stat().st_size > req.max_model_bytes:
            return None
    except OSError:
        return None

    def tick(n: int) -> None:
        if stop.is_set():
            raise _Stopped("checks failed")
        if progress is not None:
            progress(n)

    if child_folder is not None and req.source.stat().st_size > MAX_CHUNK:
        job = _chunkjob(req.source, child_folder, copies)
        if job is not None:
            return side.submit(_chunk_in_child, job, up, tick)
    copies[MODEL_FILE] = copy = copy_path(req.source)
    return side.submit(chunk_file, req.source, MODEL_FILE, up, tick, copy, chunk_blobs=chunk_blobs)


def _chunkjob(source: Path, folder: Path, copies: dict[str, Path | None]) -> ChunkJob | None:
    """The child chunking ``source`` into a temp copy in ``folder``: the CLI's if it started
    it, else a new one. Its copy is recorded in ``copies`` (the caller stores or removes it).
    None when no child can be started (an interpreter embedded in another program, whose
    ``sys.executable`` is not Python, or no process left): the caller chunks in-process, as
    before ADR 0018, and no temp copy is left.

    Raises:
        OSError: the temp copy cannot be made (the in-process path would fail the same way).
    """
    job = take(source, folder)
    if job is None:
        copy = new_copy_path(folder)
        try:
            job = ChunkJob.start(source, copy)
        except OSError:
            copy.unlink(missing_ok=True)
            return None
    copies[MODEL_FILE] = job.copy
    return job


def _chunk_in_child(job: ChunkJob, up: Uploader, tick: Progress) -> FileEntry:
    """The model's entry from its chunking child, counted in ``up``'s totals (no chunk blob:
    the file blob holds every chunk, ADR 0017)."""
    entry = job.result(tick)
    for c in entry.chunks:
        up.count(c.size)
    return replace(entry, path=MODEL_FILE)


# What ota.sbom.build_mlbom imports when it is called (after the chunking, on the main thread:
# 0.2-0.5 s of a fresh publish's wall time before they were warmed here).
_SBOM_MODULES = (
    "cyclonedx.model.bom",
    "cyclonedx.model.component",
    "cyclonedx.model.contact",
    "cyclonedx.output.json",
    "packageurl",
)


def _warm_imports(model: bool) -> None:
    """Import what the steps after the chunking need (the bundle and provenance signers, the
    CycloneDX validator for the SBOM) while the payload is chunked:
    a fresh ``ota publish`` otherwise pays them one after the other at the end (issue 13).
    Only a warm-up: a failure here is ignored and raised again, with its context, by the step
    that needs the module."""
    with contextlib.suppress(Exception):
        importlib.import_module("ota.signing._light_sign")  # not model_signing: issue 13
        if model:
            from ota.sbom._schema import _strict_validator

            _strict_validator()
            importlib.import_module("ota.repository._reference")
            for name in _SBOM_MODULES:
                importlib.import_module(name)


def _runtime_payload(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder", remedy="pass the runtime's folder")
    payload: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            raise InputError(f"symlinks are not allowed in a runtime bundle: {path}")
        if path.is_file():
            bundle_path = "runtime/" + path.relative_to(folder).as_posix()
            try:
                validate_bundle_path(bundle_path)
            except Exception as e:
                raise InputError(f"file name not allowed in a bundle: {path}") from e
            payload[bundle_path] = path
    if not payload:
        raise InputError(f"{folder} holds no files")
    return payload


class OverBudget(InputError):
    """The reference run on the publisher's own tier already exceeds that tier's budget:
    every device of the tier would fail smoke and revert."""


def _smoke_files(
    req: PublishRequest, model_path: Path | None, staging: Path, actor: str = ""
) -> tuple[SmokeSpec | None, list[dict[str, str]]]:
    """The smoke files and spec, and the overrides that let them through (for the record).

    Raises:
        GoldenError: see :func:`~ota.repository._golden.make_smoke_files`.
        OverBudget: the publisher's tier budget is exceeded and ``allow_over_budget`` is off.
        SmokeFailed: the model fails in the sandbox while its budget is measured.
    """
    if model_path is None:
        return None, []
    from ota.repository._golden import make_smoke_files

    degenerate: list[str] = []
    spec = make_smoke_files(
        model_path,
        staging,
        inputs_npz=req.inputs_npz,
        runs=req.runs,
        rtol=req.rtol,
        atol=req.atol,
        budgets=req.budgets,
        check=req.golden_check,
        allow_degenerate=req.allow_degenerate_golden,
        accepted=degenerate,
        durable=False,  # staging: the Uploader's barrier makes the stored copies durable
    )
    overrides: list[dict[str, str]] = []
    if degenerate:
        overrides.append(_override("degenerate-golden", "--allow-degenerate-golden", actor,
                                   "; ".join(degenerate)))  # fmt: skip
    over = _budget_violations(req, model_path, staging, spec)
    if over:
        if not req.allow_over_budget:
            raise OverBudget(
                f"the reference run on this machine (tier {req.publisher_tier!r}) already "
                f"exceeds the budget: {'; '.join(over)}; every device of the tier would fail "
                "smoke",
                remedy="raise the --budget, make the model faster or smaller, or publish "
                "anyway with --allow-over-budget (recorded in the audit log and provenance); "
                "--publisher-tier names this machine's tier",
            )
        overrides.append(_override("smoke-budget", "--allow-over-budget", actor, "; ".join(over)))
    return spec, overrides


def _reference(req: PublishRequest, smoke: SmokeSpec | None, staging: Path) -> Any:
    """The release's reference output distribution (issue 9), or None (a runtime, or no
    output that can be summarised). See :mod:`ota.repository._reference`."""
    if req.kind != "model" or (smoke is None and req.reference_data is None):
        return None
    from ota.repository._reference import reference_for

    golden = [staging / g for _, g in smoke.sets()] if smoke is not None else []
    return reference_for(golden, req.reference_data)


def _override(rule: str, flag: str, actor: str, violation: str) -> dict[str, str]:
    return {"rule": rule, "reason": f"{flag} given", "actor": actor, "violation": violation[:1024]}


def _budget_violations(
    req: PublishRequest, model_path: Path, staging: Path, spec: SmokeSpec
) -> list[str]:
    """Measure the model in the device's sandbox on every reference set when the publisher's
    tier has a budget, and name each figure over it (worst over the sets).

    Raises:
        SmokeFailed: the model fails in the sandbox.
    """
    budget = spec.budget_for(req.publisher_tier)
    if budget is None or (budget.latency_ms_p95 is None and budget.peak_mem_mb is None):
        return []
    from ota.repository._golden import measure_reference

    latency, peak = 0.0, 0.0
    for inputs, _ in spec.sets():
        lat, mem = measure_reference(model_path, staging / inputs, runs=max(spec.runs, 2))
        latency, peak = max(latency, lat), max(peak, mem)
    over = []
    if budget.latency_ms_p95 is not None and latency > budget.latency_ms_p95:
        over.append(f"latency p95 {latency:.3f} ms > {budget.latency_ms_p95:g} ms")
    if budget.peak_mem_mb is not None and peak > budget.peak_mem_mb:
        over.append(f"peak memory {peak:.1f} MB > {budget.peak_mem_mb:g} MB")
    return over


def _model_card(model_path: Path | None) -> ModelCardFacts | None:
    if model_path is None:
        return None
    from ota.sbom import model_card

    return model_card(model_path)


def _sbom(
    req: PublishRequest,
    model_path: Path | None,
    entries: Mapping[str, FileEntry],
    card: ModelCardFacts | None = None,
) -> bytes:
    files = {p: (e.sha256, e.size) for p, e in entries.items()}
    runtime_range = req.compat.runtime or ">=1.16"
    if model_path is None:
        from ota.sbom import build_runtime_bom

        return build_runtime_bom(name=req.name, version=req.version, files=files, root=req.source)
    from ota.sbom import build_mlbom

    return build_mlbom(
        name=req.name,
        version=req.version,
        model_path=model_path,
        files=files,
        runtime_range=runtime_range,
        runtime_version=req.runtime_version or _validated_runtime(runtime_range),
        datasets=list(req.datasets),
        licenses=list(req.licenses),
        facts=card,
    )


def _validated_runtime(runtime_range: str) -> str:
    """The onnxruntime version the golden run used (this process's), recorded in the SBOM as
    the exact version the release was validated with (issue 12 item 3: OSV matches exact
    versions). Refuses when it is outside the range the release declares.

    Raises:
        InputError: the golden run's onnxruntime is outside ``runtime_range``.
    """
    import onnxruntime
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    version = str(onnxruntime.__version__)
    try:
        ok = SpecifierSet(runtime_range).contains(version, prereleases=True)
    except InvalidSpecifier:
        return version  # the SBOM builder names the bad range
    if not ok:
        raise InputError(
            f"the golden outputs were computed with onnxruntime {version}, outside the "
            f"declared runtime range {runtime_range!r}",
            remedy="publish with an onnxruntime inside --runtime, or pass --runtime-version",
        )
    return version


def _provenance(
    project: Project,
    req: PublishRequest,
    entries: Mapping[str, FileEntry],
    waived: Sequence[Mapping[str, str]] = (),  # issue 4: policy waivers, recorded
) -> bytes:
    from ota.signing import make_provenance, sign_provenance

    source_digest = entries["model/model.onnx"].sha256 if req.kind == "model" else ""
    statement = make_provenance(
        subject_digests={p: e.sha256 for p, e in entries.items()},
        builder_id=req.builder_id,
        source_model_digest=source_digest,
        training_data=list(req.training_data),
        lineage=list(req.lineage),
        build_params={
            "name": req.name,
            "version": req.version,
            "kind": req.kind,
            "compat": req.compat.to_dict(),
            "ring": req.ring,
            **({"policy_waivers": [dict(w) for w in waived]} if waived else {}),  # issue 4
        },
    )
    signer = load_release_signer(
        project.abspath(project.config.release_key), project.abspath(project.config.release_pub)
    )
    return sign_provenance(statement, signer)


def load_release_signer(private_pem: Path, public_pem: Path) -> Signer:
    """The release manager's P-256 key as a securesystemslib signer (for DSSE provenance)."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        public = SSlibKey.from_crypto(load_pem_public_key(public_pem.read_bytes()))
        return CryptoSigner.from_priv_key_uri(f"file2:{private_pem}", public)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the release signing key {private_pem}: {e}") from e


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def cleanup_staging(project: Project) -> None:
    """Remove staging folders left by killed publishers."""
    shutil.rmtree(project.root_dir / ".staging", ignore_errors=True)
