"""Naming keys on the command line: a public key file, or a private key URI.

``--key`` accepts a PEM public key file (the key holder keeps the private half elsewhere), a
``file2:``/``envvar:`` private key URI (the public half is derived from it, and the URI can be
recorded in ``ota.toml`` so this machine signs with it), or an ``awskms:`` URI (the public key
is fetched from KMS once). Ed25519 and ECDSA P-256 keys are supported.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from securesystemslib.signer import SSlibKey

from ota.errors import ConfigError, InputError


@dataclass(frozen=True)
class KeySpec:
    """A TUF public key and, when known, the URI of its private half."""

    key: SSlibKey
    uri: str | None = None

    @property
    def keyid(self) -> str:
        return self.key.keyid


def _public(obj: object, what: str) -> SSlibKey:
    if isinstance(obj, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        obj = obj.public_key()
    if isinstance(obj, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
        return SSlibKey.from_crypto(obj)
    raise InputError(f"{what} is not an Ed25519 or ECDSA key")


def _env_pem(name: str) -> bytes:
    value = os.environ.get(name, "").strip()
    if not value:
        raise ConfigError(f"environment variable {name} is not set or empty")
    if value.startswith("-----BEGIN"):
        return value.encode()
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ConfigError(f"environment variable {name} holds no PEM key") from e


def _private_from_pem(pem: bytes, what: str) -> SSlibKey:
    try:
        return _public(serialization.load_pem_private_key(pem, password=None), what)
    except (ValueError, TypeError) as e:
        raise InputError(f"{what} is not an unencrypted PEM private key: {e}") from e


def _refuse_inline_pem(spec: str) -> None:
    """A key argument holding the PEM text itself (``"$(cat k.pem)"``) is refused without
    echoing it: an error message would put the private key in logs and --json output."""
    if "-----BEGIN" in spec or "\n" in spec:
        raise InputError(
            "a key argument holds PEM text, not a file or URI (its content is not shown)",
            remedy="pass the key file's path, or envvar:NAME for a key in an environment variable",
        )


def parse_key(spec: str, base_dir: Path | None = None) -> KeySpec:
    """Resolve ``spec`` (see the module docstring) to a public key and optional private URI.

    Relative paths are relative to ``base_dir`` (default: the working directory).

    Raises:
        InputError: unreadable or unsupported key.
        ConfigError: an environment variable or KMS key cannot be used.
    """
    _refuse_inline_pem(spec)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    scheme, sep, rest = spec.partition(":")
    if sep and scheme == "file2":
        path = Path(rest) if Path(rest).is_absolute() else base / rest
        try:
            pem = path.read_bytes()
        except OSError as e:
            raise InputError(f"cannot read key file {path}: {e}") from e
        return KeySpec(_private_from_pem(pem, str(path)), f"file2:{path.absolute()}")
    if sep and scheme == "envvar":
        return KeySpec(_private_from_pem(_env_pem(rest), spec), spec)
    if sep and scheme == "awskms":
        from ota.signing import import_kms_key

        uri, key = import_kms_key(rest)
        return KeySpec(key, uri)
    path = Path(spec) if Path(spec).is_absolute() else base / spec
    try:
        pem = path.read_bytes()
    except OSError as e:
        raise InputError(
            f"cannot read key {spec}: {e}",
            remedy="pass a PEM public key file, or a file2:/envvar:/awskms: private key URI",
        ) from e
    if b"PRIVATE KEY" in pem:
        return KeySpec(_private_from_pem(pem, str(path)), f"file2:{path.absolute()}")
    try:
        return KeySpec(_public(serialization.load_pem_public_key(pem), str(path)))
    except ValueError as e:
        raise InputError(f"{path} is not a PEM public key: {e}") from e


def model_signing_pem(spec: str, base_dir: Path | None = None) -> bytes:
    """The PEM public key of a model-signing (ECDSA P-256) key, from a public or private file.

    Raises:
        InputError: unreadable, or not a P-256 key (model_signing accepts no other here).
    """
    _refuse_inline_pem(spec)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    path = Path(spec) if Path(spec).is_absolute() else base / spec
    try:
        pem = path.read_bytes()
        obj: object = (
            serialization.load_pem_private_key(pem, password=None).public_key()
            if b"PRIVATE KEY" in pem
            else serialization.load_pem_public_key(pem)
        )
    except (OSError, ValueError, TypeError) as e:
        raise InputError(f"cannot read model-signing key {path}: {e}") from e
    if not isinstance(obj, ec.EllipticCurvePublicKey) or obj.curve.name != "secp256r1":
        raise InputError(f"{path} is not an ECDSA P-256 key (needed for model signing)")
    return obj.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
