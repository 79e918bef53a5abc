"""Supply-chain facts of a bundle: CycloneDX 1.6 ML-BOM, model card, diff, OSV matching.

Design decision 9 (``DESIGN.md``): every bundle carries ``sbom.cdx.json``, a CycloneDX 1.6
ML-BOM with the model card read from the ONNX graph, the runtime with its purl, and every file
hash; its digest is bound into the signed TUF target.

Importing this package is cheap: it imports none of its modules (each public name is imported
on first use, PEP 562, so a publish never loads the diff or OSV modules), and cyclonedx, onnx,
packaging and packageurl are imported inside the functions that use them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ota._lazy import exports

if TYPE_CHECKING:
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

# Public name -> the private module that defines it, imported on first use (PEP 562, as
# ota.client): a publish needs a few of them, and importing the others (and what they import)
# cost every fresh ``ota publish`` their import time (issue 13).
_LAZY = {
    "DEFAULT_LIMITS": "_common",
    "SbomError": "_common",
    "SbomLimits": "_common",
    "ComponentChange": "_diff",
    "FieldChange": "_diff",
    "SbomDiff": "_diff",
    "diff_sboms": "_diff",
    "diff_views": "_diff",
    "render_diff": "_diff",
    "ComponentInfo": "_mlbom",
    "SbomView": "_mlbom",
    "build_mlbom": "_mlbom",
    "load_sbom": "_mlbom",
    "validate_sbom": "_mlbom",
    "ModelCardFacts": "_modelcard",
    "TensorInfo": "_modelcard",
    "model_card": "_modelcard",
    "OsvDatabase": "_osv",
    "VulnMatch": "_osv",
    "load_osv": "_osv",
    "match_osv": "_osv",
    "severity_at_least": "_osv",
    "build_runtime_bom": "_runtime_bom",
    "Severity": "_severity",
    "cvss_base_score": "_severity",
}


__getattr__, __dir__ = exports(__name__, _LAZY, globals())


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
