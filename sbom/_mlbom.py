"""CycloneDX 1.6 ML-BOM of a bundle: build, validate strictly, read back as a typed view.

Shape of the document (see ``docs/adr`` for the reasons):

* ``metadata.component`` is the model, type ``machine-learning-model``, purl
  ``pkg:generic/<name>@<version>`` (no purl type exists for a private TUF repository; ``generic``
  is the spec's catch-all, and the version is the release's SemVer, so OSV ``SEMVER`` ranges can
  name it), with the bundle's SHA-256 of the model file, licences, supplier and the ``modelCard``.
* ``components``: the runtime (``library``, ``pkg:pypi/<runtime>@<version>``, the PEP 440 range
  the model needs in property ``edge-ota:runtime:range`` because CycloneDX 1.6 has no version
  range on components), one ``file`` component per bundle file with its SHA-256 and size, and one
  ``data`` component per training dataset.
* ``modelCard`` is not modelled by cyclonedx-python-lib 11: it is inserted as data after
  serialisation; graph facts without a schema field are ``modelCard.properties``.

Invariants: output is canonical JSON (sorted keys, no whitespace), identical for identical
inputs (serial number derived from the inputs unless given; timestamp only when given), and it
has passed ``JsonStrictValidator(SchemaVersion.V1_6)`` before it is returned.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ota.bundle import SBOM_FILE, FormatError, validate_bundle_path, validate_name, validate_version
from ota.sbom._common import (
    DEFAULT_LIMITS,
    P_FILE_SIZE,
    P_IR_VERSION,
    P_RUNTIME_RANGE,
    SbomError,
    SbomLimits,
    canonical_json,
    load_json_object,
)
from ota.sbom._modelcard import ModelCardFacts, model_card
from ota.sbom._schema import flatten_components, strict_validate

MODEL_REF = "model"
MODEL_CARD_REF = "model-card"
RUNTIME_REF = "runtime"
_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")
_SERIAL_NS = uuid.UUID("5b0f3c1e-8a57-4c55-9a43-6f1d0f2b7e10")  # edge-ota SBOM serials


@dataclass(frozen=True)
class ComponentInfo:
    """One component of an SBOM as :func:`load_sbom` reads it. ``hashes`` is sorted
    ``(algorithm, hex)``; ``key`` identifies "the same component" across two SBOMs."""

    bom_ref: str
    type: str
    name: str
    group: str = ""
    version: str = ""
    purl: str = ""
    hashes: tuple[tuple[str, str], ...] = ()
    properties: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.type, self.group, self.name)

    @property
    def sha256(self) -> str | None:
        return next((h for alg, h in self.hashes if alg == "SHA-256"), None)

    def prop(self, name: str) -> str | None:
        return next((v for n, v in self.properties if n == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bom_ref": self.bom_ref,
            "type": self.type,
            "name": self.name,
            "group": self.group,
            "version": self.version,
            "purl": self.purl,
            "hashes": dict(self.hashes),
        }


@dataclass(frozen=True)
class SbomView:
    """A strictly validated SBOM, typed. ``model`` is the ``machine-learning-model`` component
    (``metadata.component`` in ours), ``components`` every other component, nested ones
    flattened; ``model_card`` is None when the SBOM carries no edge-ota graph facts."""

    serial_number: str
    model: ComponentInfo | None
    components: tuple[ComponentInfo, ...]
    model_card: ModelCardFacts | None

    def all_components(self) -> tuple[ComponentInfo, ...]:
        return ((self.model,) if self.model else ()) + self.components

    @property
    def runtime_range(self) -> str | None:
        return next(
            (r for c in self.components if (r := c.prop(P_RUNTIME_RANGE)) is not None), None
        )

    def file_hashes(self) -> dict[str, str]:
        """Bundle path -> SHA-256 of every ``file`` component."""
        return {c.name: h for c in self.components if c.type == "file" and (h := c.sha256)}


def build_mlbom(
    *,
    name: str,
    version: str,
    model_path: Path,
    files: Mapping[str, tuple[str, int]],
    runtime: str = "onnxruntime",
    runtime_range: str,
    runtime_version: str | None = None,
    datasets: Sequence[str] = (),
    licenses: Sequence[str] = (),
    supplier: str | None = None,
    serial: uuid.UUID | None = None,
    timestamp: datetime | None = None,
    task: str | None = None,
    architecture: str | None = None,
    model_bundle_path: str = "model/model.onnx",
    model_card_extra: Mapping[str, Any] | None = None,
    facts: ModelCardFacts | None = None,
    limits: SbomLimits = DEFAULT_LIMITS,
) -> bytes:
    """Build the CycloneDX 1.6 ML-BOM of one bundle and return canonical JSON bytes.

    Args:
        files: bundle path -> (sha256 hex, size) of every file except ``sbom.cdx.json`` itself.
        runtime_range: PEP 440 specifier the model needs, e.g. ``">=1.20,<2"``.
        runtime_version: the runtime version the bundle was tested with; must satisfy the range.
        serial: BOM serial; default is a UUIDv5 of the inputs (same inputs, same serial).
        timestamp: ``metadata.timestamp``; omitted when None so that the bytes are reproducible.
        model_card_extra: model-card fragments given by the operator (``considerations``,
            ``quantitativeAnalysis``, ...), merged into the generated card and validated with it.
        facts: precomputed :func:`model_card` facts of ``model_path`` (read when None).

    Raises:
        SbomError: invalid name, version, range, file entry, or a document the strict
            schema rejects (the message carries the validator's reason and JSON path).
        ota.errors.InputError: bad name or version (from :mod:`ota.bundle`).
    """
    from cyclonedx.model import HashAlgorithm, HashType, Property
    from cyclonedx.model.bom import Bom, BomMetaData
    from cyclonedx.model.component import Component, ComponentScope, ComponentType
    from cyclonedx.model.contact import OrganizationalEntity
    from cyclonedx.output.json import JsonV1Dot6
    from packageurl import PackageURL

    validate_name(name)
    validate_version(version)
    runtime_pkg = _pypi_name(runtime)
    _check_runtime(runtime_range, runtime_version)
    entries = _check_files(files, limits)
    if facts is None:
        facts = model_card(model_path, limits=limits)

    supplier_entity = OrganizationalEntity(name=supplier) if supplier else None
    model_hash = files.get(model_bundle_path)
    model = Component(
        type=ComponentType.MACHINE_LEARNING_MODEL,
        bom_ref=MODEL_REF,
        name=name,
        version=version,
        purl=PackageURL(type="generic", name=name, version=version),
        supplier=supplier_entity,
        licenses=_licenses(licenses),
        hashes=[HashType(alg=HashAlgorithm.SHA_256, content=model_hash[0])] if model_hash else [],
    )
    rt = Component(
        type=ComponentType.LIBRARY,
        bom_ref=RUNTIME_REF,
        name=runtime_pkg,
        version=runtime_version,
        scope=ComponentScope.REQUIRED,
        purl=PackageURL(type="pypi", name=runtime_pkg, version=runtime_version),
        properties=[Property(name=P_RUNTIME_RANGE, value=runtime_range)],
    )
    data = [Component(type=ComponentType.DATA, bom_ref=f"dataset:{d}", name=d) for d in datasets]
    # File components are added as data after serialisation: the library registers a
    # dependency entry per component with a linear scan (quadratic: ~10 s for 4,000 files).
    file_components = [
        {
            "type": "file",
            "bom-ref": f"file:{path}",
            "name": path,
            "hashes": [{"alg": "SHA-256", "content": sha}],
            "properties": [{"name": P_FILE_SIZE, "value": str(size)}],
        }
        for path, (sha, size) in entries
    ]
    if serial is None:
        seed = canonical_json([name, version, runtime_pkg, runtime_range, runtime_version,
                               entries, list(datasets), list(licenses), supplier])  # fmt: skip
        serial = uuid.uuid5(_SERIAL_NS, seed.decode())
    bom = Bom(
        serial_number=serial,
        metadata=BomMetaData(component=model, supplier=supplier_entity, timestamp=timestamp),
    )
    bom.metadata.tools.components.add(
        Component(type=ComponentType.APPLICATION, name="edge-ota", version=_own_version())
    )
    for c in (rt, *data):
        bom.components.add(c)
    bom.register_dependency(model, [rt, *data])
    for c in (rt, *data):
        bom.register_dependency(c, [])
    doc: dict[str, Any] = _loads(JsonV1Dot6(bom).output_as_string())
    if timestamp is None:
        doc["metadata"].pop("timestamp", None)
    doc["components"] = doc.get("components", []) + file_components
    doc["metadata"]["component"]["modelCard"] = _card(
        facts, task, architecture, datasets, model_card_extra
    )
    out = canonical_json(doc)
    strict_validate(doc, limits)
    return out


def _licenses(values: Sequence[str]) -> list[Any]:
    """cyclonedx licences of ``values`` (SPDX ids, expressions, else names). The factory is
    imported only when there are any: its SPDX module builds the whole SPDX licence index at
    import, about 30 ms of CPU that a publish without ``--license`` never needs (issue 13)."""
    if not values:
        return []
    from cyclonedx.contrib.license.factories import LicenseFactory

    lf = LicenseFactory()
    return [lf.make_from_string(s) for s in values]


def validate_sbom(data: bytes, *, limits: SbomLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Parse and strictly validate a CycloneDX 1.6 JSON SBOM; return the document.

    Raises:
        SbomError: larger than ``limits.max_sbom_bytes``, not JSON, not CycloneDX 1.6, more
            than ``limits.max_components`` components, or rejected by the strict 1.6 schema.
    """
    doc = load_json_object(data, "SBOM", limits.max_sbom_bytes)
    if doc.get("bomFormat") != "CycloneDX" or doc.get("specVersion") != "1.6":
        raise SbomError("not a CycloneDX 1.6 SBOM (bomFormat/specVersion)")
    strict_validate(doc, limits)
    return doc


def load_sbom(data: bytes, *, limits: SbomLimits = DEFAULT_LIMITS,
              schema: bool = True) -> SbomView:  # fmt: skip
    """Strictly validate an SBOM (see :func:`validate_sbom`) and return its typed view.

    ``schema=False`` skips only the CycloneDX JSON-schema check (it needs cyclonedx, which a
    device-only install lacks): the size bound, format, version and the structure this view
    reads are still checked. Callers must say that the schema was not checked.

    Raises:
        SbomError: everything :func:`validate_sbom` raises, or edge-ota model-card properties
            that are present but malformed.
    """
    if schema:
        doc = validate_sbom(data, limits=limits)
    else:
        doc = load_json_object(data, "SBOM", limits.max_sbom_bytes)
        if doc.get("bomFormat") != "CycloneDX" or doc.get("specVersion") != "1.6":
            raise SbomError("not a CycloneDX 1.6 SBOM (bomFormat/specVersion)")
        try:
            return _view(doc, limits)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise SbomError(f"malformed SBOM structure: {type(e).__name__}: {e}") from e
    return _view(doc, limits)


def _view(doc: dict[str, Any], limits: SbomLimits) -> SbomView:
    meta = doc.get("metadata", {})
    all_raw: list[dict[str, Any]] = []
    if "component" in meta:
        all_raw.append(meta["component"])
    all_raw += flatten_components(doc.get("components", []), limits.max_components + 1)
    if len(all_raw) > limits.max_components + 1:
        raise SbomError(f"more than {limits.max_components} components")
    model_raw = next((c for c in all_raw if c["type"] == "machine-learning-model"), None)
    card = None
    if model_raw is not None and "modelCard" in model_raw:
        props = _props(model_raw["modelCard"].get("properties", []))
        if any(n == P_IR_VERSION for n, _ in props):
            card = ModelCardFacts.from_properties(props)
    infos = [_info(c) for c in all_raw if c is not model_raw]
    return SbomView(
        serial_number=str(doc.get("serialNumber", "")),
        model=_info(model_raw) if model_raw is not None else None,
        components=tuple(infos),
        model_card=card,
    )


# -- helpers -------------------------------------------------------------------------------


def _info(c: dict[str, Any]) -> ComponentInfo:
    return ComponentInfo(
        bom_ref=str(c.get("bom-ref", "")),
        type=c["type"],
        name=c["name"],
        group=c.get("group", ""),
        version=c.get("version", ""),
        purl=c.get("purl", ""),
        hashes=tuple(sorted((h["alg"], h["content"].lower()) for h in c.get("hashes", []))),
        properties=_props(c.get("properties", [])),
    )


def _props(raw: list[dict[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple((p["name"], p.get("value", "")) for p in raw)


def _card(
    facts: ModelCardFacts,
    task: str | None,
    architecture: str | None,
    datasets: Sequence[str],
    extra: Mapping[str, Any] | None,
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "inputs": [{"format": t.signature()} for t in facts.inputs],
        "outputs": [{"format": t.signature()} for t in facts.outputs],
    }
    if task:
        params["task"] = task
    if architecture:
        params["architectureFamily"] = architecture
    if datasets:
        params["datasets"] = [{"ref": f"dataset:{d}"} for d in datasets]
    card: dict[str, Any] = {
        "bom-ref": MODEL_CARD_REF,
        "modelParameters": params,
        "properties": [{"name": n, "value": v} for n, v in facts.to_properties()],
    }
    for key, value in (extra or {}).items():  # dicts merge, lists extend, the rest replaces
        if isinstance(value, Mapping) and isinstance(card.get(key), dict):
            card[key] = {**card[key], **value}
        elif isinstance(value, list) and isinstance(card.get(key), list):
            card[key] = card[key] + value
        else:
            card[key] = value
    return card


def _check_files(
    files: Mapping[str, tuple[str, int]], limits: SbomLimits
) -> list[tuple[str, tuple[str, int]]]:
    if len(files) + 2 > limits.max_components:
        raise SbomError(f"more than {limits.max_components - 2} files")
    out = []
    for path, (sha, size) in sorted(files.items()):
        try:
            validate_bundle_path(path)
        except FormatError as e:
            raise SbomError(str(e)) from e
        if path == SBOM_FILE:
            raise SbomError(f"{SBOM_FILE} cannot list its own hash")
        if not isinstance(sha, str) or not _HEX64.match(sha):
            raise SbomError(f"bad sha256 for {path}: {sha!r:.80}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise SbomError(f"bad size for {path}: {size!r:.40}")
        out.append((path, (sha, size)))
    return out


def _check_runtime(runtime_range: str, runtime_version: str | None) -> None:
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        spec = SpecifierSet(runtime_range)
    except InvalidSpecifier as e:
        raise SbomError(f"runtime range {runtime_range!r} is not a PEP 440 specifier") from e
    if runtime_version is None:
        return
    try:
        v = Version(runtime_version)
    except InvalidVersion as e:
        raise SbomError(f"runtime version {runtime_version!r} is not a PEP 440 version") from e
    if not spec.contains(v, prereleases=True):
        raise SbomError(f"runtime version {runtime_version} is outside {runtime_range!r}")


def _pypi_name(name: str) -> str:
    """PEP 503 normalised name (the pypi purl type asks for it)."""
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,98}[A-Za-z0-9])?", name):
        raise SbomError(f"invalid runtime package name {name!r:.80}")
    return re.sub(r"[-_.]+", "-", name).lower()


def _own_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edge-ota")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0+unknown"


def _loads(text: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(text)
    return doc
