#!/usr/bin/env python3
"""Generate the INSECURE example keys in this folder, reproducibly.

WARNING: these private keys are published in a public repository. They exist so that the demo,
docs and tests give the same key ids on every machine. Never use them for a real repository:
`ota init` without `--keys-dir keys-example` creates fresh random keys.

Each key is derived from a fixed label with sha256, so running this script again rewrites the
same bytes; `tests/test_keys_example.py` proves the checked-in files have not drifted.

Usage: python keys-example/generate.py [OUT_DIR]   (default: this folder)
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

_ED25519 = {
    "offline/root.pem": "root",
    "offline/targets.pem": "targets",
    "online/snapshot.pem": "snapshot",
    "online/timestamp.pem": "timestamp",
    "online/bins.pem": "bins",
}
_P256_ORDER = int("FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551", 16)


def _seed(label: str) -> bytes:
    return hashlib.sha256(f"edge-ota INSECURE example key: {label}".encode()).digest()


def _pem(key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def generate(out: Path) -> list[Path]:
    """Write every example key under ``out``; return the paths written."""
    written = []
    for rel, label in _ED25519.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_pem(ed25519.Ed25519PrivateKey.from_private_bytes(_seed(label))))
        written.append(path)
    scalar = int.from_bytes(_seed("release"), "big") % (_P256_ORDER - 1) + 1
    release = ec.derive_private_key(scalar, ec.SECP256R1())
    (out / "release").mkdir(parents=True, exist_ok=True)
    (out / "release" / "release-signing.pem").write_bytes(_pem(release))
    (out / "release" / "release-signing.pub.pem").write_bytes(
        release.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    written += [
        out / "release" / "release-signing.pem",
        out / "release" / "release-signing.pub.pem",
    ]
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    for p in generate(target):
        print(p)
