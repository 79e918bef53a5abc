"""CycloneDX 1.6 SBOM of a *runtime* bundle (e.g. the onnxruntime wheels for one platform).

Each wheel (``runtime/<dist>-<version>-<tags>.whl``, PEP 427 file name) becomes a library
component with a ``pkg:pypi`` purl and its SHA-256, so ``ota vulns`` matches runtime bundles
against OSV advisories exactly as it does the runtime requirement of model bundles. An unpacked
runtime (``pip install --target`` layout) is described by its ``*.dist-info/METADATA`` files:
each becomes a library component ``pkg:pypi/<Name>@<Version>`` (core metadata fields), read
from the publisher's folder and accepted only if its bytes hash to what the bundle ships.
Every other file is a ``file`` component with its hash. The document is strictly validated
before it is returned, like the ML-BOM.
"""

from __future__ import annotations

import email.parser
import hashlib
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ota.bundle import canonical_json, validate_name, validate_version
from ota.sbom._common import DEFAULT_LIMITS, P_FILE_SIZE, SbomError, SbomLimits
from ota.sbom._mlbom import validate_sbom

_WHEEL_RE = re.compile(
    r"^(?P<dist>[A-Za-z0-9](?:[A-Za-z0-9._]*[A-Za-z0-9])?)-(?P<version>[0-9][A-Za-z0-9.+!_]*)"
    r"(?:-[0-9][A-Za-z0-9_]*)?-[A-Za-z0-9_.]+-[A-Za-z0-9_.]+-[A-Za-z0-9_.]+\.whl\Z"
)
_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,98}[A-Za-z0-9])?\Z")
_VERSION_RE = re.compile(r"^[0-9A-Za-z!+._-]{1,64}\Z")
_NS = uuid.UUID("8d7f0e0a-5f1c-4f3e-9f0b-2a9c6c1d4e77")


def _wheel(path: str) -> tuple[str, str] | None:
    """``(normalised distribution name, version)`` of a wheel file name, else None."""
    m = _WHEEL_RE.match(path.rsplit("/", 1)[-1])
    if m is None:
        return None
    return re.sub(r"[-_.]+", "-", m["dist"]).lower(), m["version"].replace("_", "-")


_MAX_METADATA = 1024 * 1024


def _dist_info(path: str, sha: str, root: Path | None) -> tuple[str, str] | None:
    """``(normalised name, version)`` from an unpacked distribution's METADATA at bundle
    ``path`` (``runtime/…/<x>.dist-info/METADATA``), read from ``root`` (the folder published
    as ``runtime/``); None when ``path`` is no METADATA or there is no ``root``.

    Raises:
        SbomError: unreadable, too large, not the bytes the bundle ships, or no Name/Version.
    """
    parts = path.split("/")
    if root is None or len(parts) < 3 or parts[-1] != "METADATA":
        return None
    if not parts[-2].endswith(".dist-info") or parts[0] != "runtime":
        return None
    source = root.joinpath(*parts[1:])
    try:
        with source.open("rb") as f:
            data = f.read(_MAX_METADATA + 1)
    except OSError as e:
        raise SbomError(f"cannot read {path}: {e.strerror or e}") from e
    if len(data) > _MAX_METADATA or hashlib.sha256(data).hexdigest() != sha:
        raise SbomError(f"{path} changed while publishing (or exceeds {_MAX_METADATA} bytes)")
    msg = email.parser.BytesHeaderParser().parsebytes(data)
    dist, ver = msg.get("Name"), msg.get("Version")
    if not dist or not ver or not _NAME_RE.match(dist) or not _VERSION_RE.match(ver):
        raise SbomError(f"{path} has no valid Name and Version")
    return re.sub(r"[-_.]+", "-", dist).lower(), ver.strip()


def build_runtime_bom(
    *,
    name: str,
    version: str,
    files: Mapping[str, tuple[str, int]],
    root: Path | None = None,
    limits: SbomLimits = DEFAULT_LIMITS,
) -> bytes:
    """Build and strictly validate the SBOM of a runtime bundle.

    Args:
        files: bundle path -> (sha256, size) of every file of the bundle but the SBOM itself.
        root: the folder published as ``runtime/``, to read ``*.dist-info/METADATA`` from.

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
        unpacked = _dist_info(path, sha, root)
        if unpacked is not None:
            components.append(
                {
                    "type": "library",
                    "bom-ref": f"dist:{path}",
                    "name": unpacked[0],
                    "version": unpacked[1],
                    "purl": f"pkg:pypi/{unpacked[0]}@{unpacked[1]}",
                    "properties": [{"name": "edge-ota:dist-info:path", "value": path}],
                }
            )
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
