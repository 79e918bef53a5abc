"""CycloneDX 1.6 SBOM of a *runtime* bundle (e.g. the onnxruntime wheels for one platform).

Each wheel (``runtime/<dist>-<version>-<tags>.whl``, PEP 427 file name) becomes a library
component with a ``pkg:pypi`` purl and its SHA-256, so ``ota vulns`` matches runtime bundles
against OSV advisories exactly as it does the runtime requirement of model bundles. Every other
file is a ``file`` component with its hash. The document is strictly validated before it is
returned, like the ML-BOM.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Any

from ota.bundle import canonical_json, validate_name, validate_version
from ota.sbom._common import DEFAULT_LIMITS, P_FILE_SIZE, SbomLimits
from ota.sbom._mlbom import validate_sbom

_WHEEL_RE = re.compile(
    r"^(?P<dist>[A-Za-z0-9](?:[A-Za-z0-9._]*[A-Za-z0-9])?)-(?P<version>[0-9][A-Za-z0-9.+!_]*)"
    r"(?:-[0-9][A-Za-z0-9_]*)?-[A-Za-z0-9_.]+-[A-Za-z0-9_.]+-[A-Za-z0-9_.]+\.whl\Z"
)
_NS = uuid.UUID("8d7f0e0a-5f1c-4f3e-9f0b-2a9c6c1d4e77")


def _wheel(path: str) -> tuple[str, str] | None:
    """``(normalised distribution name, version)`` of a wheel file name, else None."""
    m = _WHEEL_RE.match(path.rsplit("/", 1)[-1])
    if m is None:
        return None
    return re.sub(r"[-_.]+", "-", m["dist"]).lower(), m["version"].replace("_", "-")


def build_runtime_bom(
    *,
    name: str,
    version: str,
    files: Mapping[str, tuple[str, int]],
    limits: SbomLimits = DEFAULT_LIMITS,
) -> bytes:
    """Build and strictly validate the SBOM of a runtime bundle.

    Args:
        files: bundle path -> (sha256, size) of every file of the bundle but the SBOM itself.

    Raises:
        SbomError: the document does not validate or exceeds ``limits``.
        InputError: bad name or version.
    """
    validate_name(name)
    validate_version(version)
    components: list[dict[str, Any]] = []
    for path, (sha, size) in sorted(files.items()):
        hashes = [{"alg": "SHA-256", "content": sha}]
        props = [{"name": P_FILE_SIZE, "value": str(size)}]
        wheel = _wheel(path)
        if wheel is not None:
            dist, ver = wheel
            components.append(
                {
                    "type": "library",
                    "bom-ref": f"wheel:{path}",
                    "name": dist,
                    "version": ver,
                    "purl": f"pkg:pypi/{dist}@{ver}",
                    "hashes": hashes,
                    "properties": [*props, {"name": "edge-ota:file:path", "value": path}],
                }
            )
        else:
            components.append(
                {
                    "type": "file",
                    "bom-ref": f"file:{path}",
                    "name": path,
                    "hashes": hashes,
                    "properties": props,
                }
            )
    subject = {
        "type": "platform",
        "bom-ref": "runtime-bundle",
        "name": name,
        "version": version,
        "purl": f"pkg:generic/{name}@{version}",
    }
    serial = uuid.uuid5(_NS, canonical_json([name, version, sorted(files.items())]).decode())
    doc: dict[str, Any] = {
        "bomFormat": "CycloneDX",
        "specVersion": "1.6",
        "serialNumber": serial.urn,
        "version": 1,
        "metadata": {"component": subject},
        "components": components,
        "dependencies": [
            {
                "ref": "runtime-bundle",
                "dependsOn": [c["bom-ref"] for c in components if c["type"] == "library"],
            },
        ],
    }
    data = canonical_json(doc)
    validate_sbom(data, limits=limits)
    return data
