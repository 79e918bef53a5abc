"""The keyed OpenSSF model signature of precomputed digests, made without ``model_signing``.

Importing ``model_signing`` (any of its modules: its package imports ``model_signing.signing``)
pulls sigstore, sigstore_models, pydantic, requests and rekor_types: about 0.5 s of CPU in a
fresh ``ota publish``, which only ever signs digests it has computed, with a key file (issue 13).
This module writes the same signature from the standard library and pyca/cryptography, the
signing twin of :mod:`ota.signing._light_verify`.

Invariants (``tests/test_light_sign.py`` compares with ``model_signing`` 1.1 on the same input):

* the DSSE payload is the in-toto statement upstream's ``signing.Config()
  .use_elliptic_key_signer(...)`` signs for the same manifest, equal as JSON (same fields, same
  values, resources in the same order) and laid out as upstream's ``json_format.MessageToJson``
  (two-space indent): resources sorted by ``PurePosixPath`` as upstream's manifest sorts its
  items, the subject digest sha256 over the raw resource digests in that order. (Upstream's key
  order inside the predicate is protobuf map order, which varies between processes; verifiers
  parse the JSON, so ours sorts those keys);
* the bundle (media type, key hint, empty transparency log, one DSSE signature with keyid "")
  equals upstream's field for field; only the ECDSA signature bytes differ (ECDSA is randomised:
  two upstream signatures of the same input differ as well);
* the ECDSA signature is over DSSE's pre-authentication encoding with the hash upstream pairs
  with the key's curve (P-256: SHA-256, P-384: SHA-384, P-521: SHA-512);
* imports none of model_signing, sigstore, sigstore_models, google.protobuf, pydantic.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from pathlib import PurePosixPath

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
# the hash upstream pairs with each curve; shared with the verifying twin, _light_verify
CURVE_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "secp256r1": hashes.SHA256,
    "secp384r1": hashes.SHA384,
    "secp521r1": hashes.SHA512,
}


def statement_payload(digests: Mapping[str, str], signature_name: str, model_name: str) -> bytes:
    """The in-toto statement upstream signs for these file digests (see the invariants).
    ``digests`` must be checked already (bundle paths to 64 lowercase hex digits)."""
    names = sorted(digests, key=PurePosixPath)
    root = hashlib.sha256()
    for name in names:
        root.update(bytes.fromhex(digests[name]))
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": model_name, "digest": {"sha256": root.hexdigest()}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "resources": [{"algorithm": "sha256", "digest": digests[n], "name": n} for n in names],
            "serialization": {
                "allow_symlinks": False,
                "hash_type": "sha256",
                "ignore_paths": [signature_name],
                "method": "files",
            },
        },
    }
    return json.dumps(statement, indent=2, ensure_ascii=False).encode("utf-8")


def pae(payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding of an in-toto payload."""
    kind = PAYLOAD_TYPE.encode()
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


def key_hint(public_key: ec.EllipticCurvePublicKey) -> str:
    """model_signing's key hint: hex sha256 of the key's PEM SubjectPublicKeyInfo."""
    pem = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(pem).hexdigest()


def signature_bundle(
    digests: Mapping[str, str],
    private_key: ec.EllipticCurvePrivateKey,
    *,
    signature_name: str,
    model_name: str,
) -> bytes:
    """The signature file's bytes: a Sigstore bundle v0.3 (compact JSON) holding one DSSE
    envelope over :func:`statement_payload`, signed with ``private_key`` (P-256/384/521, checked
    by the caller)."""
    payload = statement_payload(digests, signature_name, model_name)
    algorithm = CURVE_HASHES[private_key.curve.name]()
    sig = private_key.sign(pae(payload), ec.ECDSA(algorithm))
    bundle = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {
            "publicKey": {"hint": key_hint(private_key.public_key())},
            "tlogEntries": [],
        },
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode("ascii"),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"sig": base64.b64encode(sig).decode("ascii"), "keyid": ""}],
        },
    }
    return json.dumps(bundle, separators=(",", ":")).encode("utf-8")
