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
:class:`~ota.errors.SecurityError`), never returns False. Importing this package does not import
``model_signing`` or ``sigstore``; it does import securesystemslib (which itself imports boto3
when that is installed).
"""

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
