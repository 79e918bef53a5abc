"""edge-ota: secure over-the-air updates and supply chain for AI models on edge devices.

The package is split by component (see ``docs/architecture.md``):

* :mod:`ota.repository` - publishing: TUF metadata, content-addressed blobs, storage backends.
* :mod:`ota.client` - the device updater: verification, A/B slots, smoke inference.
* :mod:`ota.signing` - keys by URI, OpenSSF model signing, provenance.
* :mod:`ota.sbom` - CycloneDX ML-BOM, vulnerability matching.

Importing :mod:`ota` or :mod:`ota.client` never imports flask or cyclonedx; boto3 only through
securesystemslib when it is installed, and ``ota device`` keeps even that out (:mod:`ota._lean`).
"""

from ota.errors import (
    ConfigError,
    ConflictError,
    ExitCode,
    InputError,
    LocalError,
    OtaError,
    SecurityError,
    SmokeError,
    TransientError,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "ConflictError",
    "ExitCode",
    "InputError",
    "LocalError",
    "OtaError",
    "SecurityError",
    "SmokeError",
    "TransientError",
    "__version__",
]
