"""ota.sbom: vulnerability matching against a synthetic offline OSV export."""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from pathlib import Path
from typing import Any

import pytest

from ota.sbom import (
    SbomError,
    SbomLimits,
    Severity,
    VulnMatch,
    build_mlbom,
    cvss_base_score,
    load_osv,
    match_osv,
    severity_at_least,
)
from tests.onnx_models import write_mlp

CRITICAL_V3 = "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"  # 9.8


def _pypi(name: str, *events: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {
        "package": {"ecosystem": "PyPI", "name": name, "purl": f"pkg:pypi/{name}"},
        "ranges": [{"type": "ECOSYSTEM", "events": list(events)}],
        **extra,
    }


RECORDS: dict[str, object] = {
    # a vulnerable onnxruntime range, fixed in 1.17.3, rated by GitHub
    "GHSA-aaaa.json": {
        "schema_version": "1.6.0",
        "id": "GHSA-aaaa-bbbb-cccc",
        "aliases": ["CVE-2026-0001"],
        "summary": "Heap overflow in a kernel",
        "affected": [_pypi("onnxruntime", {"introduced": "1.16.0"}, {"fixed": "1.17.3"})],
        "database_specific": {"severity": "HIGH"},
    },
    # everything up to and including 1.20.0, rated only by a CVSS v3 vector; the package is
    # named by ecosystem + name in a different spelling (no purl)
    "nested/PYSEC-1.json": {
        "id": "PYSEC-2026-1",
        "affected": [
            {
                "package": {"ecosystem": "PyPI", "name": "OnnxRuntime"},
                "ranges": [
                    {
                        "type": "ECOSYSTEM",
                        "events": [{"introduced": "0"}, {"last_affected": "1.20.0"}],
                    }
                ],
            }
        ],
        "severity": [{"type": "CVSS_V3", "score": CRITICAL_V3}],
    },
    # an explicit version list and a vector-less record: severity unknown
    "OSV-versions.json": {
        "id": "OSV-2026-7",
        "affected": [
            {"package": {"ecosystem": "PyPI", "name": "onnxruntime"}, "versions": ["1.31.1"]}
        ],
    },
    # another package: never matches
    "GHSA-numpy.json": {
        "id": "GHSA-nnnn",
        "affected": [_pypi("numpy", {"introduced": "0"})],
        "database_specific": {"severity": "LOW"},
    },
    # withdrawn: ignored
    "GHSA-withdrawn.json": {
        "id": "GHSA-wwww",
        "withdrawn": "2026-01-01T00:00:00Z",
        "affected": [_pypi("onnxruntime", {"introduced": "0"})],
    },
    # an advisory against the model itself (SEMVER range on its generic purl)
    "MODEL-1.json": {
        "id": "EDGE-2026-1",
        "summary": "Backdoored weights",
        "affected": [
            {
                "package": {"purl": "pkg:generic/detector"},
                "ranges": [
                    {"type": "SEMVER", "events": [{"introduced": "1.0.0-rc.1"}, {"fixed": "1.0.2"}]}
                ],
            }
        ],
        "severity": [{"type": "CVSS_V3", "score": "CVSS:3.1/AV:N/AC:H/PR:N/UI:R/S:U/C:L/I:L/A:N"}],
    },
}
MALFORMED = {
    "broken.json": b'{"id": "GHSA-broken", "affected": [',
    "not-a-list.json": json.dumps({"id": "X-1", "affected": {"package": {}}}).encode(),
    "bad-event.json": json.dumps(
        {"id": "X-2", "affected": [_pypi("onnxruntime", {"introduced": "0", "fixed": "2"})]}
    ).encode(),
}


def _export(root: Path) -> Path:
    for name, doc in RECORDS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(doc))
    for name, raw in MALFORMED.items():
        (root / name).write_bytes(raw)
    (root / "README.txt").write_text("not a record")
    return root


def _sbom(tmp_path: Path, version: str, runtime: str) -> bytes:
    model = write_mlp(tmp_path / "model" / "model.onnx")
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    return build_mlbom(
        name="detector",
        version=version,
        model_path=model,
        files={"model/model.onnx": (sha, model.stat().st_size)},
        runtime_range=">=1.16,<2",
        runtime_version=runtime,
    )


@pytest.fixture
def fleet(tmp_path: Path) -> list[tuple[str, bytes]]:
    return [
        ("detector@1.0.1", _sbom(tmp_path, "1.0.1", "1.17.0")),  # in the GHSA range
        ("detector@1.0.2", _sbom(tmp_path, "1.0.2", "1.17.3")),  # fixed version, still <= 1.20.0
        ("detector@1.1.0", _sbom(tmp_path, "1.1.0", "1.25.0")),  # outside every range
        ("detector@1.2.0", _sbom(tmp_path, "1.2.0", "1.31.1")),  # listed version
    ]


def _by_release(matches: list[VulnMatch]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for m in matches:
        out.setdefault(m.release, set()).add(m.vuln_id)
    return out


def test_matches_affected_releases_only(
    tmp_path: Path, fleet: list[tuple[str, bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    osv = _export(tmp_path / "osv")
    with caplog.at_level(logging.WARNING, logger="ota.sbom.osv"):
        matches = match_osv(fleet, osv)
    assert _by_release(matches) == {
        "detector@1.0.1": {"GHSA-aaaa-bbbb-cccc", "PYSEC-2026-1", "EDGE-2026-1"},
        "detector@1.0.2": {"PYSEC-2026-1"},
        "detector@1.2.0": {"OSV-2026-7"},
    }
    ghsa = next(m for m in matches if m.vuln_id == "GHSA-aaaa-bbbb-cccc")
    assert ghsa.aliases == ("CVE-2026-0001",)
    assert ghsa.severity is Severity.HIGH
    assert ghsa.fixed == ("1.17.3",)
    assert (ghsa.package, ghsa.version) == ("pkg:pypi/onnxruntime", "1.17.0")
    pysec = next(m for m in matches if m.vuln_id == "PYSEC-2026-1")
    assert pysec.severity is Severity.CRITICAL
    assert pysec.fixed == ()
    model = next(m for m in matches if m.vuln_id == "EDGE-2026-1")
    assert (model.package, model.fixed, model.severity) == (
        "pkg:generic/detector",
        ("1.0.2",),
        Severity.MODERATE,
    )
    assert json.loads(json.dumps(ghsa.to_dict()))["severity"] == "HIGH"
    assert sum("malformed OSV record" in r.getMessage() for r in caplog.records) == 3


def test_malformed_records_become_warnings(tmp_path: Path) -> None:
    db = load_osv(_export(tmp_path / "osv"))
    assert sorted(w.split(":")[0] for w in db.warnings) == sorted(MALFORMED)
    assert len(db.advisories) == len(RECORDS) - 1  # the withdrawn one is dropped


def test_severity_policy(tmp_path: Path, fleet: list[tuple[str, bytes]]) -> None:
    matches = match_osv(fleet, load_osv(_export(tmp_path / "osv")))
    blocking = {m.vuln_id for m in matches if severity_at_least(m, "high")}
    assert blocking == {"GHSA-aaaa-bbbb-cccc", "PYSEC-2026-1", "OSV-2026-7"}  # unknown fails closed
    assert not any(
        severity_at_least(m, Severity.CRITICAL, unknown=False)
        for m in matches
        if m.vuln_id == "OSV-2026-7"
    )
    with pytest.raises(ValueError, match="unknown severity"):
        severity_at_least(matches[0], "urgent")


def test_zip_export_and_bounds(tmp_path: Path, fleet: list[tuple[str, bytes]]) -> None:
    osv = _export(tmp_path / "osv")
    archive = tmp_path / "all.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(osv.rglob("*.json")):
            zf.write(p, p.relative_to(osv).as_posix())
    assert match_osv(fleet, archive) == match_osv(fleet, osv)
    with pytest.raises(SbomError, match="more than 3 records"):
        load_osv(osv, limits=SbomLimits(max_osv_files=3))
    with pytest.raises(SbomError, match="exceeds"):
        load_osv(archive, limits=SbomLimits(max_osv_total_bytes=100))
    small = load_osv(osv, limits=SbomLimits(max_osv_file_bytes=200))
    assert any("larger than 200 bytes" in w for w in small.warnings)
    with pytest.raises(SbomError, match="neither a folder nor a zip"):
        load_osv(tmp_path / "missing")


def test_invalid_sbom_names_its_release(tmp_path: Path) -> None:
    with pytest.raises(SbomError, match=r"SBOM of bad@1\.0\.0"):
        match_osv([("bad@1.0.0", b"{}")], _export(tmp_path / "osv"))


@pytest.mark.parametrize(
    ("vector", "score"),
    [
        (CRITICAL_V3, 9.8),
        ("CVSS:3.1/AV:N/AC:L/PR:L/UI:N/S:C/C:L/I:L/A:N", 6.4),
        ("CVSS:3.0/AV:L/AC:L/PR:L/UI:N/S:U/C:H/I:N/A:N", 5.5),
        ("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:C/C:H/I:H/A:H", 10.0),
        ("CVSS:3.1/AV:P/AC:H/PR:H/UI:R/S:U/C:N/I:N/A:N", 0.0),
        ("AV:N/AC:L/Au:N/C:P/I:P/A:P", 7.5),
        ("CVSS:4.0/AV:N/AC:L/AT:N/PR:N/UI:N/VC:H/VI:H/VA:H/SC:N/SI:N/SA:N", None),
        ("CVSS:3.1/AV:N/AC:L", None),
        ("garbage", None),
    ],
)
def test_cvss_base_scores(vector: str, score: float | None) -> None:
    assert cvss_base_score(vector) == score


# -- issue 12 item 3: a model's runtime is a PEP 440 range, not a version ------------------

# OSV 1.6 records as the GitHub advisory database exports them (fields and nesting as in
# osv.dev's PyPI exports; the ids are this test's own).
GHSA_ORT_RANGE: dict[str, Any] = {
    "schema_version": "1.6.0",
    "id": "GHSA-t3st-ort0-0001",
    "modified": "2026-03-02T10:11:12Z",
    "published": "2026-03-01T09:00:00Z",
    "aliases": ["CVE-2026-10001"],
    "summary": "Out-of-bounds read in a tensor kernel",
    "details": "Crafted models trigger an out-of-bounds read.",
    "severity": [{"type": "CVSS_V3", "score": "CVSS:3.1/AV:N/AC:L/PR:N/UI:R/S:U/C:H/I:N/A:H"}],
    "affected": [
        {
            "package": {"ecosystem": "PyPI", "name": "onnxruntime", "purl": "pkg:pypi/onnxruntime"},
            "ranges": [{"type": "ECOSYSTEM",
                        "events": [{"introduced": "1.16.0"}, {"fixed": "1.17.3"}]}],
            "database_specific": {"source": "https://github.com/advisories/GHSA-t3st-ort0-0001"},
        }
    ],
    "references": [{"type": "ADVISORY", "url": "https://nvd.nist.gov/vuln/detail/CVE-2026-10001"}],
    "database_specific": {"cwe_ids": ["CWE-125"], "severity": "HIGH", "github_reviewed": True},
}  # fmt: skip
PYSEC_ORT_OLD: dict[str, Any] = {
    "schema_version": "1.6.0",
    "id": "PYSEC-2026-77",
    "modified": "2026-01-05T00:00:00Z",
    "affected": [
        {
            "package": {"ecosystem": "PyPI", "name": "onnxruntime"},
            "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "1.12.0"}]}],
            "versions": ["1.10.0", "1.11.0", "1.11.1"],
        }
    ],
}  # fmt: skip


def _range_sbom(tmp_path: Path, runtime_range: str) -> bytes:
    """An ML-BOM whose runtime is only a range (what ``ota publish`` wrote before)."""
    model = write_mlp(tmp_path / "model" / "model.onnx")
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    return build_mlbom(name="detector", version="2.0.0", model_path=model,
                       files={"model/model.onnx": (sha, model.stat().st_size)},
                       runtime_range=runtime_range, runtime_version=None)  # fmt: skip


def _write_records(folder: Path, *records: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for r in records:
        (folder / f"{r['id']}.json").write_text(json.dumps(r))
    return folder


@pytest.mark.parametrize(
    ("runtime_range", "expected", "admits"),
    [
        (">=1.16", {"GHSA-t3st-ort0-0001"}, ">=1.16.0,<1.17.3"),
        (">=1.16,<2", {"GHSA-t3st-ort0-0001"}, ">=1.16.0,<1.17.3"),
        ("~=1.17.0", {"GHSA-t3st-ort0-0001"}, ">=1.16.0,<1.17.3"),
        ("==1.17.*", {"GHSA-t3st-ort0-0001"}, ">=1.16.0,<1.17.3"),
        (">=1.17.3,<2", set(), ""),  # starts at the fix
        (">=1.12,<1.16", set(), ""),  # between the two records
        (">1.11,<1.16", {"PYSEC-2026-77"}, "==1.11.1"),  # 1.11.1 > 1.11
        ("<=1.16.0", {"GHSA-t3st-ort0-0001", "PYSEC-2026-77"}, "<1.12.0"),
        (">=1.11.1,!=1.11.1,<1.12", {"PYSEC-2026-77"}, "==1.11.1; <1.12.0"),  # != is ignored
    ],
)
def test_a_runtime_range_matches_conservatively(
    tmp_path: Path, runtime_range: str, expected: set[str], admits: str
) -> None:
    osv = _write_records(tmp_path / "osv", GHSA_ORT_RANGE, PYSEC_ORT_OLD)
    matches = match_osv([("detector@2.0.0", _range_sbom(tmp_path, runtime_range))], osv)
    assert {m.vuln_id for m in matches} == expected
    for m in matches:
        assert m.is_range and m.version == runtime_range
        assert m.note.startswith(f"range {runtime_range} admits affected versions ")
        assert m.to_dict()["range"] is True
    if admits:
        assert any(admits in m.note for m in matches), [m.note for m in matches]


def test_range_match_reports_fix_and_severity(tmp_path: Path) -> None:
    osv = _write_records(tmp_path / "osv", GHSA_ORT_RANGE)
    (m,) = match_osv([("detector@2.0.0", _range_sbom(tmp_path, ">=1.16,<2"))], osv)
    assert m.note == "range >=1.16,<2 admits affected versions >=1.16.0,<1.17.3"
    assert m.fixed == ("1.17.3",) and m.severity is Severity.HIGH
    assert severity_at_least(m, "high")


def test_an_exact_runtime_version_wins_over_its_range(tmp_path: Path) -> None:
    """The version a release was validated with is matched exactly (its range is not)."""
    osv = _write_records(tmp_path / "osv", GHSA_ORT_RANGE)
    clean = _sbom(tmp_path, "1.0.0", "1.25.0")  # range >=1.16,<2 admits the advisory
    hit = _sbom(tmp_path, "1.0.1", "1.17.0")
    matches = match_osv([("detector@1.0.0", clean), ("detector@1.0.1", hit)], osv)
    assert [(m.release, m.version, m.note) for m in matches] == [("detector@1.0.1", "1.17.0", "")]
