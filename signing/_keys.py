"""Keys by URI: generate key files, load securesystemslib signers for ``file2:``, ``envvar:``
and ``awskms:`` URIs (design decision 8).

The same code signs with a key file in the demo, a PEM in an environment variable in CI and an
AWS KMS key in production. Every failure to obtain a signer is a :class:`~ota.errors.ConfigError`
with a remedy; a KMS that cannot be reached while signing is a :class:`~ota.errors.TransientError`.

Importing this module registers the ``envvar`` scheme in securesystemslib's
``SIGNER_FOR_URI_SCHEME``, so ``Signer.from_priv_key_uri("envvar:NAME", key)`` works everywhere.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from abc import ABC
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from securesystemslib.exceptions import KeyMismatchError, UnsupportedLibraryError
from securesystemslib.signer import (
    SIGNER_FOR_URI_SCHEME,
    CryptoSigner,
    Key,
    SecretsHandler,
    Signature,
    Signer,
    SSlibKey,
)

from ota._atomic import write_bytes
from ota.errors import ConfigError, InputError, OtaError, TransientError

KeyKind = Literal["ed25519", "ecdsa-p256"]
KEY_KINDS: tuple[KeyKind, ...] = ("ed25519", "ecdsa-p256")

ENVVAR_SCHEME = "envvar"
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
_KEY_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}\Z")
# AWS KMS errors that retrying cannot fix: the key or the permissions are wrong.
_KMS_CONFIG_CODES = frozenset(
    {
        "AccessDeniedException",
        "DisabledException",
        "IncorrectKeyException",
        "InvalidKeyUsageException",
        "KMSInvalidStateException",
        "NotFoundException",
        "UnrecognizedClientException",
        "ValidationException",
        "InvalidSignatureException",
    }
)


def generate_key(
    path_dir: Path | str, name: str, *, kind: KeyKind = "ed25519"
) -> tuple[str, SSlibKey]:
    """Generate a key pair and write the private key as ``<path_dir>/<name>.pem``.

    The file is PKCS#8 PEM, unencrypted, mode 0600, written atomically; an existing file is never
    overwritten. Use ``ed25519`` for TUF role keys and ``ecdsa-p256`` for the model-signing key
    (model_signing rejects Ed25519).

    Returns:
        The ``file2:`` URI of the private key (absolute path) and its public key.

    Raises:
        InputError: bad ``name`` or ``kind``, the key file exists already, or the path cannot be
            expressed as a ``file2:`` URI (contains ``?`` or ``#``).
        LocalError: the file cannot be written.
    """
    if not isinstance(name, str) or not _KEY_NAME_RE.match(name):
        raise InputError(
            f"invalid key name {name!r}",
            remedy="use 1-64 characters of A-Z, a-z, 0-9, '.', '_' or '-'",
        )
    if kind == "ed25519":
        signer = CryptoSigner.generate_ed25519()
    elif kind == "ecdsa-p256":
        signer = CryptoSigner.generate_ecdsa()
    else:
        raise InputError(f"unknown key kind {kind!r}", remedy=f"use one of {', '.join(KEY_KINDS)}")
    path = Path(path_dir).absolute() / f"{name}.pem"
    if "?" in str(path) or "#" in str(path):
        raise InputError(f"key path {path} cannot be written as a file2: URI")
    if path.exists():
        raise InputError(
            f"key file {path} exists already", remedy="remove it or choose another name"
        )
    write_bytes(path, signer.private_bytes, mode=0o600)
    return f"{CryptoSigner.SCHEME}:{path}", signer.public_key


# Which algorithm each role's key uses: TUF roles Ed25519; the model-signing ("release") key
# ECDSA P-256, because model_signing rejects Ed25519.
ROLE_KEY_KINDS: dict[str, KeyKind] = {
    "root": "ed25519",
    "targets": "ed25519",
    "snapshot": "ed25519",
    "timestamp": "ed25519",
    "bins": "ed25519",
    "team": "ed25519",
    "release": "ecdsa-p256",
}


@dataclass(frozen=True)
class NewKey:
    """A key pair generated in memory; nothing is on disk until :meth:`write`.

    Rotations generate the key first and write it only once every other check has passed
    (all-or-nothing, issue 12).
    """

    kind: KeyKind
    private_pem: bytes
    public: SSlibKey

    @classmethod
    def generate(cls, kind: KeyKind) -> NewKey:
        """Raises InputError: unknown ``kind``."""
        if kind == "ed25519":
            signer = CryptoSigner.generate_ed25519()
        elif kind == "ecdsa-p256":
            signer = CryptoSigner.generate_ecdsa()
        else:
            raise InputError(
                f"unknown key kind {kind!r}", remedy=f"use one of {', '.join(KEY_KINDS)}"
            )
        assert isinstance(signer.public_key, SSlibKey)
        return cls(kind, signer.private_bytes, signer.public_key)

    @property
    def keyid(self) -> str:
        """The TUF key id (for a model-signing key, see :attr:`fingerprint`)."""
        return self.public.keyid

    @property
    def fingerprint(self) -> str:
        """sha256 of the DER public key: the id ``trust/signers.json`` uses."""
        pub = serialization.load_pem_public_key(self.public_pem)
        assert isinstance(pub, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey)
        return key_fingerprint(pub)

    @property
    def public_pem(self) -> bytes:
        return public_key_pem(self.public)

    def paths(self, path_dir: Path | str, name: str) -> tuple[Path, Path]:
        """``<dir>/<name>.pem`` (private) and ``<dir>/<name>.pub.pem``; validates ``name``.

        Raises:
            InputError: bad name, a path that cannot be a ``file2:`` URI, or existing files.
        """
        if not isinstance(name, str) or not _KEY_NAME_RE.match(name):
            raise InputError(
                f"invalid key name {name!r}",
                remedy="use 1-64 characters of A-Z, a-z, 0-9, '.', '_' or '-'",
            )
        base = Path(path_dir).absolute()
        priv, pub = base / f"{name}.pem", base / f"{name}.pub.pem"
        if "?" in str(base) or "#" in str(base):
            raise InputError(f"key path {priv} cannot be written as a file2: URI")
        for p in (priv, pub):
            if p.exists():
                raise InputError(
                    f"key file {p} exists already", remedy="remove it or choose another name"
                )
        return priv, pub

    def write(self, path_dir: Path | str, name: str, *, public: bool = True) -> str:
        """Write the private key (PKCS#8 PEM, mode 0600) and, with ``public``, the public key
        beside it (``<name>.pub.pem``, 0644). Never overwrites. Returns the ``file2:`` URI.

        Raises:
            InputError: see :meth:`paths`. LocalError: the files cannot be written.
        """
        priv, pub = self.paths(path_dir, name)
        write_bytes(priv, self.private_pem, mode=0o600)
        if public:
            write_bytes(pub, self.public_pem)
        return f"{CryptoSigner.SCHEME}:{priv}"


def private_half(public_path: Path) -> Path | None:
    """The private key file written beside a ``.pub.pem`` file by :meth:`NewKey.write`
    (``NAME.pub.pem`` -> ``NAME.pem``), if it exists; None otherwise."""
    name = public_path.name
    if not name.endswith(".pub.pem"):
        return None
    candidate = public_path.with_name(name[: -len(".pub.pem")] + ".pem")
    return candidate if candidate.is_file() else None


def load_signer(uri: str, public_key: Key) -> Signer:
    """Load the signer named by a private key URI.

    Supported: ``file2:<path>`` (PKCS#8 PEM file), ``envvar:<NAME>`` (PEM private key in an
    environment variable, optionally base64-encoded) and ``awskms:<key id, ARN or alias>``
    (ambient AWS credentials and region; ``AWS_ENDPOINT_URL_KMS`` selects another endpoint).
    Other schemes registered in securesystemslib are passed through.

    Invariant: the returned signer's private key matches ``public_key`` (checked for file and
    environment keys; for KMS the key is checked by the first signature a verifier checks).

    Raises:
        ConfigError: unknown scheme, missing file or variable, unreadable PEM, a private key
            that does not match ``public_key``, or a KMS library that is not installed.
    """
    scheme, sep, rest = uri.partition(":")
    if not sep or not rest:
        raise ConfigError(
            f"bad private key URI {uri!r}",
            remedy="use file2:<path>, envvar:<NAME> or awskms:<key id>",
        )
    if scheme not in SIGNER_FOR_URI_SCHEME:
        raise ConfigError(
            f"unsupported private key scheme {scheme!r}",
            remedy=f"use one of {', '.join(sorted(SIGNER_FOR_URI_SCHEME))}",
        )
    try:
        signer = Signer.from_priv_key_uri(uri, public_key)
    except OtaError:
        raise
    except KeyMismatchError as e:
        raise ConfigError(
            f"the private key at {uri} does not match the expected public key "
            f"{public_key.keyid[:16]}",
            remedy="check that the URI and the key in the trusted metadata belong together",
        ) from e
    except FileNotFoundError as e:
        raise ConfigError(
            f"private key file not found for {uri}",
            remedy="check the path (and CRYPTO_SIGNER_PATH_PREFIX, if set)",
        ) from e
    except OSError as e:
        raise ConfigError(f"cannot read the private key for {uri}: {e}") from e
    except UnsupportedLibraryError as e:
        raise ConfigError(
            f"cannot use {scheme}: keys: {e}", remedy="install edge-ota[repository]"
        ) from e
    except Exception as e:  # securesystemslib documents signer-specific errors as arbitrary
        raise ConfigError(f"cannot load the signer {uri}: {type(e).__name__}: {e}") from e
    if scheme == "awskms":
        return _KmsSigner(signer)
    return signer


def import_kms_key(key_id: str, scheme: str | None = None) -> tuple[str, SSlibKey]:
    """Fetch an AWS KMS key's public key once, for ``ota init``: returns (URI, public key).

    Raises:
        ConfigError: the key does not exist, is not a signing key, or access is denied.
        TransientError: KMS could not be reached.
    """
    from securesystemslib.signer import AWSSigner

    try:
        return AWSSigner.import_(key_id, scheme)
    except Exception as e:
        raise _kms_error(e, f"cannot import KMS key {key_id}") from e


def public_key_pem(key: Key) -> bytes:
    """SubjectPublicKeyInfo PEM of an ECDSA or Ed25519 ``SSlibKey`` (model_signing wants PEM).

    Raises:
        InputError: the key type has no PEM form here.
    """
    public = key.keyval.get("public")
    if not isinstance(public, str):
        raise InputError(f"key {key.keyid[:16]} has no public value")
    if key.keytype == "ed25519":
        try:
            raw = ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(public))
        except ValueError as e:
            raise InputError(f"bad ed25519 public key {key.keyid[:16]}") from e
        return raw.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    if public.startswith("-----BEGIN PUBLIC KEY-----"):
        return public.encode()
    raise InputError(f"key type {key.keytype} has no PEM public key")


def key_fingerprint(public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey) -> str:
    """Hex sha256 of the DER SubjectPublicKeyInfo: the identity we report for a signer."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


class _Delegating(Signer, ABC):
    """A signer that hands signing to another one (and may translate its failures)."""

    def __init__(self, inner: Signer) -> None:
        self._inner = inner

    @property
    def public_key(self) -> Key:
        return self._inner.public_key

    def sign(self, payload: bytes) -> Signature:
        return self._inner.sign(payload)


class EnvVarSigner(_Delegating):
    """A private key read from an environment variable: ``envvar:<NAME>``.

    The variable holds a PKCS#8 PEM private key, or the same PEM base64-encoded (CI secret
    stores often mangle newlines). The key is parsed once; signing is delegated to
    :class:`CryptoSigner`.
    """

    SCHEME = ENVVAR_SCHEME

    @classmethod
    def from_priv_key_uri(
        cls,
        priv_key_uri: str,
        public_key: Key,
        secrets_handler: SecretsHandler | None = None,
    ) -> EnvVarSigner:
        """Raises ConfigError (missing or bad variable) or KeyMismatchError."""
        scheme, _, name = priv_key_uri.partition(":")
        if scheme != cls.SCHEME or not _ENV_NAME_RE.match(name):
            raise ConfigError(
                f"bad envvar key URI {priv_key_uri!r}", remedy="use envvar:<VARIABLE_NAME>"
            )
        value = os.environ.get(name)
        if not value:
            raise ConfigError(
                f"environment variable {name} is not set or empty",
                remedy=f"export {name} with the PEM private key (or its base64 form)",
            )
        pem = _pem_bytes(value)
        try:
            private_key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as e:
            raise ConfigError(
                f"environment variable {name} does not hold an unencrypted PEM private key",
                remedy="store a PKCS#8 PEM key, as written by `ota init`",
            ) from e
        if not isinstance(public_key, SSlibKey):
            raise ConfigError(f"expected an SSlibKey for {priv_key_uri}")
        return cls(CryptoSigner(private_key, public_key))


def _pem_bytes(value: str) -> bytes:
    text = value.strip()
    if text.startswith("-----BEGIN"):
        return text.encode()
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return text.encode()  # let the PEM parser report it


class _KmsSigner(_Delegating):
    """Wraps securesystemslib's AWSSigner so that KMS failures while signing become ours."""

    def sign(self, payload: bytes) -> Signature:
        """Raises ConfigError (key, permission) or TransientError (network, throttling)."""
        try:
            return self._inner.sign(payload)
        except Exception as e:
            raise _kms_error(e, "AWS KMS refused to sign") from e

    @classmethod
    def from_priv_key_uri(
        cls,
        priv_key_uri: str,
        public_key: Key,
        secrets_handler: SecretsHandler | None = None,
    ) -> _KmsSigner:
        raise NotImplementedError("use load_signer()")  # pragma: no cover


def _kms_error(e: Exception, what: str) -> OtaError:
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError

    if isinstance(e, NoRegionError | NoCredentialsError):
        return ConfigError(f"{what}: {e}", remedy="set AWS credentials and AWS_DEFAULT_REGION")
    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        if code in _KMS_CONFIG_CODES:
            return ConfigError(
                f"{what}: {code}: {err.get('Message', '')}",
                remedy="check the key id, its key usage (SIGN_VERIFY) and the IAM policy "
                "(kms:GetPublicKey, kms:Sign)",
            )
        return TransientError(f"{what}: {code}: {err.get('Message', '')}")
    if isinstance(e, BotoCoreError):
        return TransientError(f"{what}: {e}", remedy="check the network path to AWS KMS")
    return ConfigError(f"{what}: {type(e).__name__}: {e}")


SIGNER_FOR_URI_SCHEME[ENVVAR_SCHEME] = EnvVarSigner
