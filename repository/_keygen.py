"""Key files for ``ota init`` (the demo ceremony; production keys come from a KMS or an
offline box): Ed25519 TUF role keys and the P-256 model-signing key, PKCS#8 PEM, mode 0600.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from securesystemslib.signer import SSlibKey

from ota import _atomic
from ota.errors import ConfigError


def _write_private(path: Path, pem: bytes) -> None:
    _atomic.write_bytes(path, pem, mode=0o600)


def generate_ed25519(path: Path) -> SSlibKey:
    """Create an Ed25519 key file (PKCS8 PEM, mode 0600) and return its public key."""
    priv = ed25519.Ed25519PrivateKey.generate()
    pem = priv.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_private(path, pem)
    return SSlibKey.from_crypto(priv.public_key())


def _load_ed25519(path: Path) -> SSlibKey:
    """Public key of an existing private key file (reused by ``ota init --keys-dir``)."""
    try:
        priv = serialization.load_pem_private_key(path.read_bytes(), None)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"cannot read key {path}: {e}") from e
    if not isinstance(priv, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key")
    return SSlibKey.from_crypto(priv.public_key())


def generate_p256(path: Path, pub_path: Path) -> bytes:
    """Create a P-256 key file for model signing; return the public key PEM (also written)."""
    priv = ec.generate_private_key(ec.SECP256R1())
    pem = priv.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_private(path, pem)
    pub = priv.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _atomic.write_bytes(pub_path, pub)
    return pub


def key_fingerprint(public_pem: bytes) -> str:
    """sha256 of the DER SubjectPublicKeyInfo: the model-signing key's id."""
    key = serialization.load_pem_public_key(public_pem)
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def generate_role_keys(
    keys_dir: Path, root_keys: int, rel: Callable[[Path], str]
) -> tuple[dict[str, str], dict[str, list[SSlibKey]]]:
    """Ed25519 keys for every top-level role and the bins, as files; their URIs by key id."""
    uris: dict[str, str] = {}
    role_keys: dict[str, list[SSlibKey]] = {}
    for role, n, where in [
        ("root", root_keys, "offline"),
        ("targets", 1, "offline"),
        ("snapshot", 1, "online"),
        ("timestamp", 1, "online"),
        ("bins", 1, "online"),
    ]:
        role_keys[role] = []
        for i in range(n):
            path = keys_dir / where / (f"{role}.pem" if n == 1 else f"{role}-{i + 1}.pem")
            key = _load_ed25519(path) if path.exists() else generate_ed25519(path)
            role_keys[role].append(key)
            uris[key.keyid] = f"file2:{rel(path)}"
    return uris, role_keys
