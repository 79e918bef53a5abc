"""Strict CycloneDX 1.6 JSON schema validation, bounded and linear in the document size.

The schema check is cyclonedx-python-lib's ``JsonStrictValidator(SchemaVersion.V1_6)``,
imported on first use and kept for the process; jsonschema's format libraries that no CycloneDX
format needs are imported only if used (:mod:`ota.sbom._lazy_iri`, :mod:`ota.sbom._lazy_formats`).
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Any

from ota.sbom._common import SbomError, SbomLimits, canonical_json

if TYPE_CHECKING:
    from cyclonedx.validation.json import JsonStrictValidator

_SLICED = ("components", "dependencies")
_SLICE = 128


@functools.cache
def _strict_validator() -> JsonStrictValidator:
    from ota.sbom._lazy_formats import deferred_format_libraries
    from ota.sbom._lazy_iri import install

    install()  # before jsonschema: its IRI grammar is compiled only if an IRI is checked
    with deferred_format_libraries():  # and arrow, webcolors, uri_template only if used
        from cyclonedx.schema import SchemaVersion
        from cyclonedx.validation.json import JsonStrictValidator

    return JsonStrictValidator(SchemaVersion.V1_6)


def strict_validate(doc: dict[str, Any], limits: SbomLimits) -> None:
    """Strict CycloneDX 1.6 schema validation in time linear in the number of components.

    jsonschema checks ``uniqueItems`` by comparing every pair of items (about 25 s for 4,000
    file components here), so long ``components``/``dependencies`` arrays are validated in
    slices of ``_SLICE`` items, each slice with the rest of the document, by the same strict
    validator; uniqueness across slices is checked here on canonical JSON, and bom-refs of
    components are checked unique (a rule of the spec that the schema cannot express).
    """
    flat = flatten_components(doc.get("components", []), limits.max_components + 1)
    if len(flat) > limits.max_components:
        raise SbomError(f"SBOM has more than {limits.max_components} components")
    meta = doc.get("metadata")
    top = [meta["component"]] if isinstance(meta, dict) and "component" in meta else []
    refs = [c["bom-ref"] for c in top + flat if isinstance(c.get("bom-ref"), str)]
    if len(refs) != len(set(refs)):
        raise SbomError("SBOM has duplicate bom-ref values among its components")
    long = [k for k in _SLICED if isinstance(doc.get(k), list) and len(doc[k]) > _SLICE]
    for key in long:
        if len({canonical_json(item) for item in doc[key]}) != len(doc[key]):
            raise SbomError(f"SBOM rejected by the CycloneDX 1.6 strict schema: duplicate {key}")
    rounds = max((-(-len(doc[k]) // _SLICE) for k in long), default=1)
    for i in range(rounds):
        part = dict(doc)
        for key in long:
            part[key] = doc[key][i * _SLICE : (i + 1) * _SLICE]
            if not part[key]:
                del part[key]
        error = _strict_validator().validate_str(canonical_json(part).decode())
        if error is not None:
            raw = error.data
            where = str(getattr(raw, "json_path", "$"))
            for key in long:  # report the index in the whole array, not in the slice
                where = re.sub(
                    rf"^\$\.{key}\[(\d+)\]",
                    lambda m: f"$.{key}[{int(m.group(1)) + i * _SLICE}]",  # noqa: B023
                    where,
                )
            reason = str(getattr(raw, "message", raw))[:500]
            raise SbomError(
                f"SBOM rejected by the CycloneDX 1.6 strict schema at {where}: {reason}"
            )


def flatten_components(raw: object, cap: int = 1 << 30) -> list[dict[str, Any]]:
    """Components and nested components, depth-first, at most ``cap`` (shape is checked by
    the schema; anything that is not a component object is left to it)."""
    out: list[dict[str, Any]] = []
    stack = [raw]
    while stack and len(out) < cap:
        items = stack.pop()
        if not isinstance(items, list):
            continue
        for c in items:
            if isinstance(c, dict):
                out.append(c)
                stack.append(c.get("components", []))
    return out
