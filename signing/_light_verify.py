"""Device-side check of a bundle's OpenSSF model signature without ``model_signing`` (decision 9).

:func:`verify_digests_light` has the contract of :func:`~ota.signing.verify_digests` but reads the
signature itself instead of importing ``model_signing``, whose import alone pulls sigstore,
sigstore_models, pydantic, protobuf, requests and rekor_types (about 24 MiB of RSS on a device).
It accepts only the format :func:`~ota.signing.sign_digests` and :func:`~ota.signing.sign_bundle`
write: a Sigstore bundle v0.3 (JSON) holding one DSSE envelope, signed by an ECDSA key, over an
in-toto Statement v1 with the model-signing v1.0 predicate, file serialization with sha256.

The DSSE pre-authentication encoding comes from securesystemslib (``dsse.Envelope.pae``), the
ECDSA check from pyca/cryptography with the hash upstream pairs with the key's curve (P-256:
SHA-256, P-384: SHA-384, P-521: SHA-512); the subject digest is recomputed as upstream does
(sha256 over the raw resource digests, in the order they are signed).

Invariants:

* Raises, never returns False; fails closed. Refused: an unknown, missing or duplicate JSON key at
  any level; another media type or payload type; zero or several signatures; a ``keyid`` other
  than ``""``; a key hint other than the trusted key's; another statement or predicate type;
  several subjects; serialization other than exactly ``files`` / sha256 / no symlinks /
  ``ignore_paths == [signature_name]``; a resource that is not sha256 (64 lowercase hex); an
  unsafe, duplicate or self-naming resource; more than ``Limits.max_files`` resources; a subject
  digest that does not match the resources; a signature over ``MAX_SIGNATURE_BYTES``.
* Nothing in the statement is parsed before the signature over it verifies with the trusted key;
  the envelope itself is parsed under a small bound on JSON structure (no memory blow-up).
* Accepts only if the signed resources equal ``digests`` exactly: the same paths, the same values.
* Never looser than upstream ``model_signing`` 1.1 (``verify key``) with our hashing config;
  stricter where upstream is lenient for other producers: a missing key hint, the pre-1.0 PAE,
  the v0.1 predicate, non-canonical base64, snake_case aliases, extra statement fields, a
  second signature, ``ignore_paths`` or ``allow_symlinks`` other than ours.
* Imports none of model_signing, sigstore, sigstore_models, google.protobuf, pydantic, requests,
  in_toto_attestation, rekor_types (``tests/test_light_verify.py`` proves it in a child process).
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from securesystemslib.dsse import Envelope

from ota.bundle import DEFAULT_LIMITS, FormatError, strict_json, validate_bundle_path
from ota.signing._errors import SignatureError
from ota.signing._keys import key_fingerprint
from ota.signing._light_sign import BUNDLE_MEDIA_TYPE as _BUNDLE_MEDIA_TYPE
from ota.signing._light_sign import CURVE_HASHES as _CURVE_HASHES
from ota.signing._light_sign import PAYLOAD_TYPE as _PAYLOAD_TYPE
from ota.signing._light_sign import PREDICATE_TYPE as _PREDICATE_TYPE
from ota.signing._light_sign import STATEMENT_TYPE as _STATEMENT_TYPE
from ota.signing._model_sig import (
    MAX_SIGNATURE_BYTES,
    SignerInfo,
    _check_digest_map,
    _check_same_files,
    _load_ec_public_key,
    _signature_name,
)

_HEX64_RE = re.compile(r"[0-9a-f]{64}")  # always fullmatch: `$` would allow a trailing newline
_MAX_RESOURCES = DEFAULT_LIMITS.max_files
# JSON structure characters ({ [ , :) allowed before parsing: our envelope has about 25, a
# statement about 7 per resource. Bounds the objects json.loads may allocate for hostile input.
_MAX_ENVELOPE_TOKENS = 128
_MAX_STATEMENT_TOKENS = 64 + 8 * _MAX_RESOURCES


def verify_digests_light(
    signature: bytes, public_key_pem: bytes, digests: Mapping[str, str], *, signature_name: str
) -> SignerInfo:
    """Verify a model signature against known sha256 digests, without importing model_signing.

    Same contract as :func:`~ota.signing.verify_digests`: for a device that has already checked
    every file's sha256 against the TUF-signed manifest. Accepts the signature only if it is by
    the trusted key, in exactly our format, and signs exactly ``digests``.

    Returns:
        Who signed (fingerprint of the trusted key), the signed files and the model name.

    Raises:
        SignatureError: oversized, malformed or unexpected signature; another key; a digest set
            that differs in any path or value from the signed one.
        ConfigError: ``public_key_pem`` is not an ECDSA P-256/384/521 public key.
        InputError: malformed ``digests`` or ``signature_name``.
    """
    public_key = _load_ec_public_key(public_key_pem)
    if len(signature) > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"signature of {len(signature)} bytes exceeds the limit")
    _check_digests(digests, signature_name)
    payload = _verified_payload(signature, public_key)
    model_name, files = _signed_files(payload, signature_name)
    _check_same_files(set(files), set(digests))
    changed = sorted(path for path, digest in files.items() if digests[path] != digest)
    if changed:
        raise SignatureError(
            f"bundle signature refused: files differ from the signature: changed "
            f"{', '.join(changed[:5])}"
        )
    return SignerInfo(
        key_fingerprint=key_fingerprint(public_key), files=files, model_name=model_name
    )


# -- helpers -------------------------------------------------------------------------------


def _check_digests(digests: Mapping[str, str], signature_name: str) -> None:
    """The checks ``verify_digests`` makes on its input (InputError)."""
    _signature_name(signature_name)
    _check_digest_map(digests, signature_name, "verify")


def _verified_payload(signature: bytes, public_key: ec.EllipticCurvePublicKey) -> bytes:
    """Check the bundle and its one DSSE signature with the trusted key; return the payload."""
    bundle = _fields(
        _json(signature, _MAX_ENVELOPE_TOKENS, "signature"),
        "signature bundle",
        {"mediaType", "verificationMaterial", "dsseEnvelope"},
    )
    if bundle["mediaType"] != _BUNDLE_MEDIA_TYPE:
        raise SignatureError(f"unsupported signature media type {bundle['mediaType']!r:.80}")
    material = _fields(
        bundle["verificationMaterial"],
        "verification material",
        {"publicKey"},
        optional=("tlogEntries",),
    )
    if material.get("tlogEntries", []) != []:
        raise SignatureError("a keyed model signature carries no transparency log entries")
    hint = _fields(material["publicKey"], "public key identifier", {"hint"})["hint"]
    if hint != _key_hint(public_key):  # upstream: "Key mismatch" (the hint is not signed)
        raise SignatureError("bundle signature refused: Key mismatch, signed by another key")
    envelope = _fields(
        bundle["dsseEnvelope"], "DSSE envelope", {"payload", "payloadType", "signatures"}
    )
    if envelope["payloadType"] != _PAYLOAD_TYPE:
        raise SignatureError(f"unexpected DSSE payload type {envelope['payloadType']!r:.80}")
    signatures = envelope["signatures"]
    if not isinstance(signatures, list) or len(signatures) != 1:
        raise SignatureError("a model signature must hold exactly one DSSE signature")
    entry = _fields(signatures[0], "DSSE signature", {"sig"}, optional=("keyid",))
    if entry.get("keyid", "") != "":
        raise SignatureError(f"unexpected DSSE keyid {entry['keyid']!r:.80}")
    payload, sig = _b64(envelope["payload"], "payload"), _b64(entry["sig"], "signature")
    pae = Envelope(payload, _PAYLOAD_TYPE, {}).pae()
    try:
        public_key.verify(sig, pae, ec.ECDSA(_CURVE_HASHES[public_key.curve.name]()))
    except InvalidSignature as e:
        raise SignatureError(
            "bundle signature refused: the signature does not verify with the trusted key"
        ) from e
    return payload


def _signed_files(payload: bytes, signature_name: str) -> tuple[str, dict[str, str]]:
    """Read a verified statement: the model name and the signed files, in signed order."""
    statement = _fields(
        _json(payload, _MAX_STATEMENT_TOKENS, "statement"),
        "statement",
        {"_type", "subject", "predicateType", "predicate"},
    )
    if statement["_type"] != _STATEMENT_TYPE:
        raise SignatureError(f"unexpected statement type {statement['_type']!r:.80}")
    if statement["predicateType"] != _PREDICATE_TYPE:
        raise SignatureError(f"unexpected predicate type {statement['predicateType']!r:.80}")
    subjects = statement["subject"]
    if not isinstance(subjects, list) or len(subjects) != 1:
        raise SignatureError("a model signature must have exactly one subject")
    subject = _fields(subjects[0], "subject", {"name", "digest"})
    model_name, root = subject["name"], _fields(subject["digest"], "subject digest", {"sha256"})
    if not isinstance(model_name, str):
        raise SignatureError("the subject's name is not a string")
    predicate = _fields(statement["predicate"], "predicate", {"serialization", "resources"})
    _check_serialization(predicate["serialization"], signature_name)
    files = _resources(predicate["resources"], signature_name)
    # model_signing's root digest: sha256 over the raw resource digests, in signed order.
    hasher = hashlib.sha256()
    for digest in files.values():
        hasher.update(bytes.fromhex(digest))
    if root["sha256"] != hasher.hexdigest():
        raise SignatureError("the subject digest does not match the signed resources")
    return model_name, files


def _check_serialization(value: object, signature_name: str) -> None:
    ser = _fields(value, "serialization", {"method", "hash_type", "allow_symlinks", "ignore_paths"})
    if (
        ser["method"] != "files"
        or ser["hash_type"] != "sha256"
        or ser["allow_symlinks"] is not False
        or ser["ignore_paths"] != [signature_name]
    ):
        raise SignatureError(f"unsupported signature serialization {ser!r:.200}")


def _resources(value: object, signature_name: str) -> dict[str, str]:
    if not isinstance(value, list) or not 0 < len(value) <= _MAX_RESOURCES:
        raise SignatureError(f"a model signature must sign 1 to {_MAX_RESOURCES} files")
    files: dict[str, str] = {}
    for item in value:
        resource = _fields(item, "resource", {"name", "algorithm", "digest"})
        name, digest = resource["name"], resource["digest"]
        try:
            validate_bundle_path(name)
        except FormatError as e:
            raise SignatureError(f"unsafe signed path: {e}") from e
        if resource["algorithm"] != "sha256" or not (
            isinstance(digest, str) and _HEX64_RE.fullmatch(digest)
        ):
            raise SignatureError(f"unexpected digest for {name!r:.80}")
        if name == signature_name or name in files:
            raise SignatureError(f"signed twice or signs itself: {name!r:.80}")
        files[name] = digest
    return files


def _fields(
    value: object, what: str, required: set[str], *, optional: tuple[str, ...] = ()
) -> dict[str, Any]:
    """``value`` as a JSON object with all ``required`` keys and no key outside ``optional``."""
    if not isinstance(value, dict):
        raise SignatureError(f"malformed signature: the {what} is not an object")
    keys = set(value)
    if not required <= keys or not keys <= required.union(optional):
        raise SignatureError(
            f"malformed signature: {what} fields {sorted(keys)!r:.200}, expected "
            f"{sorted(required)} (and optionally {sorted(optional)})"
        )
    return value


def _json(raw: bytes, max_tokens: int, what: str) -> Any:
    """Parse strict UTF-8 JSON with unique keys and no NaN, after bounding its structure."""
    if sum(raw.count(c) for c in (b"{", b"[", b",", b":")) > max_tokens:
        raise SignatureError(f"malformed signature: the {what} has too many JSON elements")
    try:
        return strict_json(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError, JSONDecodeError, ours
        raise SignatureError(f"malformed signature: the {what} is not JSON ({e})") from e


def _b64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise SignatureError(f"malformed signature: the DSSE {what} is not a string")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError as e:  # binascii.Error, or a non-ASCII string
        raise SignatureError(f"malformed signature: the DSSE {what} is not base64") from e


def _key_hint(public_key: ec.EllipticCurvePublicKey) -> str:
    """model_signing's key hint: hex sha256 of the key's PEM SubjectPublicKeyInfo."""
    pem = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(pem).hexdigest()
