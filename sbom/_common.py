"""Shared pieces of :mod:`ota.sbom`: the error, the bounds, property names, JSON helpers.

Nothing here imports cyclonedx or onnx: the CLI imports :mod:`ota.sbom` on every start.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ota.errors import InputError

# Property names of the facts that CycloneDX 1.6 has no field for. One namespace, registered
# nowhere yet; values of tensor signatures are canonical JSON so that they round-trip exactly.
PROP_NS = "edge-ota"
P_PRODUCER = f"{PROP_NS}:onnx:producer"
P_PRODUCER_VERSION = f"{PROP_NS}:onnx:producer_version"
P_IR_VERSION = f"{PROP_NS}:onnx:ir_version"
P_OPSET = f"{PROP_NS}:onnx:opset"  # "domain=version", one property per domain
P_INPUT = f"{PROP_NS}:onnx:input"  # canonical JSON of a TensorInfo, one per input, in order
P_OUTPUT = f"{PROP_NS}:onnx:output"
P_PARAMETERS = f"{PROP_NS}:onnx:parameters"
P_PRECISION = f"{PROP_NS}:onnx:precision"  # one per precision, in order of share
P_DTYPE_PARAMS = f"{PROP_NS}:onnx:dtype_parameters"  # "precision=count"
P_QUANTIZED = f"{PROP_NS}:onnx:quantized"
P_NODES = f"{PROP_NS}:onnx:nodes"
P_OP = f"{PROP_NS}:onnx:op"  # "op_type=count", top N
P_GRAPH = f"{PROP_NS}:onnx:graph"
P_RUNTIME_RANGE = f"{PROP_NS}:runtime:range"  # PEP 440 specifier the model needs
P_FILE_SIZE = f"{PROP_NS}:file:size"
P_FILE_PATH = f"{PROP_NS}:file:path"


class SbomError(InputError):
    """An SBOM (built or read) is invalid: schema violation, bad input, out of bounds.

    The message carries the schema validator's reason and the JSON path where it applies.
    """


@dataclass(frozen=True)
class SbomLimits:
    """Bounds on what :mod:`ota.sbom` reads. Every quantity from a file is checked against one.

    Attributes:
        max_model_bytes: size of the ``.onnx`` protobuf itself (external data is never read);
            protobuf cannot parse more than 2 GiB anyway.
        max_graph_depth: nesting of subgraphs (If/Loop/Scan bodies) that is walked.
        max_sbom_bytes: size of one SBOM document.
        max_components: components in one SBOM (a bundle manifest allows 4096 files).
        max_osv_files: files in an OSV export; more is refused (a silently truncated
            vulnerability database would hide vulnerabilities).
        max_osv_file_bytes: one OSV record; larger records are skipped with a warning.
        max_osv_total_bytes: all OSV records together; more is refused.
    """

    max_model_bytes: int = 2 * 1024**3
    max_graph_depth: int = 16
    max_sbom_bytes: int = 16 * 1024 * 1024
    max_components: int = 10_000
    max_osv_files: int = 200_000
    max_osv_file_bytes: int = 4 * 1024 * 1024
    max_osv_total_bytes: int = 2 * 1024**3


DEFAULT_LIMITS = SbomLimits()


def canonical_json(doc: object) -> bytes:
    """Deterministic JSON: sorted keys, no whitespace, UTF-8 (same rule as the bundle format)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def load_json_object(data: bytes, what: str, max_bytes: int) -> dict[str, Any]:
    """Parse bounded JSON that must be an object.

    Raises:
        SbomError: too large, not JSON, or not an object.
    """
    if len(data) > max_bytes:
        raise SbomError(f"{what} of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise SbomError(f"{what} is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise SbomError(f"{what} is not a JSON object")
    return doc
