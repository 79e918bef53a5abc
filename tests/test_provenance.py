"""in-toto / SLSA provenance: statement shape, DSSE signing, and every refusal."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner

from ota.errors import ConfigError, InputError, SecurityError
from ota.signing import (
    SLSA_PROVENANCE_V1,
    STATEMENT_TYPE,
    ProvenanceError,
    load_signer,
    make_provenance,
    sign_provenance,
    verify_provenance,
)

SUBJECTS = {
    "model/model.onnx": "a" * 64,
    "release.json": "b" * 64,
    "sbom.cdx.json": "c" * 64,
}


def _statement(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "subject_digests": SUBJECTS,
        "builder_id": "https://ci.example.com/edge-ota/publisher@v1",
        "source_model_digest": "sha256:" + "d" * 64,
        "training_data": ["s3://datasets/imagenet-subset@sha256:" + "e" * 64, "hf://org/notes"],
        "lineage": ["oci://models/resnet50@sha256:" + "f" * 64],
        "build_params": {"quantize": "int8", "opset": 17, "epochs": 3},
    }
    args.update(overrides)
    return make_provenance(**args)


@pytest.fixture(scope="module")
def signer() -> CryptoSigner:
    return CryptoSigner.generate_ed25519()


def test_statement_is_in_toto_v1_with_slsa_v1_predicate() -> None:
    st = _statement()
    assert st["_type"] == STATEMENT_TYPE == "https://in-toto.io/Statement/v1"
    assert st["predicateType"] == SLSA_PROVENANCE_V1 == "https://slsa.dev/provenance/v1"
    assert st["subject"] == [
        {"name": k, "digest": {"sha256": v}} for k, v in sorted(SUBJECTS.items())
    ]
    build = st["predicate"]["buildDefinition"]
    assert build["buildType"].startswith("https://")
    assert build["externalParameters"] == {"quantize": "int8", "opset": 17, "epochs": 3}
    deps = build["resolvedDependencies"]
    roles = [d["annotations"]["edge-ota.role"] for d in deps]
    assert roles == ["source-model", "training-data", "training-data", "lineage"]
    assert deps[0]["digest"] == {"sha256": "d" * 64}
    assert deps[1] == {
        "uri": "s3://datasets/imagenet-subset",
        "digest": {"sha256": "e" * 64},
        "annotations": {"edge-ota.role": "training-data"},
    }
    assert "digest" not in deps[2]
    assert st["predicate"]["runDetails"]["builder"]["id"] == (
        "https://ci.example.com/edge-ota/publisher@v1"
    )
    assert json.dumps(_statement(), sort_keys=True) == json.dumps(st, sort_keys=True)


@pytest.mark.parametrize("source", ["", None])
def test_runtime_bundle_without_source_model(source: str | None) -> None:
    deps = _statement(source_model_digest=source)["predicate"]["buildDefinition"]
    roles = [d["annotations"]["edge-ota.role"] for d in deps["resolvedDependencies"]]
    assert "source-model" not in roles


@pytest.mark.parametrize(
    "overrides",
    [
        {"subject_digests": {}},
        {"subject_digests": {"../etc/passwd": "a" * 64}},
        {"subject_digests": {"x.bin": "A" * 64}},
        {"builder_id": " "},
        {"source_model_digest": "1234"},
        {"training_data": [""]},
        {"build_params": {"fn": object()}},
    ],
)
def test_make_provenance_rejects_bad_input(overrides: dict[str, Any]) -> None:
    with pytest.raises(InputError):
        _statement(**overrides)


def test_sign_and_verify_roundtrip(signer: CryptoSigner) -> None:
    envelope = sign_provenance(_statement(), signer)
    doc = json.loads(envelope)
    assert doc["payloadType"] == "application/vnd.in-toto+json"
    assert doc["signatures"][0]["keyid"] == signer.public_key.keyid
    verified = verify_provenance(envelope, [signer.public_key], expected_subjects=SUBJECTS)
    assert verified == _statement()


def test_sign_through_a_uri_signer(monkeypatch: pytest.MonkeyPatch) -> None:
    ec_signer = CryptoSigner.generate_ecdsa()
    monkeypatch.setenv("OTA_PROVENANCE_KEY", ec_signer.private_bytes.decode())
    loaded = load_signer("envvar:OTA_PROVENANCE_KEY", ec_signer.public_key)
    envelope = sign_provenance(_statement(), loaded)
    verify_provenance(envelope, [ec_signer.public_key], expected_subjects=SUBJECTS)


def test_threshold_of_two_keys(signer: CryptoSigner) -> None:
    second = CryptoSigner.generate_ed25519()
    envelope = sign_provenance(_statement(), signer)
    keys = [signer.public_key, second.public_key]
    with pytest.raises(ProvenanceError, match="threshold"):
        verify_provenance(envelope, keys, expected_subjects=SUBJECTS, threshold=2)
    doc = json.loads(envelope)
    doc["signatures"] += json.loads(sign_provenance(_statement(), second))["signatures"]
    both = json.dumps(doc).encode()
    verify_provenance(both, keys, expected_subjects=SUBJECTS, threshold=2)


def test_wrong_key_refused(signer: CryptoSigner) -> None:
    envelope = sign_provenance(_statement(), signer)
    other = CryptoSigner.generate_ed25519()
    with pytest.raises(ProvenanceError, match="signature refused") as exc:
        verify_provenance(envelope, [other.public_key], expected_subjects=SUBJECTS)
    assert isinstance(exc.value, SecurityError)


def test_tampered_payload_refused(signer: CryptoSigner) -> None:
    doc = json.loads(sign_provenance(_statement(), signer))
    statement = json.loads(base64.b64decode(doc["payload"]))
    statement["subject"][0]["digest"]["sha256"] = "0" * 64
    doc["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    with pytest.raises(ProvenanceError, match="signature refused"):
        verify_provenance(json.dumps(doc).encode(), [signer.public_key], expected_subjects=SUBJECTS)


@pytest.mark.parametrize(
    "expected",
    [
        dict(SUBJECTS, **{"release.json": "0" * 64}),  # other bytes
        dict(SUBJECTS, **{"extra.bin": "1" * 64}),  # a file the provenance does not cover
        {k: v for k, v in SUBJECTS.items() if k != "sbom.cdx.json"},  # covers another file
    ],
)
def test_subjects_must_match_exactly(signer: CryptoSigner, expected: dict[str, str]) -> None:
    envelope = sign_provenance(_statement(), signer)
    with pytest.raises(ProvenanceError, match="subjects differ"):
        verify_provenance(envelope, [signer.public_key], expected_subjects=expected)


def test_duplicate_subject_refused(signer: CryptoSigner) -> None:
    statement = _statement()
    statement["subject"].append(dict(statement["subject"][0]))
    envelope = sign_provenance(statement, signer)
    with pytest.raises(ProvenanceError, match="duplicate"):
        verify_provenance(envelope, [signer.public_key], expected_subjects=SUBJECTS)


def test_wrong_statement_or_predicate_type_refused(signer: CryptoSigner) -> None:
    for key, value in (("_type", "https://in-toto.io/Statement/v0.1"), ("predicateType", "x")):
        statement = dict(_statement(), **{key: value})
        envelope = sign_provenance(statement, signer)
        with pytest.raises(ProvenanceError):
            verify_provenance(envelope, [signer.public_key], expected_subjects=SUBJECTS)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[]",
        b'{"payload": "!!", "payloadType": "application/vnd.in-toto+json", "signatures": []}',
        b'{"payload": "e30=", "payloadType": "text/plain", "signatures": []}',
        b'{"payload": "e30=", "payloadType": "application/vnd.in-toto+json", "signatures": {}}',
        b'{"payload": "e30=", "payloadType": "application/vnd.in-toto+json", "signatures": []}',
    ],
)
def test_malformed_envelopes_refused(signer: CryptoSigner, data: bytes) -> None:
    with pytest.raises(ProvenanceError):
        verify_provenance(data, [signer.public_key], expected_subjects=SUBJECTS)


def test_size_is_bounded(signer: CryptoSigner) -> None:
    envelope = sign_provenance(_statement(), signer)
    with pytest.raises(ProvenanceError, match="exceeds"):
        verify_provenance(
            envelope, [signer.public_key], expected_subjects=SUBJECTS, max_bytes=len(envelope) - 1
        )


def test_no_keys_fails_closed(signer: CryptoSigner) -> None:
    envelope = sign_provenance(_statement(), signer)
    with pytest.raises(ConfigError):
        verify_provenance(envelope, [], expected_subjects=SUBJECTS)
    with pytest.raises(ConfigError):
        verify_provenance(envelope, [signer.public_key], expected_subjects=SUBJECTS, threshold=2)
