"""Checks of one bundle's supply-chain facts, shared by ``ota audit`` and ``ota verify``.

Given a manifest whose files' digests are already checked (by the caller, against the bytes),
the TUF target facts and the TUF-verified ``trust/signers.json``, this module decides: the
``release.json`` binding, the OpenSSF model signature (``ota.signing.verify_digests``) and who
made it, the provenance DSSE statement (``ota.signing.verify_provenance``), the SBOM (strict
CycloneDX 1.6 validation, its digest bound in the target) and known vulnerabilities (OSV).
Every decision about a signature is taken by ``ota.signing``; nothing here verifies bytes by
hand. It also implements ``ota verify DIR`` for a bundle already on disk (:func:`verify_dir`).

A check never raises for a verification failure: it is recorded as ``failed`` with the reason,
so that a report names *every* failing artifact; :meth:`Report.raise_for_failures` then raises.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ota.bundle import (
    PROVENANCE_FILE,
    RELEASE_FILE,
    SBOM_FILE,
    SIGNATURE_FILE,
    Manifest,
    Release,
    SignerEntry,
    TargetFacts,
)
from ota.errors import OtaError, SecurityError

Status = Literal["ok", "failed", "skipped"]
MAX_SMALL_FILE = {
    RELEASE_FILE: 64 * 1024,
    SBOM_FILE: 16 * 1024 * 1024,
    PROVENANCE_FILE: 1024 * 1024,
    SIGNATURE_FILE: 16 * 1024 * 1024,
}
SEVERITIES = ("low", "moderate", "high", "critical")


class AuditFailed(SecurityError):
    """An audit or an offline verification found at least one failing check."""


@dataclass
class Check:
    """One named check of a report. ``data`` holds what the auditor wants to see."""

    name: str
    status: Status
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail, **self.data}


@dataclass
class Report:
    """The auditor's report: a subject and its checks, in order."""

    subject: str
    source: str
    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, status: Status, detail: str = "", **data: Any) -> Check:
        check = Check(name, status, detail, dict(data))
        self.checks.append(check)
        return check

    @property
    def ok(self) -> bool:
        return all(c.status != "failed" for c in self.checks)

    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "failed"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "source": self.source,
            "ok": self.ok,
            "failed": [c.name for c in self.failed()],
            "checks": [c.to_dict() for c in self.checks],
        }

    def render(self) -> str:
        lines = [f"audit of {self.subject} ({self.source})"]
        for c in self.checks:
            mark = {"ok": "ok  ", "failed": "FAIL", "skipped": "skip"}[c.status]
            lines.append(f"  [{mark}] {c.name}: {c.detail}")
            lines += [f"         {line}" for line in _detail_lines(c)]
        lines.append("RESULT: " + ("PASS" if self.ok else "FAIL: " + ", ".join(
            c.name for c in self.failed())))  # fmt: skip
        return "\n".join(lines)

    def raise_for_failures(self) -> None:
        """Raises: AuditFailed naming every failed check."""
        if not self.ok:
            raise AuditFailed(
                f"{self.subject}: " + "; ".join(f"{c.name}: {c.detail}" for c in self.failed())
            )


def _detail_lines(c: Check) -> list[str]:
    if c.name == "tuf" and "chain" in c.data:
        return [
            f"{r['role']} v{r['version']} expires {r['expires']} threshold {r['threshold']} "
            f"signed by {', '.join(k[:12] for k in r['signed_by'])}"
            for r in c.data["chain"]
        ]
    if c.name == "signature" and "key_fingerprint" in c.data:
        return [f"signer key sha256:{c.data['key_fingerprint']}"]
    if c.name == "vulns":
        return [f"{m['id']} {m['severity']} {m['package']}"
                + (f": {m['note']}" if m.get("note") else f"@{m['version']}")
                for m in c.data.get("matches", [])]  # fmt: skip
    if c.name in ("files", "unpacked") and c.data.get("problems"):
        return list(c.data["problems"])
    return []


def allowed_signers(signers: list[SignerEntry], name: str) -> list[SignerEntry]:
    """Signers whose model globs match ``name`` (the rule devices apply)."""
    return [s for s in signers if s.allows(name)]


def check_bundle(
    report: Report,
    manifest: Manifest,
    files: Mapping[str, bytes | None],
    facts: TargetFacts | None,
    signers: list[SignerEntry] | None,
    *,
    osv: Path | None = None,
    fail_on: str = "low",
) -> None:
    """Add the release, signature, provenance, SBOM and vulnerability checks to ``report``.

    ``files`` maps the special bundle files to their bytes, or None when they failed their
    digest check (their checks are then failed). ``facts`` None means no TUF target facts are
    available (an offline slot); ``signers`` None means no trusted signer list.
    """
    digests = {f.path: f.sha256 for f in manifest.files}
    _check_release(report, manifest, files.get(RELEASE_FILE), facts, digests)
    key = _check_signature(report, manifest, files.get(SIGNATURE_FILE), signers, digests)
    _check_provenance(report, manifest, files.get(PROVENANCE_FILE), signers, key, digests)
    sbom = _check_sbom(report, files.get(SBOM_FILE), facts, digests)
    _check_vulns(report, manifest, sbom, osv, fail_on)


def _check_release(report: Report, manifest: Manifest, data: bytes | None,
                   facts: TargetFacts | None, digests: Mapping[str, str]) -> None:  # fmt: skip
    if data is None:
        report.add("release", "failed", f"{RELEASE_FILE} is missing or does not match its digest")
        return
    try:
        release = Release.from_bytes(data)
    except OtaError as e:
        report.add("release", "failed", f"{RELEASE_FILE} is invalid: {e}")
        return
    if (release.name, release.version) != (manifest.name, manifest.version):
        report.add("release", "failed", f"{RELEASE_FILE} names {release.name} {release.version}")
        return
    if facts is None:
        report.add("release", "ok", f"counter {release.counter} (no TUF target facts to bind)",
                   counter=release.counter)  # fmt: skip
        return
    if data != facts.release.to_bytes():
        report.add("release", "failed", f"{RELEASE_FILE} differs from the signed target facts")
        return
    wrong = sorted(p for p, d in facts.digests.items() if digests.get(p) != d)
    if wrong:
        report.add("release", "failed", f"target facts bind other digests for {wrong}")
        return
    report.add("release", "ok", f"counter {release.counter}, byte-equal to the target facts",
               counter=release.counter, kind=release.kind,
               rollback_of=release.rollback_of, created=release.created)  # fmt: skip


def _check_signature(report: Report, manifest: Manifest, sig: bytes | None,
                     signers: list[SignerEntry] | None,
                     digests: Mapping[str, str]) -> SignerEntry | None:  # fmt: skip
    from ota.signing import verify_digests

    if sig is None:
        report.add("signature", "failed", f"{SIGNATURE_FILE} is missing or was altered")
        return None
    if signers is None:
        report.add(
            "signature",
            "failed",
            "no trusted signer key (pass --signer-key; or --root for an export)",
        )
        return None
    candidates = allowed_signers(signers, manifest.name)
    if not candidates:
        report.add("signature", "failed", f"no signer is allowed for {manifest.name}")
        return None
    signed = {p: d for p, d in digests.items() if p != SIGNATURE_FILE}
    reasons = []
    for cand in candidates:
        try:
            info = verify_digests(
                sig, cand.public_key_pem.encode(), signed, signature_name=SIGNATURE_FILE
            )
        except OtaError as e:
            reasons.append(str(e))
            continue
        report.add("signature", "ok", f"OpenSSF model signature by {cand.keyid[:16]}",
                   keyid=cand.keyid, key_fingerprint=info.key_fingerprint,
                   signed_name=info.model_name, files=len(info.files))  # fmt: skip
        return cand
    report.add(
        "signature",
        "failed",
        f"not signed by any of the {len(candidates)} keys allowed for {manifest.name}: "
        + (reasons[0] if reasons else ""),
    )
    return None


def _check_provenance(report: Report, manifest: Manifest, data: bytes | None,
                      signers: list[SignerEntry] | None, key: SignerEntry | None,
                      digests: Mapping[str, str]) -> None:  # fmt: skip
    from cryptography.hazmat.primitives.serialization import load_pem_public_key
    from securesystemslib.signer import SSlibKey

    from ota.signing import verify_provenance

    if data is None:
        report.add("provenance", "failed", f"{PROVENANCE_FILE} is missing or was altered")
        return
    pool = [key] if key else allowed_signers(signers or [], manifest.name)
    if not pool:
        report.add("provenance", "failed", "no trusted key to verify the provenance with")
        return
    expected = {
        p: d for p, d in digests.items() if p not in (PROVENANCE_FILE, RELEASE_FILE, SIGNATURE_FILE)
    }
    error = ""
    for cand in pool:
        try:
            pub = SSlibKey.from_crypto(load_pem_public_key(cand.public_key_pem.encode()))
            statement = verify_provenance(data, [pub], expected_subjects=expected)
        except (OtaError, ValueError) as e:
            error = str(e)
            continue
        predicate = statement["predicate"]
        build = predicate.get("buildDefinition", {})
        report.add("provenance", "ok", f"SLSA provenance signed by {cand.keyid[:16]}",
                   builder=predicate.get("runDetails", {}).get("builder", {}).get("id"),
                   build_type=build.get("buildType"),
                   parameters=build.get("externalParameters"),
                   dependencies=build.get("resolvedDependencies"))  # fmt: skip
        return
    report.add("provenance", "failed", error or "provenance refused")


def _check_sbom(report: Report, data: bytes | None, facts: TargetFacts | None,
                digests: Mapping[str, str]) -> bytes | None:  # fmt: skip
    from ota.sbom import load_sbom

    if data is None:
        report.add("sbom", "failed", f"{SBOM_FILE} is missing or was altered")
        return None
    digest = hashlib.sha256(data).hexdigest()
    if facts is not None and facts.digests.get(SBOM_FILE) != digest:
        report.add("sbom", "failed", "SBOM digest is not the one bound in the TUF target")
        return None
    schema = True
    try:
        try:
            view = load_sbom(data)
        except ModuleNotFoundError as e:  # a device-only install: no cyclonedx
            from ota._extras import from_import_error

            if from_import_error(e) is None:
                raise
            view, schema = load_sbom(data, schema=False), False
    except OtaError as e:
        report.add("sbom", "failed", f"SBOM is invalid: {e}")
        return None
    wrong = sorted(p for p, h in view.file_hashes().items() if digests.get(p) != h)
    if wrong:
        report.add("sbom", "failed", f"SBOM lists other hashes for {wrong[:5]}")
        return None
    runtime = [c.to_dict() for c in view.components if c.type == "library"]
    valid = "valid CycloneDX 1.6" if schema else "CycloneDX 1.6 (schema not checked)"
    report.add("sbom", "ok", f"{valid}, digest bound in the signed target"
               if facts else valid, sha256=digest,
               serial=view.serial_number, model=view.model.to_dict() if view.model else None,
               runtime=runtime, runtime_range=view.runtime_range,
               schema_checked=schema)  # fmt: skip
    if not schema:
        report.add("sbom-schema", "skipped", "the CycloneDX 1.6 schema check needs "
                   "edge-ota[repository] (pip install 'edge-ota[repository]')")  # fmt: skip
    return data


def _check_vulns(report: Report, manifest: Manifest, sbom: bytes | None, osv: Path | None,
                 fail_on: str) -> None:  # fmt: skip
    from ota.sbom import match_osv, severity_at_least

    if osv is None:
        report.add("vulns", "skipped", "no OSV export given (--osv DIR)")
        return
    if sbom is None:
        report.add("vulns", "failed", "cannot match vulnerabilities without a valid SBOM")
        return
    try:
        matches = match_osv([(f"{manifest.name}@{manifest.version}", sbom)], osv)
    except OtaError as e:
        report.add("vulns", "failed", f"OSV matching failed: {e}")
        return
    bad = [m for m in matches if severity_at_least(m, fail_on)]
    detail = f"{len(matches)} known, {len(bad)} at or above {fail_on}"
    report.add("vulns", "failed" if bad else "ok", detail,
               matches=[m.to_dict() for m in matches])  # fmt: skip


# -- ota verify DIR -------------------------------------------------------------------------


def hash_local_files(bundle_dir: Path, manifest: Manifest) -> tuple[list[str], dict[str, bytes]]:
    """Hash every manifest file under ``bundle_dir``; also flag extra files and symlinks.

    Returns the problems (empty when every file matches) and the special files' bytes.
    """
    problems: list[str] = []
    small: dict[str, bytes] = {}
    listed = {f.path for f in manifest.files}
    for f in manifest.files:
        path = bundle_dir / f.path
        if path.is_symlink() or not path.is_file():
            problems.append(f"{f.path}: missing or not a regular file")
            continue
        h = hashlib.sha256()
        size = 0
        keep = f.path in MAX_SMALL_FILE and f.size <= MAX_SMALL_FILE[f.path]
        buf = bytearray()
        with path.open("rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
                size += len(block)
                if keep and size <= MAX_SMALL_FILE[f.path]:
                    buf += block
                if size > f.size:
                    break
        if size != f.size or h.hexdigest() != f.sha256:
            problems.append(f"{f.path}: sha256 or size differs from the manifest")
        elif keep:
            small[f.path] = bytes(buf)
    for p in sorted(bundle_dir.rglob("*")):
        rel = p.relative_to(bundle_dir).as_posix()
        if (p.is_file() or p.is_symlink()) and rel not in listed:
            problems.append(f"{rel}: not in the manifest")
        if len(problems) > 64:
            break
    return problems, small
