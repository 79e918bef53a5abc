"""Supply-chain facts of a bundle: CycloneDX 1.6 ML-BOM, model card, diff, OSV matching.

Design decision 9 (``DESIGN.md``): every bundle carries ``sbom.cdx.json``, a CycloneDX 1.6
ML-BOM with the model card read from the ONNX graph, the runtime with its purl, and every file
hash; its digest is bound into the signed TUF target.

Importing this package is cheap: cyclonedx, onnx, packaging and packageurl are imported inside
the functions that use them (the CLI imports this package on every start; the strict schema
validator alone costs about a second).
"""

from ota.sbom._common import DEFAULT_LIMITS, SbomError, SbomLimits
from ota.sbom._diff import (
    ComponentChange,
    FieldChange,
    SbomDiff,
    diff_sboms,
    diff_views,
    render_diff,
)
from ota.sbom._mlbom import ComponentInfo, SbomView, build_mlbom, load_sbom, validate_sbom
from ota.sbom._modelcard import ModelCardFacts, TensorInfo, model_card
from ota.sbom._osv import OsvDatabase, VulnMatch, load_osv, match_osv, severity_at_least
from ota.sbom._runtime_bom import build_runtime_bom
from ota.sbom._severity import Severity, cvss_base_score

__all__ = [
    "build_runtime_bom",
    "DEFAULT_LIMITS",
    "ComponentChange",
    "ComponentInfo",
    "FieldChange",
    "ModelCardFacts",
    "OsvDatabase",
    "SbomDiff",
    "SbomError",
    "SbomLimits",
    "SbomView",
    "Severity",
    "TensorInfo",
    "VulnMatch",
    "build_mlbom",
    "cvss_base_score",
    "diff_sboms",
    "diff_views",
    "load_osv",
    "load_sbom",
    "match_osv",
    "model_card",
    "render_diff",
    "severity_at_least",
    "validate_sbom",
]
