"""in-toto / SLSA provenance of a bundle, signed as a DSSE envelope (design decision 9).

The statement is an in-toto Statement v1 whose subjects are the bundle's files (path and
sha256) and whose predicate is SLSA Provenance v1: what was built from what (source model,
training data, lineage) by which builder with which parameters. It carries no timestamps, so the
same inputs give the same statement.

Signing and verifying use securesystemslib's DSSE ``Envelope`` (its PAE, its key
verification); nothing here touches a signature byte.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from securesystemslib.dsse import Envelope
from securesystemslib.exceptions import FormatError as SslibFormatError
from securesystemslib.exceptions import VerificationError
from securesystemslib.signer import Key, Signer

from ota.bundle import FormatError, canonical_json, validate_bundle_path
from ota.errors import ConfigError, InputError
from ota.signing._errors import ProvenanceError

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
SLSA_PROVENANCE_V1 = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://edge-ota.dev/bundle-build/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
MAX_ENVELOPE_BYTES = 1024 * 1024
ROLE_ANNOTATION = "edge-ota.role"

_HEX64_RE = re.compile(r"^[0-9a-f]{64}\Z")
_DIGEST_SUFFIX_RE = re.compile(r"^(?P<uri>.+)@sha256:(?P<hex>[0-9a-f]{64})\Z")


def make_provenance(
    *,
    subject_digests: Mapping[str, str],
    builder_id: str,
    source_model_digest: str | None,
    training_data: list[str],
    lineage: list[str],
    build_params: Mapping[str, Any],
) -> dict[str, Any]:
    """Build the in-toto Statement v1 with a SLSA Provenance v1 predicate for one bundle.

    Args:
        subject_digests: bundle path -> sha256 hex of every file the statement is about.
        builder_id: URI of the build platform (``runDetails.builder.id``).
        source_model_digest: sha256 (hex, optionally ``sha256:``-prefixed) of the source model;
            empty or None for bundles without one (runtime bundles): no source-model entry.
        training_data: URIs of training data sets, each optionally pinned as
            ``<uri>@sha256:<hex>``.
        lineage: URIs of the models this one derives from (same pinning form).
        build_params: the build's external parameters; must be JSON-serialisable.

    Returns:
        The statement as a JSON-ready dict; subjects sorted by name.

    Raises:
        InputError: an empty or unsafe subject, a malformed digest, an empty builder id or URI,
            or parameters that are not JSON.
    """
    if not subject_digests:
        raise InputError("provenance needs at least one subject")
    subjects = [
        {"name": _subject_path(name), "digest": {"sha256": _hex(subject_digests[name], name)}}
        for name in sorted(subject_digests)
    ]
    if not isinstance(builder_id, str) or not builder_id.strip():
        raise InputError("provenance needs a builder id (a URI)")
    try:
        params = json.loads(canonical_json(dict(build_params)))
    except (TypeError, ValueError) as e:
        raise InputError(f"build parameters are not JSON-serialisable: {e}") from e
    dependencies: list[dict[str, Any]] = []
    if source_model_digest:
        source = source_model_digest.removeprefix("sha256:")
        dependencies.append(
            {
                "name": "source-model",
                "digest": {"sha256": _hex(source, "source model")},
                "annotations": {ROLE_ANNOTATION: "source-model"},
            }
        )
    dependencies += [_dependency(u, "training-data") for u in training_data]
    dependencies += [_dependency(u, "lineage") for u in lineage]
    return {
        "_type": STATEMENT_TYPE,
        "subject": subjects,
        "predicateType": SLSA_PROVENANCE_V1,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": params,
                "internalParameters": {},
                "resolvedDependencies": dependencies,
            },
            "runDetails": {"builder": {"id": builder_id}, "metadata": {}},
        },
    }


def sign_provenance(statement: Mapping[str, Any], signer: Signer) -> bytes:
    """Sign a statement into a DSSE envelope (JSON bytes, for ``provenance.intoto.json``).

    The payload is the canonical JSON of ``statement``; the signature's keyid is the signer's.

    Raises:
        InputError: the statement is not JSON-serialisable.
        Whatever the signer raises (see :func:`ota.signing.load_signer`).
    """
    try:
        payload = canonical_json(dict(statement))
    except (TypeError, ValueError) as e:
        raise InputError(f"statement is not JSON-serialisable: {e}") from e
    envelope = Envelope(payload=payload, payload_type=PAYLOAD_TYPE, signatures={})
    envelope.sign(signer)
    return canonical_json(envelope.to_dict())


def verify_provenance(
    envelope_bytes: bytes,
    public_keys: Sequence[Key],
    *,
    expected_subjects: Mapping[str, str],
    threshold: int = 1,
    max_bytes: int = MAX_ENVELOPE_BYTES,
) -> dict[str, Any]:
    """Verify a provenance envelope and that it speaks about exactly ``expected_subjects``.

    Checks, in order: size, envelope shape, payload type, ``threshold`` signatures by distinct
    ``public_keys`` (DSSE PAE), statement and predicate types, and subject set equality (same
    paths, same sha256, no duplicates).

    Returns:
        The verified statement.

    Raises:
        ProvenanceError: anything above fails.
        ConfigError: no trusted key, or a threshold that cannot be met by the keys given.
    """
    if not public_keys or not 0 < threshold <= len(public_keys):
        raise ConfigError(
            f"cannot verify provenance with {len(public_keys)} keys and threshold {threshold}",
            remedy="configure the provenance signing keys",
        )
    if len(envelope_bytes) > max_bytes:
        raise ProvenanceError(
            f"provenance envelope of {len(envelope_bytes)} bytes exceeds {max_bytes}"
        )
    try:
        doc = json.loads(envelope_bytes)
        if not isinstance(doc, dict) or not isinstance(doc.get("signatures"), list):
            raise ProvenanceError("provenance is not a DSSE envelope")
        envelope = Envelope.from_dict(doc)
    except (ValueError, KeyError, TypeError, AttributeError, SslibFormatError) as e:
        raise ProvenanceError(f"malformed provenance envelope: {e}") from e
    if envelope.payload_type != PAYLOAD_TYPE:
        raise ProvenanceError(f"unexpected provenance payload type {envelope.payload_type!r:.80}")
    try:
        envelope.verify(list(public_keys), threshold)
    except VerificationError as e:
        raise ProvenanceError(f"provenance signature refused: {e}") from e
    try:
        statement = json.loads(envelope.payload)
    except ValueError as e:
        raise ProvenanceError(f"provenance payload is not JSON: {e}") from e
    if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE:
        raise ProvenanceError("provenance payload is not an in-toto Statement v1")
    if statement.get("predicateType") != SLSA_PROVENANCE_V1:
        raise ProvenanceError(f"unexpected predicate type {statement.get('predicateType')!r:.80}")
    _check_subjects(statement.get("subject"), expected_subjects)
    return statement


def _check_subjects(raw: object, expected: Mapping[str, str]) -> None:
    if not isinstance(raw, list):
        raise ProvenanceError("provenance has no subject list")
    signed: dict[str, str] = {}
    for s in raw:
        if not isinstance(s, dict) or not isinstance(s.get("digest"), dict):
            raise ProvenanceError("malformed provenance subject")
        name, digest = s.get("name"), s["digest"].get("sha256")
        if not isinstance(name, str) or not isinstance(digest, str) or name in signed:
            raise ProvenanceError(f"bad or duplicate provenance subject {name!r:.80}")
        signed[name] = digest
    if signed != dict(expected):
        keys = signed.keys() | expected.keys()
        differ = sorted(k for k in keys if signed.get(k) != expected.get(k))
        raise ProvenanceError(f"provenance subjects differ from the bundle: {differ[:5]}")


def _dependency(ref: str, role: str) -> dict[str, Any]:
    if not isinstance(ref, str) or not ref.strip() or len(ref) > 2048:
        raise InputError(f"bad {role} reference {ref!r:.80}")
    dep: dict[str, Any] = {"uri": ref, "annotations": {ROLE_ANNOTATION: role}}
    m = _DIGEST_SUFFIX_RE.match(ref)
    if m:
        dep["uri"] = m["uri"]
        dep["digest"] = {"sha256": m["hex"]}
    return dep


def _subject_path(name: str) -> str:
    try:
        return validate_bundle_path(name)
    except FormatError as e:
        raise InputError(str(e)) from e


def _hex(value: object, what: str) -> str:
    if not isinstance(value, str) or not _HEX64_RE.match(value):
        raise InputError(f"bad sha256 digest for {what}: {value!r:.80}")
    return value
