"""``sign_digests`` without ``model_signing``: the same signature upstream makes, and no Sigstore.

Upstream's signature of the same digests is made here with ``model_signing`` itself (its public
``signing.Config`` with the precomputed manifest, as ``sign_digests`` did before issue 13); the
signed statement must equal upstream's as JSON, resources in the same order (upstream's key order
inside the predicate is protobuf map order, which varies between processes), and the bundle
field for field except the (randomised) ECDSA signature; upstream's verifier must accept ours on
the real files.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ota.errors import ConfigError, InputError
from ota.signing import SignatureError, _model_sig, sign_digests, verify_bundle, verify_digests

SIG = "model.sig"
# Names whose order differs between str and PurePosixPath sorting ("a.txt" < "a/b" as strings,
# ("a",) < ("a.txt",) as paths), nested folders (bundle paths are ASCII).
NAMES = ("a.txt", "a/b", "a-b/c.bin", "release.json", "model/model.onnx", "Z/upper", "b_c.bin")
CURVES = {"p256": ec.SECP256R1(), "p384": ec.SECP384R1(), "p521": ec.SECP521R1()}


def _key(tmp_path: Path, curve: str) -> tuple[Path, bytes]:
    key = ec.generate_private_key(CURVES[curve])
    path = tmp_path / f"{curve}.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return path, pem


def _upstream_signature(digests: dict[str, str], key: Path, model_name: str) -> bytes:
    """What ``model_signing`` 1.1 writes for these digests (its signing.Config, our manifest)."""
    signing = _model_sig._upstream("signing")
    manifest = _model_sig._manifest_from_digests(digests, SIG, model_name)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / SIG
        signing.Config().use_elliptic_key_signer(private_key=key).set_hashing_config(
            _model_sig._FixedManifest(manifest)
        ).sign(Path(tmp) / model_name, out)
        return out.read_bytes()


def _without_sig(bundle: bytes) -> dict[str, Any]:
    """The bundle with its signature and payload blanked (the payload is compared as JSON)."""
    doc: dict[str, Any] = json.loads(bundle)
    doc["dsseEnvelope"]["payload"] = "-"
    for entry in doc["dsseEnvelope"]["signatures"]:
        entry["sig"] = "-"
    return doc


def _payload(bundle: bytes) -> bytes:
    return base64.b64decode(json.loads(bundle)["dsseEnvelope"]["payload"], validate=True)


@pytest.mark.parametrize("curve", sorted(CURVES))
def test_same_statement_and_bundle_as_upstream(tmp_path: Path, curve: str) -> None:
    key, pem = _key(tmp_path, curve)
    digests = {n: hashlib.sha256(n.encode()).hexdigest() for n in NAMES}
    ours = sign_digests(digests, key, tmp_path / SIG, model_name="m-1.0.0").read_bytes()
    theirs = _upstream_signature(digests, key, "m-1.0.0")
    ours_statement, their_statement = json.loads(_payload(ours)), json.loads(_payload(theirs))
    assert ours_statement == their_statement
    order = [r["name"] for r in ours_statement["predicate"]["resources"]]
    assert order == [r["name"] for r in their_statement["predicate"]["resources"]]
    assert order[:3] == ["Z/upper", "a/b", "a-b/c.bin"]  # PurePosixPath order, not str order
    assert _without_sig(ours) == _without_sig(theirs)
    assert ours != theirs  # a fresh ECDSA signature, not a copy of upstream's
    for signature in (ours, theirs):
        info = verify_digests(signature, pem, digests, signature_name=SIG)
        assert dict(info.files) == digests and info.model_name == "m-1.0.0"


def test_upstream_verifies_ours_on_the_real_files_and_refuses_a_changed_one(
    tmp_path: Path,
) -> None:
    key, pem = _key(tmp_path, "p256")
    bundle = tmp_path / "bundle"
    digests = {}
    for name in NAMES:
        path = bundle / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode() * 1000)
        digests[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    sign_digests(digests, key, bundle / SIG)
    info = verify_bundle(bundle, pem)  # upstream re-hashes every file
    assert dict(info.files) == digests
    (bundle / "model/model.onnx").write_bytes(b"tampered")
    with pytest.raises(SignatureError):
        verify_bundle(bundle, pem)


def test_another_key_is_refused(tmp_path: Path) -> None:
    key, _ = _key(tmp_path, "p256")
    _, other_pem = _key(tmp_path / ".." / tmp_path.name, "p384")
    digests = {"release.json": "ab" * 32}
    sig = sign_digests(digests, key, tmp_path / SIG).read_bytes()
    with pytest.raises(SignatureError):
        verify_digests(sig, other_pem, digests, signature_name=SIG)


def test_bad_input_is_refused_before_signing(tmp_path: Path) -> None:
    key, _ = _key(tmp_path, "p256")
    with pytest.raises(InputError):
        sign_digests({"../escape": "ab" * 32}, key, tmp_path / SIG)
    with pytest.raises(InputError):
        sign_digests({"a": "AB" * 32}, key, tmp_path / SIG)  # not lowercase hex
    with pytest.raises(InputError):
        sign_digests({SIG: "ab" * 32}, key, tmp_path / SIG)  # signs itself
    with pytest.raises(InputError):
        sign_digests({}, key, tmp_path / SIG)
    rsa = tmp_path / "not-ec.pem"
    rsa.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError):
        sign_digests({"a": "ab" * 32}, rsa, tmp_path / SIG)
    assert not (tmp_path / SIG).exists()


def test_signing_imports_no_sigstore(tmp_path: Path) -> None:
    key, _ = _key(tmp_path, "p256")
    code = (
        "import sys; from pathlib import Path; from ota.signing import sign_digests\n"
        f"sign_digests({{'a.bin': 'ab' * 32}}, Path({str(key)!r}), Path({str(tmp_path / SIG)!r}))\n"
        "heavy = ('model_signing', 'sigstore', 'sigstore_models', 'pydantic', 'requests',"
        " 'rekor_types', 'in_toto_attestation')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert (tmp_path / SIG).stat().st_size > 0
