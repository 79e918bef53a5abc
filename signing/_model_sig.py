"""OpenSSF model signing of bundles, through the upstream ``model_signing`` library (decision 9).

A bundle's signature ``model.sig`` is a Sigstore bundle (v0.3, DSSE envelope, in-toto statement)
made by ``model_signing`` in file mode with sha256 over every file of the bundle directory except
the signature itself. It is byte-for-byte the format ``model_signing sign key`` writes, so the
upstream ``model_signing verify key`` accepts it.

Invariants:

* Signing covers every regular file under the bundle directory (no ignored ``.git`` paths); the
  signature records ``ignore_paths: [<signature name>]`` and nothing else.
* Verification raises, never returns False. It accepts a signature only if the upstream verifier
  accepts it with the given key **and** the signed file set equals the files present (no extra,
  no missing file; upstream would honour signed ``ignore_paths``, we do not).
* ``model_signing`` is imported lazily: importing :mod:`ota.signing` stays cheap.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import json
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ota._atomic import write_bytes
from ota.bundle import SIGNATURE_FILE, FormatError, validate_bundle_path
from ota.errors import ConfigError, InputError
from ota.signing._errors import SignatureError
from ota.signing._keys import key_fingerprint

# A bundle has at most 4096 files (ota.bundle.Limits); their signature is about 2.5 MiB. The
# bound keeps a hostile signature's parse within a device's memory budget.
MAX_SIGNATURE_BYTES = 4 * 1024 * 1024
_IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
_HEX64_RE = re.compile(r"^[0-9a-f]{64}\Z")
_CHANGED_RE = re.compile(r"Hash mismatch for \\?'([^'\\]+)\\?'")
_SETDIFF_RE = re.compile(r"(Extra|Missing) files (?:found )?in model '[^']*': ([^\"\]]+)")
_SUPPORTED_CURVES = ("secp256r1", "secp384r1", "secp521r1")
# model_signing failures: ValueError for the documented ones; the others escape from its parsing
# (KeyError, TypeError, a protobuf/JSON error) or from a second signature check (InvalidSignature).
_UPSTREAM_ERRORS = (
    ValueError,
    KeyError,
    TypeError,
    AttributeError,
    IndexError,
    RecursionError,
    InvalidSignature,
)


@dataclass(frozen=True)
class SignerInfo:
    """Who signed a bundle, and what exactly they signed.

    Attributes:
        key_fingerprint: hex sha256 of the signer's DER SubjectPublicKeyInfo.
        files: every signed bundle path and its sha256 (hex); equals the verified directory.
        model_name: the informative model name recorded in the signature (its directory name).
    """

    key_fingerprint: str
    files: Mapping[str, str] = field(default_factory=dict)
    model_name: str = ""


def sign_bundle(
    bundle_dir: Path, private_key_path: Path, *, signature_name: str = SIGNATURE_FILE
) -> Path:
    """Sign every file of ``bundle_dir`` (except the signature) into ``bundle_dir/<signature>``.

    Hashes each file once with sha256 (model_signing file mode). The signature file is written
    atomically; an older signature in the directory is replaced and never signed over.

    Returns:
        The path of the signature file.

    Raises:
        InputError: ``bundle_dir`` is not a directory, contains a symlink, or a bad name.
        ConfigError: the private key is missing, encrypted or not ECDSA P-256/384/521.
        LocalError: the signature cannot be written.
    """
    signing = _upstream("signing")
    bundle_dir = _bundle_dir(bundle_dir)
    _signature_name(signature_name)
    _load_ec_private_key(private_key_path)
    out = bundle_dir / signature_name
    with tempfile.TemporaryDirectory(prefix="ota-sign-") as tmp:
        tmp_sig = Path(tmp) / signature_name
        try:
            signing.Config().use_elliptic_key_signer(
                private_key=private_key_path
            ).set_hashing_config(_hashing_config(signature_name)).sign(bundle_dir, tmp_sig)
        except ValueError as e:  # a symlink or an unreadable entry in the bundle
            raise InputError(f"cannot sign {bundle_dir}: {e}") from e
        write_bytes(out, tmp_sig.read_bytes())
    return out


def sign_digests(
    digests: Mapping[str, str],
    private_key_path: Path,
    out_path: Path,
    *,
    model_name: str | None = None,
    signature_name: str | None = None,
) -> Path:
    """Sign precomputed sha256 digests of a bundle's files, without reading the files.

    The result is the same signature :func:`sign_bundle` makes for a directory named
    ``model_name`` (default: ``out_path.parent.name``) holding exactly these files: the upstream
    verifier accepts it on the real files. The signature's name inside the bundle,
    ``signature_name`` (default: ``out_path.name``), is recorded as ignored and must not be
    among ``digests``; ``out_path`` may be anywhere (a staging folder, say).

    Made without importing ``model_signing`` (:mod:`ota.signing._light_sign`: its import pulls
    the whole Sigstore stack, 0.5 s of CPU in a fresh publish); the statement it signs equals, as
    JSON, the one ``model_signing``'s ``signing.Config`` signs for the same manifest.

    Raises:
        InputError: empty digests, an unsafe path, a digest that is not 64 hex digits, or the
            signature's own name among the paths.
        ConfigError: the private key is missing, encrypted or not ECDSA P-256/384/521.
        LocalError: the signature cannot be written.
    """
    from ota.signing._light_sign import signature_bundle

    out_path = Path(out_path)
    sig_name = out_path.name if signature_name is None else signature_name
    _signature_name(sig_name)
    key = _load_ec_private_key(private_key_path)
    _check_digest_map(digests, sig_name, "sign")
    name = model_name if model_name is not None else out_path.parent.name
    write_bytes(out_path, signature_bundle(digests, key, signature_name=sig_name, model_name=name))
    return out_path


def verify_bundle(
    bundle_dir: Path, public_key_pem: bytes, *, signature_name: str = SIGNATURE_FILE
) -> SignerInfo:
    """Verify ``bundle_dir/<signature>`` with the upstream verifier and one trusted key.

    Every file is re-hashed by model_signing. Accepts only if the signature is by the key, the
    digests match, and the signed file set equals the directory's files.

    Raises:
        SignatureError: missing, oversized or malformed signature; another key; a changed,
            extra or missing file; a symlink in the bundle.
        ConfigError: ``public_key_pem`` is not an ECDSA P-256/384/521 public key.
        InputError: ``bundle_dir`` is not a directory.
    """
    verifying = _upstream("verifying")
    bundle_dir = _bundle_dir(bundle_dir)
    _signature_name(signature_name)
    public_key = _load_ec_public_key(public_key_pem)
    sig_bytes = _read_signature(bundle_dir / signature_name)
    with tempfile.TemporaryDirectory(prefix="ota-verify-") as tmp:
        sig_path, key_path = Path(tmp) / "model.sig", Path(tmp) / "key.pub"
        sig_path.write_bytes(sig_bytes)  # verify exactly the bytes we parse below
        key_path.write_bytes(public_key_pem)
        try:
            verifying.Config().use_elliptic_key_verifier(public_key=key_path).set_hashing_config(
                _hashing_config(signature_name)
            ).verify(bundle_dir, sig_path)
        except _UPSTREAM_ERRORS as e:
            raise SignatureError(f"bundle signature refused: {_reason(e)}") from e
    info = _signer_info(sig_bytes, public_key)
    present = _directory_files(bundle_dir, signature_name)
    _check_same_files(set(info.files), present)
    return info


def verify_digests(
    signature: bytes, public_key_pem: bytes, digests: Mapping[str, str], *, signature_name: str
) -> SignerInfo:
    """Verify a signature against known sha256 digests of the bundle's files, without hashing.

    For a device that has already checked every file's sha256 (chunk by chunk, against the
    TUF-signed manifest): the upstream verifier compares the signed manifest with ``digests``.

    Raises:
        SignatureError: bad signature, another key, or a digest set that differs in any path or
            value from the signed one.
        ConfigError: ``public_key_pem`` is not an ECDSA P-256/384/521 public key.
        InputError: malformed ``digests``.
    """
    verifying = _upstream("verifying")
    public_key = _load_ec_public_key(public_key_pem)
    if len(signature) > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"signature of {len(signature)} bytes exceeds the limit")
    manifest = _manifest_from_digests(digests, signature_name, "bundle")
    with tempfile.TemporaryDirectory(prefix="ota-verify-") as tmp:
        sig_path, key_path = Path(tmp) / "model.sig", Path(tmp) / "key.pub"
        sig_path.write_bytes(signature)
        key_path.write_bytes(public_key_pem)
        try:
            verifying.Config().use_elliptic_key_verifier(public_key=key_path).set_hashing_config(
                _FixedManifest(manifest)
            ).verify(Path(tmp), sig_path)
        except _UPSTREAM_ERRORS as e:
            raise SignatureError(f"bundle signature refused: {_reason(e)}") from e
    info = _signer_info(signature, public_key)
    _check_same_files(set(info.files), set(digests))
    return info


# -- helpers -------------------------------------------------------------------------------


def _upstream(module: str) -> Any:
    """Import a ``model_signing`` module lazily, typed as Any (the library is untyped)."""
    return importlib.import_module(f"model_signing.{module}")


class _FixedManifest:
    """Stands in for ``model_signing.hashing.Config``: returns a manifest computed elsewhere.

    ``signing.Config`` and ``verifying.Config`` call ``hash(path, files_to_hash=...)`` and, on
    verification, ``add_ignored_paths(...)``; nothing else.
    """

    def __init__(self, manifest: Any) -> None:
        self._manifest = manifest

    def hash(self, model_path: object, *, files_to_hash: object = None) -> Any:
        return self._manifest

    def add_ignored_paths(self, *, model_path: object, paths: object) -> None:
        """The ignored paths are already absent from the precomputed manifest."""


def _hashing_config(signature_name: str) -> Any:
    hashing = _upstream("hashing")
    return (
        hashing.Config()
        .use_file_serialization(hashing_algorithm="sha256")
        .set_ignored_paths(paths=[signature_name], ignore_git_paths=False)
        .set_allow_symlinks(False)
    )


def _check_digest_map(digests: Mapping[str, str], signature_name: str, action: str) -> None:
    """Bundle paths to 64-hex sha256 digests, not naming the signature itself (InputError)."""
    if not digests:
        raise InputError(f"no file digests to {action}")
    for path, hexdigest in digests.items():
        try:
            validate_bundle_path(path)
        except FormatError as e:
            raise InputError(str(e)) from e
        if path == signature_name:
            raise InputError(f"the signature file {path} cannot sign itself")
        if not isinstance(hexdigest, str) or not _HEX64_RE.match(hexdigest):
            raise InputError(f"bad sha256 digest for {path}: {hexdigest!r:.80}")


def _manifest_from_digests(digests: Mapping[str, str], signature_name: str, name: str) -> Any:
    manifest = _upstream("manifest")
    digest_type = _upstream("_hashing.hashing").Digest  # the one type manifest items need

    _check_digest_map(digests, signature_name, "sign")
    items = []
    for path, hexdigest in digests.items():
        items.append(
            manifest.FileManifestItem(
                path=PurePosixPath(path), digest=digest_type("sha256", bytes.fromhex(hexdigest))
            )
        )
    serialization_type = manifest.SerializationType.from_args(
        {
            "method": "files",
            "hash_type": "sha256",
            "allow_symlinks": False,
            "ignore_paths": [signature_name],
        }
    )
    return manifest.Manifest(name, items, serialization_type)


def _signer_info(sig_bytes: bytes, public_key: ec.EllipticCurvePublicKey) -> SignerInfo:
    """Read the statement of a signature the upstream verifier has just accepted."""
    try:
        bundle = json.loads(sig_bytes)
        payload = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"], validate=True))
        predicate = payload["predicate"]
        serialization_args = predicate["serialization"]
        resources = predicate["resources"]
        files: dict[str, str] = {}
        for r in resources:
            if r["algorithm"] != "sha256" or not _HEX64_RE.match(r["digest"]):
                raise SignatureError(f"unexpected digest for {r['name']!r:.80}")
            if r["name"] in files:
                raise SignatureError(f"signed twice: {r['name']!r:.80}")
            files[r["name"]] = r["digest"]
        model_name = str(payload["subject"][0]["name"])
    except (ValueError, KeyError, TypeError, IndexError, binascii.Error) as e:
        raise SignatureError(f"malformed signature statement: {_reason(e)}") from e
    if serialization_args.get("method") != "files" or serialization_args.get("hash_type") != (
        "sha256"
    ):
        raise SignatureError(f"unsupported signature serialization {serialization_args!r:.200}")
    return SignerInfo(
        key_fingerprint=key_fingerprint(public_key), files=files, model_name=model_name
    )


def _check_same_files(signed: set[str], present: set[str]) -> None:
    extra, missing = sorted(present - signed), sorted(signed - present)
    if extra or missing:
        raise SignatureError(
            f"signed file set differs from the bundle: unsigned {extra[:5]}, missing {missing[:5]}"
        )


def _directory_files(bundle_dir: Path, signature_name: str) -> set[str]:
    files: set[str] = set()
    for p in bundle_dir.rglob("*"):
        if p.is_symlink():
            raise SignatureError(f"symlink in bundle: {p.relative_to(bundle_dir)}")
        if p.is_file():
            files.add(p.relative_to(bundle_dir).as_posix())
        elif not p.is_dir():
            raise SignatureError(f"special file in bundle: {p.relative_to(bundle_dir)}")
    files.discard(signature_name)
    return files


def _read_signature(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_SIGNATURE_BYTES + 1)
    except FileNotFoundError as e:
        raise SignatureError(f"bundle has no signature {path.name}") from e
    except OSError as e:
        raise SignatureError(f"cannot read the signature {path}: {e.strerror}") from e
    if len(data) > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"signature {path.name} exceeds {MAX_SIGNATURE_BYTES} bytes")
    return data


def _bundle_dir(bundle_dir: Path) -> Path:
    bundle_dir = Path(bundle_dir)
    if bundle_dir.is_symlink() or not bundle_dir.is_dir():
        raise InputError(f"{bundle_dir} is not a bundle directory")
    return bundle_dir


def _signature_name(name: str) -> None:
    try:
        validate_bundle_path(name)
    except FormatError as e:
        raise InputError(f"bad signature file name {name!r}") from e
    if "/" in name:
        raise InputError(f"the signature must be at the bundle root, not {name!r}")


def _load_ec_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        pem = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(
            f"cannot read the model-signing key {path}: {e.strerror}",
            remedy="create one with `ota init` (ECDSA P-256)",
        ) from e
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path} is not an unencrypted PEM private key") from e
    _check_curve(key, str(path))
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def _load_ec_public_key(pem: bytes) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:  # e.g. a binary-field curve
        raise ConfigError("the model-signing public key is not a supported PEM public key") from e
    _check_curve(key, "the model-signing public key")
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def _check_curve(key: object, what: str) -> None:
    if not isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) or (
        key.curve.name not in _SUPPORTED_CURVES
    ):
        raise ConfigError(
            f"{what} is not an ECDSA P-256/384/521 key",
            remedy="model_signing accepts only NIST P curves (Ed25519 is rejected upstream)",
        )


def _reason(e: BaseException) -> str:
    """A one-line reason from model_signing's exception (its digest reprs are unreadable)."""
    if isinstance(e, InvalidSignature):
        return "the signature does not verify with the trusted key"
    if isinstance(e, KeyError):
        return f"malformed signature: missing field {e}"
    text = str(e) or type(e).__name__
    if text.startswith("Signature mismatch"):
        parts = []
        changed = _CHANGED_RE.findall(text)
        if changed:
            parts.append(f"changed {', '.join(changed[:5])}")
        parts += [f"{m[0].lower()} files {m[1]}" for m in _SETDIFF_RE.findall(text)]
        if parts:
            text = "files differ from the signature: " + "; ".join(parts)
    return text if len(text) <= 500 else text[:500] + "…"
