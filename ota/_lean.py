"""Keep the device process lean: no cloud SDK is imported by the updater.

securesystemslib's ``signer`` package (imported by python-tuf) imports the optional cloud-KMS
signer backends' SDKs when they happen to be installed: boto3 for ``awskms:`` keys costs the
process about 12 MiB of RSS and hundreds of modules. A device never signs; it only verifies
with keys from TUF metadata. On a device installed with the ``client`` extra those SDKs are
absent anyway; on a machine with everything installed (a test rig, a gateway that also
publishes) :func:`lean_device_process` makes the updater process behave the same, so its
memory and attack surface do not depend on what else is on the machine.

Only the ``ota device`` commands call it, before anything imports python-tuf (so it lives outside
:mod:`ota.client`, whose import already loads python-tuf), and only for SDKs not yet imported: an
application embedding :mod:`ota.client` that uses boto3 itself is never affected.
"""

from __future__ import annotations

import sys

# Optional SDKs that securesystemslib.signer imports when installed; the device needs none.
CLOUD_SDKS = ("boto3", "botocore")


def lean_device_process() -> list[str]:
    """Make later imports of the cloud SDKs fail (securesystemslib then leaves its KMS signers
    unavailable, which a verifying device never uses). Returns the SDKs kept out."""
    kept_out = []
    for name in CLOUD_SDKS:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]
            kept_out.append(name)
    return kept_out
