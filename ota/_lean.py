"""Keep the device process lean: no cloud SDK in the updater, and freed buffers given back.

**Imports.** securesystemslib's ``signer`` package (imported by python-tuf) imports the optional
cloud-KMS signer backends' SDKs when they happen to be installed: boto3 for ``awskms:`` keys
costs the process about 12 MiB of RSS and hundreds of modules. A device never signs; it only
verifies with keys from TUF metadata. On a device installed with the ``client`` extra those
SDKs are absent anyway; on a machine with everything installed (a test rig, a gateway that also
publishes) :func:`lean_device_process` makes the updater process behave the same, so its memory
and attack surface do not depend on what else is on the machine.

**Memory.** The stager holds a bounded window of chunk buffers (256 KiB - 8 MiB each). glibc's
malloc raises its mmap threshold every time such a buffer is freed, after which new buffers come
from per-thread heaps that it rarely returns: the process's peak then grows with the bundle
(62 MiB for 256 MB, 67 MiB for 1 GB, bench/device_rss.py). Pinning the threshold at 512 KiB
gives every large buffer back to the kernel when freed (50 and 51 MiB). Where the C library has
no ``mallopt`` (musl, macOS) nothing changes.

Only the ``ota device`` commands call it, before anything imports python-tuf (so it lives outside
:mod:`ota.client`, whose import already loads python-tuf), and only for SDKs not yet imported: an
application embedding :mod:`ota.client` that uses boto3 itself is never affected.
"""

from __future__ import annotations

import ctypes
import sys

# Optional SDKs that securesystemslib.signer imports when installed; the device needs none.
CLOUD_SDKS = ("boto3", "botocore")
MMAP_THRESHOLD = 512 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def lean_device_process() -> list[str]:
    """Import securesystemslib's signer package with the cloud SDKs hidden (it then leaves its
    KMS signers unavailable, which a verifying device never uses), then unhide them, and pin
    malloc's mmap threshold. Returns the SDKs kept out."""
    kept_out = []
    for name in CLOUD_SDKS:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]
            kept_out.append(name)
    try:
        import securesystemslib.signer  # noqa: F401 - its optional backends, evaluated now
    finally:
        for name in kept_out:  # later code in this process may import them if it wants
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
    pin_mmap_threshold()
    return kept_out


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Ask glibc to serve allocations of ``threshold`` bytes or more with mmap, always (no
    dynamic raise), so freed chunk buffers leave the process. True if the C library took it."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no such symbol; Windows has no CDLL(None)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))
