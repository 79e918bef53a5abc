"""What changed between two releases' SBOMs: components and model-card facts.

Components are matched by ``(type, group, name)`` (the n-th duplicate with the n-th), not by
bom-ref, so SBOMs from other tools diff too. A component is *changed* when its version, purl,
any hash or any property differs. Model-card changes cover producer, IR version, opsets,
inputs and outputs (presence, dtype, shape), precision, quantization, parameter and node count.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ota.sbom._common import DEFAULT_LIMITS, SbomLimits
from ota.sbom._mlbom import ComponentInfo, SbomView, load_sbom
from ota.sbom._modelcard import ModelCardFacts, TensorInfo


@dataclass(frozen=True)
class FieldChange:
    """One fact that changed; ``None`` means absent on that side."""

    field: str
    old: str | None
    new: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"field": self.field, "old": self.old, "new": self.new}


@dataclass(frozen=True)
class ComponentChange:
    type: str
    name: str
    group: str
    changes: tuple[FieldChange, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "group": self.group,
            "name": self.name,
            "changes": [c.to_dict() for c in self.changes],
        }


@dataclass(frozen=True)
class SbomDiff:
    """Differences from SBOM ``a`` (old) to SBOM ``b`` (new); every tuple is sorted."""

    old: str  # "name@version" of the model in a, or its serial number
    new: str
    added: tuple[ComponentInfo, ...]
    removed: tuple[ComponentInfo, ...]
    changed: tuple[ComponentChange, ...]
    model_card: tuple[FieldChange, ...]

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.model_card)

    def to_dict(self) -> dict[str, Any]:
        return {
            "old": self.old,
            "new": self.new,
            "added": [c.to_dict() for c in self.added],
            "removed": [c.to_dict() for c in self.removed],
            "changed": [c.to_dict() for c in self.changed],
            "model_card": [c.to_dict() for c in self.model_card],
        }


def diff_sboms(a: bytes, b: bytes, *, limits: SbomLimits = DEFAULT_LIMITS) -> SbomDiff:
    """Strictly validate both SBOMs and return what changed from ``a`` to ``b``.

    Raises:
        SbomError: either SBOM is invalid (see :func:`ota.sbom.load_sbom`).
    """
    return diff_views(load_sbom(a, limits=limits), load_sbom(b, limits=limits))


def diff_views(a: SbomView, b: SbomView) -> SbomDiff:
    """:func:`diff_sboms` on already loaded views. Never raises."""
    old, new = _keyed(a.all_components()), _keyed(b.all_components())
    added = tuple(new[k] for k in sorted(new.keys() - old.keys()))
    removed = tuple(old[k] for k in sorted(old.keys() - new.keys()))
    changed = []
    for k in sorted(old.keys() & new.keys()):
        fields = _component_changes(old[k], new[k])
        if fields:
            changed.append(ComponentChange(k[0], k[2], k[1], fields))
    return SbomDiff(
        old=_label(a),
        new=_label(b),
        added=added,
        removed=removed,
        changed=tuple(changed),
        model_card=_card_changes(a.model_card, b.model_card),
    )


def render_diff(diff: SbomDiff) -> str:
    """A human-readable report, one change per line; hashes shortened to 12 hex digits."""
    lines = [f"SBOM diff {diff.old} -> {diff.new}"]
    if diff.empty:
        return lines[0] + ": no differences"
    for title, mark, comps in (("added", "+", diff.added), ("removed", "-", diff.removed)):
        if comps:
            lines.append(f"components {title} ({len(comps)}):")
            lines += [f"  {mark} {c.type} {_name(c.group, c.name)}{_ver(c)}" for c in comps]
    if diff.changed:
        lines.append(f"components changed ({len(diff.changed)}):")
        for ch in diff.changed:
            lines.append(f"  ~ {ch.type} {_name(ch.group, ch.name)}")
            lines += [f"      {_change(f)}" for f in ch.changes]
    if diff.model_card:
        lines.append(f"model card changed ({len(diff.model_card)}):")
        lines += [f"  ~ {_change(f)}" for f in diff.model_card]
    return "\n".join(lines)


# -- helpers -------------------------------------------------------------------------------


def _keyed(components: Iterable[ComponentInfo]) -> dict[tuple[str, str, str, int], ComponentInfo]:
    out: dict[tuple[str, str, str, int], ComponentInfo] = {}
    seen: dict[tuple[str, str, str], int] = {}
    for c in components:
        n = seen.get(c.key, 0)
        seen[c.key] = n + 1
        out[(*c.key, n)] = c
    return out


def _component_changes(a: ComponentInfo, b: ComponentInfo) -> tuple[FieldChange, ...]:
    out = [
        FieldChange(f, x or None, y or None)
        for f, x, y in (("version", a.version, b.version), ("purl", a.purl, b.purl))
        if x != y
    ]
    out += _mapping_changes("hash ", dict(a.hashes), dict(b.hashes))
    out += _mapping_changes("property ", _multi(a.properties), _multi(b.properties))
    return tuple(out)


def _multi(props: Iterable[tuple[str, str]]) -> dict[str, str]:
    merged: dict[str, list[str]] = {}
    for name, value in props:
        merged.setdefault(name, []).append(value)
    return {k: ", ".join(sorted(v)) for k, v in merged.items()}


def _mapping_changes(prefix: str, a: dict[str, str], b: dict[str, str]) -> list[FieldChange]:
    return [
        FieldChange(prefix + k, a.get(k), b.get(k))
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k)
    ]


def _card_changes(a: ModelCardFacts | None, b: ModelCardFacts | None) -> tuple[FieldChange, ...]:
    if a is None or b is None:
        if a is b:
            return ()
        return (FieldChange("model card", "present" if a else None, "present" if b else None),)
    scalars = {
        "producer": (_producer(a), _producer(b)),
        "ir_version": (str(a.ir_version), str(b.ir_version)),
        "parameters": (str(a.parameters), str(b.parameters)),
        "precision": ("+".join(a.precision), "+".join(b.precision)),
        "quantized": (str(a.quantized).lower(), str(b.quantized).lower()),
        "node_count": (str(a.node_count), str(b.node_count)),
    }  # fmt: skip
    out = [FieldChange(k, x, y) for k, (x, y) in scalars.items() if x != y]
    out += _mapping_changes(
        "opset ", {d: str(v) for d, v in a.opsets}, {d: str(v) for d, v in b.opsets}
    )
    out += _tensor_changes("input", a.inputs, b.inputs)
    out += _tensor_changes("output", a.outputs, b.outputs)
    return tuple(out)


def _tensor_changes(
    kind: str, a: tuple[TensorInfo, ...], b: tuple[TensorInfo, ...]
) -> list[FieldChange]:
    old, new = {t.name: t for t in a}, {t.name: t for t in b}
    out = []
    for name in sorted(old.keys() | new.keys()):
        x, y = old.get(name), new.get(name)
        if x is None or y is None:
            out.append(
                FieldChange(
                    f"{kind} {name}", x.signature() if x else None, y.signature() if y else None
                )
            )
            continue
        if x.dtype != y.dtype:
            out.append(FieldChange(f"{kind} {name} dtype", x.dtype, y.dtype))
        if x.shape != y.shape:
            out.append(FieldChange(f"{kind} {name} shape", _shape(x), _shape(y)))
    return out


def _producer(f: ModelCardFacts) -> str:
    return f"{f.producer_name} {f.producer_version}".strip()


def _shape(t: TensorInfo) -> str:
    return "?" if t.shape is None else "[" + ",".join(str(d) for d in t.shape) + "]"


def _label(v: SbomView) -> str:
    if v.model is not None:
        return f"{v.model.name}@{v.model.version}" if v.model.version else v.model.name
    return v.serial_number or "?"


def _name(group: str, name: str) -> str:
    return f"{group}/{name}" if group else name


def _ver(c: ComponentInfo) -> str:
    sha = c.sha256
    return (f" {c.version}" if c.version else "") + (f" sha256:{sha[:12]}" if sha else "")


def _change(f: FieldChange) -> str:
    def short(v: str | None) -> str:
        if v is None:
            return "(absent)"
        return v[:12] + "…" if len(v) == 64 and all(ch in "0123456789abcdef" for ch in v) else v

    return f"{f.field}: {short(f.old)} -> {short(f.new)}"
