"""One model's update: choose, fetch, verify, smoke-test, switch. Called under the lock.

Order (issue 3, "What one update cycle does"): TUF index and target facts -> pure policy
choice -> manifest through TUF -> bundle facts cross-checked -> free disk -> journal ``staging``
-> only missing chunks fetched into ``staging/`` -> ``release.json`` equal to the signed
facts -> model-signing signature by a key that ``trust/signers.json`` allows for this model
-> journal ``staged``, slot installed -> smoke in a sandbox -> switch (journal ``switching`` ->
``trial``). Nothing from the network runs before the signature check passed.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ota.bundle import (
    RELEASE_FILE,
    SIGNATURE_FILE,
    Limits,
    Manifest,
    ModelIndex,
    Release,
    SmokeSpec,
    TargetFacts,
)
from ota.errors import LocalError, OtaError, SecurityError, SmokeError

from . import _patch, _slots
from ._chunks import ChunkIndex, StageStats, stage
from ._device import Device
from ._fetch import BlobFetcher, FetchConfig
from ._journal import Phase, Txn
from ._policy import check_release, floor_of, floor_to_keep, rank, stale_floor_reason
from ._tuf import TufSession

DISK_RESERVE = 16 * 1024 * 1024
SELFTEST = "(runtime self-test)"  # report key when a runtime had no committed model to run
_SELFTEST_DIR = Path(__file__).resolve().parent / "_selftest"  # scripts/make_selftest.py
_SELFTEST_SPEC = SmokeSpec(inputs="inputs.npz", golden="golden.npz", rtol=1e-4, atol=1e-5,
                           runs=3)
MAX_SIGNATURE_BYTES = 4 * 1024 * 1024  # as ota.signing bounds it


class Verifier(Protocol):
    """Verifies a staged bundle's signature with one public key; raises SecurityError.

    ``digests`` are the sha256 of every staged file but the signature, computed from the bytes
    on disk while they were written (each checked against the TUF-verified manifest)."""

    def __call__(
        self, bundle_dir: Path, public_key_pem: bytes, digests: Mapping[str, str]
    ) -> object: ...


Progress = Callable[[str, str, int, int], None]  # model, version, bytes staged, bundle size


class SmokeRunner(Protocol):
    """Smoke-tests a staged model; raises SmokeError. Returns a report (``to_dict()``)."""

    def __call__(self, model_path: Path, bundle_dir: Path, spec: SmokeSpec, *, tier: str,
                 runtime_path: Path | None = None) -> Any: ...


def default_verifier(
    bundle_dir: Path, public_key_pem: bytes, digests: Mapping[str, str]
) -> object:
    """The device's model-signature check over the staged digests: no byte is hashed again
    (the stager hashed each file as it wrote it and refused any mismatch).

    It is :func:`ota.signing.verify_digests_light`: it accepts only the keyed format our
    publisher writes, with every check of the upstream verifier (differential tests in
    ``tests/test_light_verify.py``), without importing model_signing's Sigstore stack (26 MiB
    of the updater's memory; ADR 0006). ``ota verify`` and ``ota audit`` use the upstream
    verifier."""
    from ota.signing import verify_digests_light

    sig = bundle_dir / SIGNATURE_FILE
    with sig.open("rb") as fh:
        data = fh.read(MAX_SIGNATURE_BYTES + 1)
    if len(data) > MAX_SIGNATURE_BYTES:
        raise SecurityError(f"{SIGNATURE_FILE} is larger than {MAX_SIGNATURE_BYTES} bytes")
    return verify_digests_light(data, public_key_pem, digests, signature_name=SIGNATURE_FILE)


def default_smoke(model_path: Path, bundle_dir: Path, spec: SmokeSpec, *, tier: str,
                  runtime_path: Path | None = None) -> Any:
    from ota.client._smoke import run_smoke

    return run_smoke(model_path, bundle_dir, spec, tier=tier, runtime_path=runtime_path)


@dataclass(frozen=True)
class Choice:
    facts: TargetFacts
    info: Any  # tuf TargetFile of the manifest
    skipped: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class FloorProof:
    """What :func:`choose` needs to fetch the release-key evidence for an index's floor."""

    pool: Any
    blob_base: str
    fetch_cfg: FetchConfig
    verifier: Verifier
    stats: Any = None


def choose(dev: Device, session: TufSession, name: str,
           proof: FloorProof | None = None) -> Choice | tuple[dict[str, Any], ...]:
    """The release to install, or the reasons nothing is (a tuple of skip records).

    Security skips (downgrade attempts) are recorded as security events here. The index's
    floor is in force for this cycle; it is kept for later cycles only when ``proof`` lets
    :func:`keep_index_floor` find it signed by the release key.

    Raises:
        SecurityError: the repository is inconsistent (index vs target facts, a listed
            release with no target).
    """
    index = session.index(name)
    if index is None:
        state = dev.sd.load_state()
        if name in state.models or state.floor(name):  # no command removes an index
            reason = (f"the repository no longer lists model {name!r}, which this device has "
                      "verified before: metadata that hides it")
            dev.events.append("security", name, "", reason=reason)
            return ({"version": None, "reason": reason, "security": True},)
        return ({"version": None, "reason": f"the repository has no model named {name!r}",
                 "no_such_model": True},)
    if proof is not None:  # kept even if hidden later, once the release key vouches for it
        keep_index_floor(dev, session, name, index, proof)
    skipped: list[dict[str, Any]] = []
    stale = stale_floor_reason(index, dev.sd.load_state().committed())
    if stale is not None:
        skipped.append({"version": None, "reason": stale, "security": True, "kind": "floor"})
        dev.events.append("security", name, "", reason=stale)
    mdir = dev.mdir(name)
    cur = _slots.current_slot(mdir)
    cur_rel = _slots.read_release(mdir, cur) if cur else None
    entry = index.get(cur_rel.version) if cur_rel else None
    prev = _slots.other(cur)
    if cur and cur_rel and entry and entry.yanked:
        def yanked(version: str) -> bool:
            e = index.get(version)
            return e is None or e.yanked

        floor = floor_of(name, index, dev.sd.load_state().committed())
        if dev.revert_target(name, yanked=yanked, floor=floor):
            dev.revert_txn(Txn(name, cur_rel.version, cur_rel.counter, cur, prev),
                           "release yanked")
            return ({"version": cur_rel.version, "reason": "yanked: reverted to the previous slot",
                     "yank_reverted": True},)
        # Nothing safe to go back to (below the security floor, yanked too, or none): keep
        # the model running, report it once per release (not every poll: the daemon must
        # not back off, a fixed release may come), and take a newer release if there is one.
        reason = "yanked, and no earlier release on this device is above the floor and not yanked"
        skipped.append({"version": cur_rel.version, "reason": reason, "kept_yanked": True})
        state = dev.sd.load_state()
        if not state.noticed(name, cur_rel.version, "kept_yanked"):
            dev.events.append("security", name, cur_rel.version, reason=reason)
            dev.sd.save_state(state.with_notice(name, cur_rel.version, "kept_yanked"))
    committed = dev.sd.load_state().committed()
    device = dev.cfg.facts()
    ranking = rank(index, device, committed, cur_rel.version if cur_rel else None)
    skipped += [{"version": s.version, "reason": s.reason, "security": s.security,
                 "kind": s.kind, "counter": s.counter} for s in ranking.skipped]
    for s in ranking.skipped:
        if s.security:
            dev.events.append("security", name, s.version, reason=s.reason)
    for cand in ranking.candidates:
        found = session.release(name, cand.version)
        if found is None:
            raise SecurityError(f"index lists {name} {cand.version} but it has no target")
        info, facts = found
        why = check_release(facts, cand, index, device, committed,
                            cur_rel.version if cur_rel else None)
        if why is None:
            return Choice(facts, info, tuple(skipped))
        skipped.append({"version": cand.version, "reason": why, "security": False,
                        "kind": "incompatible", "counter": cand.counter})
        dev.events.append("refused", name, cand.version, reason=why)
    return tuple(skipped)


def keep_index_floor(dev: Device, session: TufSession, name: str, index: ModelIndex,
                     proof: FloorProof) -> None:
    """Keep the floor of a TUF-verified index only if the release key signed it.

    The index is signed by the online bins key alone, and a kept floor never goes down: kept
    on the index's word, a floor made up by an attacker holding the online keys (with a
    made-up release to bound it) would refuse every genuine release for ever. A genuine
    floor is carried in the facts of every release published since (DESIGN decision 4), so
    the newest release listed must carry it: its ``release.json`` and signature are fetched
    (two small files, only while the floor is above the kept one) and checked as an install
    checks them. Without that proof the floor stays in force for this cycle only.
    """
    floor = floor_to_keep(index)
    if floor <= dev.sd.load_state().floor(name):
        return
    top = max(index.releases, key=lambda r: r.counter)
    found = session.release(name, top.version)
    if found is None:
        return
    info, facts = found
    rel = facts.release
    if (rel.name, rel.version, rel.counter) != (name, top.version, top.counter) or (
        rel.security_floor < floor
    ):  # another model's facts under this path would vouch for a floor not ours
        return
    where = dev.mdir(name) / "floor-proof"
    try:
        manifest = session.manifest(info)
        check_bundle_facts(manifest, facts)
        wanted = Manifest(manifest.name, manifest.version,
                          (manifest.file(RELEASE_FILE), manifest.file(SIGNATURE_FILE)))
        _slots.remove_tree(where)
        where.mkdir(parents=True)
        fetcher = BlobFetcher(proof.pool, proof.blob_base, proof.fetch_cfg, proof.stats)
        stage(wanted, where, ChunkIndex(), fetcher, proof.fetch_cfg)
        if (where / RELEASE_FILE).read_bytes() != rel.to_bytes():
            return
        verify_signature(dev, session, name, where, manifest, proof.verifier)
    except (OtaError, OSError):
        return  # unproven: in force for this cycle (floor_of), not kept
    finally:
        _slots.remove_tree(where)
    _keep_floor(dev, name, floor)


def _keep_floor(dev: Device, name: str, floor: int) -> None:
    """Persist ``floor`` for ``name`` if it is higher than every floor kept so far (one
    atomic write; nothing is written when it does not rise)."""
    state = dev.sd.load_state()
    raised = state.with_floor(name, floor)
    if raised is not state:
        dev.sd.save_state(raised)


def check_bundle_facts(manifest: Manifest, facts: TargetFacts) -> None:
    """The manifest must be the one the facts describe, with every required file.

    Raises:
        SecurityError: another name/version, a digest that differs, a missing file.
    """
    rel = facts.release
    if (manifest.name, manifest.version) != (rel.name, rel.version):
        raise SecurityError(f"manifest is for {manifest.name} {manifest.version}, "
                            f"target says {rel.name} {rel.version}")
    required = {RELEASE_FILE, SIGNATURE_FILE, *facts.digests}
    if rel.kind == "model":
        required.add(rel.model_path)
    if rel.smoke is not None:
        required |= set(rel.smoke.files())
    for path in sorted(required):
        entry = manifest.file(path)  # FormatError (a SecurityError) if missing
        want = facts.digests.get(path)
        if want is not None and entry.sha256 != want:
            raise SecurityError(f"{path} in the manifest differs from the signed target facts")


def check_disk(mdir: Path, manifest: Manifest, index: ChunkIndex) -> None:
    """Raises LocalError unless the staging folder's filesystem has room for the bundle."""
    need = manifest.total_size - index.linkable_bytes(manifest) + DISK_RESERVE
    mdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(mdir).free
    if free < need:
        raise LocalError(f"not enough disk: {need} bytes needed, {free} free",
                         remedy="free disk space; the committed model is untouched")


def verify_signature(dev: Device, session: TufSession, name: str, bundle: Path,
                     manifest: Manifest, verifier: Verifier) -> str:
    """Accept the bundle iff a signer allowed for ``name`` signed it. Returns the key id.

    Raises:
        SecurityError: no allowed signer, or none of them verifies.
    """
    signers = session.signers(name)
    if not signers:
        raise SecurityError(f"no trusted model-signing key for {name} in trust/signers.json")
    digests = {f.path: f.sha256 for f in manifest.files if f.path != SIGNATURE_FILE}
    last: Exception | None = None
    for s in signers:
        try:
            verifier(bundle, s.public_key_pem.encode(), digests)
            return s.keyid
        except OtaError as e:
            last = e
    raise SecurityError(f"bundle signature not by a key trusted for {name}: {last}")


def install(dev: Device, session: TufSession, name: str, choice: Choice, *,  # noqa: PLR0915
            blob_base: str, pool: Any, fetch_cfg: FetchConfig, limits: Limits,
            verifier: Verifier, smoke: SmokeRunner, stats: Any,
            progress: Progress | None = None) -> dict[str, Any]:
    """Stage, verify, smoke-test and switch to ``choice``. Returns figures for the result.
    ``progress`` is called with (model, version, bytes staged, bundle size) while staging.

    On return the journal is in ``trial`` (health window open). On SmokeError the release is
    marked failed, the journal is idle and the committed model untouched.

    Raises:
        SecurityError, TransientError, LocalError, SmokeError.
    """
    rel: Release = choice.facts.release
    manifest = session.manifest(choice.info)
    check_bundle_facts(manifest, choice.facts)
    mdir = dev.mdir(name)
    cur = _slots.current_slot(mdir)
    slot = _slots.other(cur)
    index = ChunkIndex()
    for s in (cur, slot):
        m = _slots.read_manifest(mdir, s) if s else None
        if s and m:
            index.add_tree(_slots.slot_path(mdir, s), m)
    old_stage = mdir / "staging.old"
    _slots.remove_tree(old_stage)
    if _slots.staging_path(mdir).exists():
        _slots.staging_path(mdir).rename(old_stage)
        index.add_partial(old_stage, manifest)
    patch = _patch.try_deltas(dev, name, rel, choice.info.custom, manifest,  # issue 13
                              BlobFetcher(pool, blob_base, fetch_cfg, stats), index)
    check_disk(mdir, manifest, index)
    txn = Txn(rel.name, rel.version, rel.counter, slot, cur, started=dev.clock())
    dev.journal.advance(Phase.STAGING, txn)
    t0 = time.monotonic()
    try:
        staging = _slots.new_staging(mdir)
        fetcher = BlobFetcher(pool, blob_base, fetch_cfg, stats)
        st: StageStats = stage(manifest, staging, index, fetcher, fetch_cfg,
                               on_bytes=_bytes_hook(progress, name, rel.version))
        _slots.remove_tree(mdir / _patch.SCRATCH)  # its files are linked into staging
        dev.events.append("downloaded", name, rel.version, **st.to_dict(),
                          seconds=round(time.monotonic() - t0, 3), delta=patch.to_dict())
        if (staging / RELEASE_FILE).read_bytes() != rel.to_bytes():
            raise SecurityError("release.json in the bundle differs from the signed facts")
        keyid = verify_signature(dev, session, name, staging, manifest, verifier)
        # release.json equals the facts and the release key signed it: its floor is kept
        # whatever happens to this install (smoke failure, revert, a later forged index).
        _keep_floor(dev, name, rel.security_floor)
        dev.journal.advance(Phase.STAGED)
        _slots.install_staged(mdir, slot, manifest, _evidence(choice, session))
        _slots.remove_tree(old_stage)
        dev.events.append("staged", name, rel.version, slot=slot, signer=keyid)
    except (OtaError, OSError) as e:
        _abandon(dev, mdir, isinstance(e, SecurityError))
        if isinstance(e, OSError):
            raise LocalError(f"staging failed: {e}") from e
        raise
    figures: dict[str, Any] = {"stage": st.to_dict(), "signer": keyid, "delta": patch.to_dict()}
    try:
        report = run_smoke(dev, name, rel, slot=slot, smoke=smoke)
    except SmokeError as e:
        detail = getattr(e, "report", {})
        dev.sd.save_state(dev.sd.load_state().with_failed(name, rel.version))
        dev.journal.advance(Phase.IDLE)
        dev.events.append("smoke_failed", name, rel.version, reason=str(e), report=detail)
        raise
    figures["smoke"] = report
    dev.events.append("smoke_passed", name, rel.version, report=report)
    dev.begin_switch(txn)
    return figures


def _bytes_hook(progress: Progress | None, name: str,
                version: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(name, version, done, total)


def run_smoke(dev: Device, name: str, rel: Release, *, slot: str,
              smoke: SmokeRunner) -> dict[str, Any] | None:
    """Model bundles: run the new model, with the device's committed runtime bundle when it
    follows one (the runtime the app will use), else the system onnxruntime. Runtime bundles:
    run every other committed model with the new runtime (their own smoke specs: a runtime
    bundle has none); with no committed model to run, the built-in self-test model
    (``client/_selftest``, golden outputs computed by numpy). None when a model has no smoke
    spec."""
    bundle = _slots.slot_path(dev.mdir(name), slot)
    tier = dev.cfg.tier
    if rel.kind == "model":
        if rel.smoke is None:
            return None
        runtime = _committed_runtime(dev, exclude=name)
        return _as_dict(smoke(bundle / rel.model_path, bundle, rel.smoke, tier=tier,
                              runtime_path=runtime))
    reports: dict[str, Any] = {}
    for other, orel, obundle in _committed(dev, exclude=name):
        if orel.smoke is None or orel.kind != "model":
            continue
        reports[other] = _as_dict(smoke(obundle / orel.model_path, obundle, orel.smoke,
                                        tier=tier, runtime_path=bundle))
    if not reports:
        reports[SELFTEST] = _as_dict(smoke(_SELFTEST_DIR / "model.onnx", _SELFTEST_DIR,
                                           _SELFTEST_SPEC, tier=tier, runtime_path=bundle))
    return reports


def _committed(dev: Device, *, exclude: str) -> Iterator[tuple[str, Release, Path]]:
    """(name, release, slot folder) of every other followed bundle with a committed slot."""
    for other in dev.cfg.models:
        if other == exclude:
            continue
        omdir = dev.mdir(other)
        oslot = _slots.current_slot(omdir)
        orel = _slots.read_release(omdir, oslot) if oslot else None
        if oslot is not None and orel is not None:
            yield other, orel, _slots.slot_path(omdir, oslot)


def _committed_runtime(dev: Device, *, exclude: str) -> Path | None:
    """The slot of the committed runtime bundle the device follows, if any."""
    for _, orel, obundle in _committed(dev, exclude=exclude):
        if orel.kind == "runtime":
            return obundle
    return None


def _as_dict(report: Any) -> dict[str, Any]:
    to_dict = getattr(report, "to_dict", None)
    return dict(to_dict()) if callable(to_dict) else {"report": str(report)}


def _abandon(dev: Device, mdir: Path, drop_staging: bool) -> None:
    """Close a failed attempt: journal back to idle; staged bytes kept for reuse unless they
    came with a security failure."""
    st = dev.journal.load()
    if st.phase in (Phase.STAGING, Phase.STAGED):
        dev.journal.advance(Phase.IDLE)
    if drop_staging:
        _slots.remove_tree(_slots.staging_path(mdir))


def _evidence(choice: Any, session: Any) -> dict[str, bytes]:
    """What TUF verified for this install, kept beside the slot for ``ota verify``."""
    evidence = {
        "target.json": json.dumps(
            {"path": choice.info.path, "info": choice.info.to_dict()}, sort_keys=True
        ).encode(),
    }
    if session.signers_raw is not None:
        evidence["signers.json"] = session.signers_raw
    return evidence
