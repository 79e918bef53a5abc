"""Errors of the signing component: refined :class:`~ota.errors.SecurityError` subclasses."""

from __future__ import annotations

from ota.errors import SecurityError


class SignatureError(SecurityError):
    """A model signature is missing, malformed, by another key, or does not match the files."""


class ProvenanceError(SecurityError):
    """A provenance envelope is malformed, oversized, unsigned, or about other artifacts."""
