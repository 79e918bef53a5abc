"""Secrets the service hands out: device credentials, enrolment and operator tokens.

Every secret carries 256 bits from :mod:`secrets`; the service stores only its SHA-256 (a
slow KDF buys nothing against a 256-bit random value, and a fast hash keeps one report one
lookup). A prefix says what a secret is, so a leaked one is recognisable in logs and scans.
Comparisons are constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

DEVICE_PREFIX = "otadev_"
ENROLL_PREFIX = "otaenr_"
OPERATOR_PREFIX = "otaop_"
MAX_SECRET_CHARS = 128
_SHAPE = re.compile(r"^ota(dev|enr|op)_[A-Za-z0-9_-]{43}\Z")

SCOPES = ("read", "rollout", "admin")  # each includes the ones before it


def new_secret(prefix: str) -> str:
    """``prefix`` + 32 random bytes, URL-safe base64 (43 characters)."""
    return prefix + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest()


def well_formed(secret: str, prefix: str) -> bool:
    """Cheap shape check before any database lookup."""
    return (
        len(secret) <= MAX_SECRET_CHARS and secret.startswith(prefix) and bool(_SHAPE.match(secret))
    )


def matches(secret: str, stored_digest: str) -> bool:
    return hmac.compare_digest(digest(secret), stored_digest)


def scope_allows(have: str, need: str) -> bool:
    """``admin`` allows everything, ``rollout`` allows ``read``."""
    if have not in SCOPES or need not in SCOPES:
        return False
    return SCOPES.index(have) >= SCOPES.index(need)


def bearer(header: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header, or ""."""
    if not header or len(header) > MAX_SECRET_CHARS + 16:
        return ""
    kind, _, value = header.partition(" ")
    if kind.lower() != "bearer":
        return ""
    return value.strip()
