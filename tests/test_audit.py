"""``ota audit`` / ``ota verify``: every artifact tampered with in turn is named, and fails.

One real repository is published once per module and copied for each test (tampering is
destructive); audits run python-tuf's Updater over the copied storage folder, or over HTTP.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from ota.bundle import (
    PROVENANCE_FILE,
    SBOM_FILE,
    SIGNATURE_FILE,
    Manifest,
    blob_key,
    manifest_target_path,
)
from ota.errors import ExitCode, InputError
from ota.repository import Project
from ota.repository._audit import AuditOptions, audit, verify_dir
from ota.repository._index import UnknownRelease
from ota.repository._project import generate_p256, key_fingerprint, target_storage_key
from ota.repository._tufview import HttpSource, StorageSource
from ota.repository._txn import Transaction
from ota.repository._verify import Report
from tests.repo_helpers import make_project, publish_mlp, serve_dir

NAME, VERSION = "det", "1.0.0"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("audit")
    project = make_project(base)
    publish_mlp(project, NAME, VERSION, runtime_version="1.17.0")
    return base


@pytest.fixture
def world(pristine: Path, tmp_path: Path) -> Project:
    """A private copy of the published repository and its project."""
    shutil.copytree(pristine, tmp_path, dirs_exist_ok=True)
    toml = tmp_path / "proj" / "ota.toml"
    toml.write_text(toml.read_text().replace(str(pristine / "repo"), str(tmp_path / "repo")))
    return Project.open(tmp_path / "proj")


def _audit(project: Project, **kw: object) -> Report:
    root = (project.root_dir / "root.json").read_bytes()
    return audit(StorageSource(project.storage), root, NAME, VERSION, AuditOptions(**kw))  # type: ignore[arg-type]


def _manifest(project: Project) -> tuple[Path, Manifest]:
    repo = Path(project.storage.local_root())  # type: ignore[arg-type]
    target = manifest_target_path(NAME, VERSION)
    folder = repo / "targets" / target.rsplit("/", 1)[0]
    (path,) = folder.glob(f"*.{VERSION}.json")
    return path, Manifest.from_bytes(path.read_bytes())


def _flip(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def _check(report: Report, name: str) -> str:
    check = next(c for c in report.checks if c.name == name)
    return f"{check.status}: {check.detail} {check.data.get('problems', '')}"


def test_clean_release_passes_with_full_report(world: Project) -> None:
    report = _audit(world)
    assert report.ok, report.render()
    statuses = {c.name: c.status for c in report.checks}
    for name in ("tuf", "manifest", "signers", "files", "release", "signature",
                 "provenance", "sbom"):  # fmt: skip
        assert statuses[name] == "ok", name
    assert statuses["vulns"] == "skipped"
    tuf = next(c for c in report.checks if c.name == "tuf")
    roles = [r["role"] for r in tuf.data["chain"]]
    assert roles[:4] == ["root", "timestamp", "snapshot", "targets"]
    assert roles[-1].startswith("model.")  # the delegated role that signs the release
    assert all(r["signed_by"] and r["threshold"] >= 1 for r in tuf.data["chain"])
    sig = next(c for c in report.checks if c.name == "signature")
    pub = (world.root_dir / world.config.release_pub).read_bytes()
    assert sig.data["key_fingerprint"] == key_fingerprint(pub)
    assert "RESULT: PASS" in report.render()
    json.dumps(report.to_dict())  # the JSON report is serialisable


@pytest.mark.parametrize(
    ("artifact", "failing", "named"),
    [
        ("model/model.onnx", "files", "model/model.onnx"),
        (SBOM_FILE, "sbom", SBOM_FILE),
        (SIGNATURE_FILE, "signature", SIGNATURE_FILE),
        (PROVENANCE_FILE, "provenance", PROVENANCE_FILE),
    ],
)
def test_tampered_bundle_file_is_named(
    world: Project, artifact: str, failing: str, named: str
) -> None:
    _, manifest = _manifest(world)
    chunk = manifest.file(artifact).chunks[0].sha256
    _flip(world.storage.local_root() / blob_key(chunk))  # type: ignore[operator]
    report = _audit(world)
    assert not report.ok
    failed = {c.name for c in report.failed()}
    assert {"files", failing} <= failed, report.render()
    assert named in _check(report, "files")
    assert "tuf" not in failed and "manifest" not in failed


def test_tampered_manifest_is_refused_by_tuf(world: Project) -> None:
    path, _ = _manifest(world)
    _flip(path)
    report = _audit(world)
    assert [c.name for c in report.failed()] == ["manifest"]
    assert "LengthOrHashMismatch" in _check(report, "manifest") or "hash" in _check(
        report, "manifest"
    )


def test_tampered_metadata_role_is_named(world: Project) -> None:
    repo = world.storage.local_root()
    assert repo is not None
    tuf = next(c for c in _audit(world).checks if c.name == "tuf")
    role, version = tuf.data["chain"][-1]["role"], tuf.data["chain"][-1]["version"]
    path = repo / "metadata" / f"{version}.{role}.json"
    doc = json.loads(path.read_bytes())
    target = doc["signed"]["targets"][manifest_target_path(NAME, VERSION)]
    target["custom"]["edge-ota"]["release"]["counter"] = 99  # re-label the release
    path.write_bytes(json.dumps(doc).encode())
    report = _audit(world)
    assert [c.name for c in report.failed()] == ["tuf"]
    assert role in _check(report, "tuf")
    assert all(c.status == "skipped" for c in report.checks if c.name != "tuf")


def _replace_signature(project: Project, tmp: Path) -> None:
    """A holder of the online bins key re-signs the bundle with its own P-256 key and points
    the release target at the new manifest (what publish itself refuses to do)."""
    from ota.bundle import Chunk, FileEntry, TargetFacts
    from ota.repository._project import put_target_file
    from ota.repository._txn import run
    from ota.signing import sign_digests

    generate_p256(tmp / "k.pem", tmp / "k.pub.pem")
    _, manifest = _manifest(project)
    digests = {f.path: f.sha256 for f in manifest.files if f.path != SIGNATURE_FILE}
    sign_digests(digests, tmp / "k.pem", tmp / SIGNATURE_FILE, model_name=f"{NAME}-{VERSION}")
    sig = (tmp / SIGNATURE_FILE).read_bytes()
    entry = FileEntry(SIGNATURE_FILE, hashlib.sha256(sig).hexdigest(), len(sig),
                      (Chunk(hashlib.sha256(sig).hexdigest(), len(sig)),))  # fmt: skip
    project.storage.put(blob_key(entry.sha256), sig)
    files = tuple(entry if f.path == SIGNATURE_FILE else f for f in manifest.files)
    new = Manifest(NAME, VERSION, files)
    path = manifest_target_path(NAME, VERSION)

    def change(txn: Transaction) -> None:
        role = txn.bin_for(path)
        facts = TargetFacts.from_custom(txn.targets(role).signed.targets[path].custom)
        facts = TargetFacts(facts.release, {**facts.digests, SIGNATURE_FILE: entry.sha256})
        info = put_target_file(project.storage, path, new.to_bytes())
        info.unrecognized_fields["custom"] = facts.to_custom()
        txn.edit(role).targets[path] = info

    run(project.storage, project.signers, project.expiry(), change)


def test_signature_by_unknown_key_fails(world: Project, tmp_path: Path) -> None:
    _replace_signature(world, tmp_path)
    report = _audit(world)
    assert [c.name for c in report.failed()] == ["signature"], report.render()
    assert "not signed by any of the 1 keys allowed" in _check(report, "signature")


def test_expired_bins_role_fails_the_audit(tmp_path: Path) -> None:
    """Keyed signatures carry no certificate: freshness is TUF expiry. A bins role published
    with a zero lifetime (``[expiry] bins = 0`` in ota.toml) is expired when audited."""
    project = make_project(tmp_path)
    toml = project.root_dir / "ota.toml"
    head, _, tail = toml.read_text().partition("[expiry]")
    tail = "\n".join("bins = 0" if ln.startswith("bins =") else ln for ln in tail.split("\n"))
    toml.write_text(head + "[expiry]" + tail)
    project = Project.open(project.root_dir)
    assert project.expiry().bins == 0
    publish_mlp(project, NAME, VERSION)
    report = _audit(project)
    assert [c.name for c in report.failed()] == ["tuf"]
    assert "ExpiredMetadataError" in _check(report, "tuf")
    assert "releases" in _check(report, "tuf")  # online roles: the bins lifetime


def test_known_vulnerability_fails_the_audit(world: Project, tmp_path: Path) -> None:
    osv = tmp_path / "osv"
    osv.mkdir()
    (osv / "GHSA-1.json").write_text(json.dumps({
        "id": "GHSA-test-0001", "summary": "overflow",
        "affected": [{"package": {"ecosystem": "PyPI", "name": "onnxruntime"},
                      "ranges": [{"type": "ECOSYSTEM",
                                  "events": [{"introduced": "1.16.0"}, {"fixed": "1.17.3"}]}]}],
        "database_specific": {"severity": "HIGH"}}))  # fmt: skip
    report = _audit(world, osv=osv)
    assert [c.name for c in report.failed()] == ["vulns"]
    assert _audit(world, osv=osv, fail_on="critical").ok


def test_audit_over_http_and_export_then_verify_offline(world: Project, tmp_path: Path) -> None:
    root = (world.root_dir / "root.json").read_bytes()
    export = tmp_path / "export"
    with serve_dir(world.storage.local_root()) as base:  # type: ignore[arg-type]
        report = audit(HttpSource(base), root, NAME, VERSION, AuditOptions(export=export))
    assert report.ok, report.render()
    assert (export / "bundle" / "model" / "model.onnx").is_file()
    offline = verify_dir(export, trusted_root=root)
    assert offline.ok, offline.render()
    assert next(c for c in offline.checks if c.name == "tuf").status == "ok"
    # without a trusted root, the signature needs a key the auditor trusts
    assert {c.name for c in verify_dir(export).failed()} == {"signature", "provenance"}
    pub = (world.root_dir / world.config.release_pub).read_bytes()
    assert verify_dir(export, signer_key=pub).ok
    # a file changed on disk after export is named
    _flip(export / "bundle" / SBOM_FILE)
    failed = verify_dir(export, trusted_root=root)
    assert {"files", "sbom"} <= {c.name for c in failed.failed()}


def test_verify_device_slot_layout(world: Project, tmp_path: Path) -> None:
    """A device slot: ``slots/a`` with ``a.manifest.json`` beside it (client/_slots.py)."""
    export = tmp_path / "export"
    root = (world.root_dir / "root.json").read_bytes()
    assert audit(StorageSource(world.storage), root, NAME, VERSION,
                 AuditOptions(export=export)).ok  # fmt: skip
    slots = tmp_path / "state" / "slots"
    shutil.copytree(export / "bundle", slots / "a")
    shutil.copy(export / "manifest.json", slots / "a.manifest.json")
    pub = (world.root_dir / world.config.release_pub).read_bytes()
    report = verify_dir(slots / "a", signer_key=pub)
    assert report.ok, report.render()
    (slots / "a" / "extra.bin").write_bytes(b"x")
    assert "files" in {c.name for c in verify_dir(slots / "a", signer_key=pub).failed()}


def test_cli_audit_exit_codes(world: Project) -> None:
    from click.testing import CliRunner

    from ota.cli._main import _register, cli

    _register()
    args = ["audit", NAME, VERSION, "--project", str(world.root_dir)]
    ok = CliRunner().invoke(cli, [*args, "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["ok"] is True
    _, manifest = _manifest(world)
    _flip(world.storage.local_root() / blob_key(manifest.file(SIGNATURE_FILE).chunks[0].sha256))  # type: ignore[operator]
    bad = CliRunner().invoke(cli, args)
    assert bad.exit_code == ExitCode.SECURITY
    assert "signature" in bad.output and "RESULT: FAIL" in bad.output


def test_unknown_release_is_not_published_not_a_security_failure(world: Project) -> None:
    """A typo is exit 3 with a suggestion; refused metadata stays a security failure (4)."""
    root = (world.root_dir / "root.json").read_bytes()
    with pytest.raises(UnknownRelease, match=r"det 1\.0\.1 is not published") as e:
        audit(StorageSource(world.storage), root, NAME, "1.0.1")
    assert "did you mean 1.0.0" in e.value.diagnostics()
    with pytest.raises(UnknownRelease, match="no model 'dett'"):
        audit(StorageSource(world.storage), root, "dett", VERSION)
    assert target_storage_key("a/b", "0" * 64).startswith("targets/a/")


def test_cli_typo_exits_3_and_tampering_still_exits_4(world: Project) -> None:
    from click.testing import CliRunner

    from ota.cli._main import _register, cli

    _register()
    typo = CliRunner().invoke(cli, ["audit", "detectorr", VERSION, "--project",
                                    str(world.root_dir)])  # fmt: skip
    assert typo.exit_code == ExitCode.INPUT, typo.output
    assert "not published" in typo.output and "not a target" not in typo.output
    # the same question against metadata an attacker altered is a security failure
    repo = Path(world.storage.local_root())  # type: ignore[arg-type]
    (timestamp,) = repo.glob("metadata/timestamp.json")
    doc = json.loads(timestamp.read_bytes())
    doc["signed"]["version"] += 1  # no longer matches its signature
    timestamp.write_text(json.dumps(doc))
    bad = CliRunner().invoke(cli, ["audit", "detectorr", VERSION, "--project",
                                   str(world.root_dir)])  # fmt: skip
    assert bad.exit_code == ExitCode.SECURITY, bad.output
    assert "refused by python-tuf" in bad.output


def _slot_from_export(export: Path, slots: Path) -> Path:
    """A device slot as client/_slots.py lays it out, with the evidence the device recorded
    at install (``a.target.json``, ``a.signers.json``)."""
    shutil.copytree(export / "bundle", slots / "a")
    shutil.copy(export / "manifest.json", slots / "a.manifest.json")
    shutil.copy(export / "target.json", slots / "a.target.json")
    shutil.copy(export / "signers.json", slots / "a.signers.json")
    return slots / "a"


def test_verify_slot_trusts_the_operators_key_not_the_slots_signer_list(
    world: Project, tmp_path: Path
) -> None:
    """Attack: a slot holding a bundle signed by an unrelated key, with that key in the slot's
    own ``a.signers.json``. With the operator's --signer-key it must fail, and without any key
    the slot's own list must not make it pass."""
    evil = make_project(tmp_path / "evil")  # the attacker's own keys, same model name
    publish_mlp(evil, NAME, VERSION, seed=7)
    export = tmp_path / "evil-export"
    evil_root = (evil.root_dir / "root.json").read_bytes()
    assert audit(StorageSource(evil.storage), evil_root, NAME, VERSION,
                 AuditOptions(export=export)).ok  # fmt: skip
    slot = _slot_from_export(export, tmp_path / "state" / "slots")
    operator_pub = (world.root_dir / world.config.release_pub).read_bytes()
    report = verify_dir(slot, signer_key=operator_pub)
    assert "signature" in {c.name for c in report.failed()}, report.render()
    assert "not signed by any of the 1 keys" in _check(report, "signature")
    assert "not trusted" in _check(report, "signers")
    no_key = verify_dir(slot)
    assert "signature" in {c.name for c in no_key.failed()}, no_key.render()
    # the attacker's key does verify it: the failure above is the anchor, not the bundle
    assert verify_dir(slot, signer_key=(evil.root_dir / evil.config.release_pub).read_bytes()).ok


def test_verify_export_with_root_still_obeys_the_operators_key(
    world: Project, tmp_path: Path
) -> None:
    export = tmp_path / "export"
    root = (world.root_dir / "root.json").read_bytes()
    assert audit(StorageSource(world.storage), root, NAME, VERSION,
                 AuditOptions(export=export)).ok  # fmt: skip
    other = generate_p256(tmp_path / "other.pem", tmp_path / "other.pub.pem")
    report = verify_dir(export, trusted_root=root, signer_key=other)
    assert "signature" in {c.name for c in report.failed()}, report.render()
    with pytest.raises(InputError, match="not a PEM public key"):
        verify_dir(export, signer_key=b"not a key")


def test_an_oversized_object_is_refused_as_security_from_every_source(
    world: Project, tmp_path: Path
) -> None:
    """A served repository or an export folder holding a file over its bound is refused like any
    oversized input (exit 4), not reported as a storage misconfiguration (exit 9)."""
    from ota.repository._storage import TooLarge
    from ota.repository._tufview import DirSource

    repo = Path(world.storage.local_root())  # type: ignore[arg-type]
    with serve_dir(repo) as base:
        source = HttpSource(base)
        with pytest.raises(TooLarge) as over:
            source.read("metadata/timestamp.json", 16)
        assert source.read("metadata/timestamp.json", 1 << 20)  # the next read is unharmed
        source._pool.clear()
    assert over.value.exit_code == ExitCode.SECURITY
    folder = tmp_path / "export"
    (folder / "tuf").mkdir(parents=True)
    (folder / "tuf" / "big.json").write_bytes(b"x" * 64)
    with pytest.raises(TooLarge):
        DirSource(folder).read("tuf/big.json", 16)
    (folder / "tuf" / "link.json").symlink_to(folder / "tuf" / "big.json")
    with pytest.raises(TooLarge):
        DirSource(folder).read("tuf/link.json", 1 << 20)


def test_a_release_its_index_lists_but_the_bins_hide_is_a_security_failure(
    world: Project,
) -> None:
    """Security review of issue 12 item 10: "not published" (exit 3) is for a release the
    verified metadata does not know. A release the model's verified index lists whose target
    is gone from the bins is an inconsistent repository (what an attacker holding the online
    keys makes by hiding a release; a device refuses such an index): exit 4, not a typo."""
    from click.testing import CliRunner

    from ota.bundle import manifest_target_path
    from ota.cli._main import _register, cli
    from ota.repository._project import _LazySigners

    online = {k: u for k, u in world.config.signers.items() if "/online/" in u}
    txn = Transaction.begin(world.storage, _LazySigners(world.root_dir, online), world.expiry())
    path = manifest_target_path(NAME, VERSION)
    del txn.edit(txn.bin_for(path)).targets[path]
    txn.commit()
    _register()
    res = CliRunner().invoke(cli, ["audit", NAME, VERSION, "--project", str(world.root_dir)])
    assert res.exit_code == ExitCode.SECURITY, res.output
    assert "not published" not in res.output
