"""Signing: keys by URI, OpenSSF model signing of bundles, in-toto / SLSA provenance.

* Keys (decision 8): :func:`generate_key`, :func:`load_signer` (``file2:``, ``envvar:``,
  ``awskms:``), :func:`import_kms_key`, :func:`public_key_pem`.
* Model signatures (decision 9): :func:`sign_bundle`, :func:`sign_digests`,
  :func:`verify_bundle`, :func:`verify_digests` (keyed, ECDSA P-256) and :func:`sign_keyless`
  (Sigstore, under a hard deadline). The signature is the upstream ``model_signing`` format.
  :func:`verify_digests_light` is the device's check of the same keyed format without importing
  model_signing's Sigstore stack (ADR 0006).
* Provenance: :func:`make_provenance`, :func:`sign_provenance`, :func:`verify_provenance`.

Verification raises (:class:`SignatureError`, :class:`ProvenanceError`, both
:class:`~ota.errors.SecurityError`), never returns False. Importing this package imports none of
its modules: each public name is imported on first use (PEP 562), so a publish loads only the
signers it calls. No module here imports ``model_signing`` or ``sigstore`` at import time; the
key and provenance modules import securesystemslib (which itself imports boto3 when that is
installed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ota._lazy import exports

if TYPE_CHECKING:
    from ota.signing._errors import ProvenanceError, SignatureError
    from ota.signing._keyless import sign_keyless
    from ota.signing._keys import (
        KEY_KINDS,
        ROLE_KEY_KINDS,
        EnvVarSigner,
        KeyKind,
        NewKey,
        generate_key,
        import_kms_key,
        key_fingerprint,
        load_signer,
        private_half,
        public_key_pem,
    )
    from ota.signing._light_verify import verify_digests_light
    from ota.signing._model_sig import (
        SignerInfo,
        sign_bundle,
        sign_digests,
        verify_bundle,
        verify_digests,
    )
    from ota.signing._provenance import (
        BUILD_TYPE,
        SLSA_PROVENANCE_V1,
        STATEMENT_TYPE,
        make_provenance,
        sign_provenance,
        verify_provenance,
    )

# Public name -> the private module that defines it, imported on first use (PEP 562, as
# ota.client): a publish needs a few of them, and importing the others (and what they import)
# cost every fresh ``ota publish`` their import time (issue 13).
_LAZY = {
    "ProvenanceError": "_errors",
    "SignatureError": "_errors",
    "sign_keyless": "_keyless",
    "KEY_KINDS": "_keys",
    "ROLE_KEY_KINDS": "_keys",
    "EnvVarSigner": "_keys",
    "KeyKind": "_keys",
    "NewKey": "_keys",
    "generate_key": "_keys",
    "import_kms_key": "_keys",
    "key_fingerprint": "_keys",
    "load_signer": "_keys",
    "private_half": "_keys",
    "public_key_pem": "_keys",
    "verify_digests_light": "_light_verify",
    "SignerInfo": "_model_sig",
    "sign_bundle": "_model_sig",
    "sign_digests": "_model_sig",
    "verify_bundle": "_model_sig",
    "verify_digests": "_model_sig",
    "BUILD_TYPE": "_provenance",
    "SLSA_PROVENANCE_V1": "_provenance",
    "STATEMENT_TYPE": "_provenance",
    "make_provenance": "_provenance",
    "sign_provenance": "_provenance",
    "verify_provenance": "_provenance",
}


__getattr__, __dir__ = exports(__name__, _LAZY, globals())


__all__ = [
    "BUILD_TYPE",
    "KEY_KINDS",
    "ROLE_KEY_KINDS",
    "SLSA_PROVENANCE_V1",
    "STATEMENT_TYPE",
    "EnvVarSigner",
    "KeyKind",
    "NewKey",
    "ProvenanceError",
    "SignatureError",
    "SignerInfo",
    "generate_key",
    "import_kms_key",
    "key_fingerprint",
    "load_signer",
    "make_provenance",
    "private_half",
    "public_key_pem",
    "sign_bundle",
    "sign_digests",
    "sign_keyless",
    "sign_provenance",
    "verify_bundle",
    "verify_digests",
    "verify_digests_light",
    "verify_provenance",
]
