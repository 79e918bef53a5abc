"""Match SBOM components against an offline OSV export (https://ossf.github.io/osv-schema/).

An export is a folder of OSV JSON records (searched recursively) or an OSV ``all.zip``. Each
record is checked and bounded: a malformed, oversized or unreadable record is skipped and
listed in :attr:`OsvDatabase.warnings` (and logged), never a crash. More files or bytes than
the limits allow is refused outright, because a silently truncated database hides
vulnerabilities. Withdrawn records are ignored.

Matching (OSV schema, "Evaluation"): a component matches an ``affected[]`` entry when its purl
names the same package (by ``package.purl``, or by ``ecosystem`` + ``name``), and its version
is in ``versions[]`` or inside a ``SEMVER``/``ECOSYSTEM`` range (events sorted by version,
``introduced`` opens, ``fixed`` closes, ``last_affected`` closes after). PyPI versions compare
with :mod:`packaging.version`, others as SemVer 2.0 (PEP 440 as a fallback). ``GIT`` ranges
and versions that cannot be parsed are not matched (logged).

A component with no exact version but a PEP 440 range (property ``edge-ota:runtime:range``:
the runtime a model accepts) is matched *conservatively*: it is affected when the range admits
at least one affected version (the range is read as one interval, ``!=`` exclusions ignored,
pre-releases admitted), and the match says so (:attr:`VulnMatch.note`: "range >=1.16 admits
affected versions >=1.16.0,<1.17.3"). A range that cannot be read is reported as affected
by every record of its package: an unreadable range must not hide a vulnerability.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ota.sbom._common import DEFAULT_LIMITS, P_RUNTIME_RANGE, SbomError, SbomLimits
from ota.sbom._mlbom import ComponentInfo, load_sbom
from ota.sbom._severity import Severity, cvss_base_score

log = logging.getLogger("ota.sbom.osv")

# purl type -> OSV ecosystem (https://ossf.github.io/osv-schema/#affectedpackage-field)
_ECOSYSTEMS = {
    "pypi": "PyPI", "npm": "npm", "maven": "Maven", "golang": "Go", "cargo": "crates.io",
    "gem": "RubyGems", "nuget": "NuGet", "composer": "Packagist", "hex": "Hex", "pub": "Pub",
    "conan": "ConanCenter", "hackage": "Hackage", "cran": "CRAN", "swift": "SwiftURL",
}  # fmt: skip
_SEMVER = re.compile(
    r"^v?(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?\Z"
)
Key = tuple[Any, ...]


@dataclass(frozen=True)
class VulnMatch:
    """One vulnerable component in one release. ``fixed`` lists the first fixed version above
    the installed one, per matching range (empty when no fix is known)."""

    release: str
    vuln_id: str
    aliases: tuple[str, ...]
    summary: str
    severity: Severity | None
    package: str  # purl without version
    version: str  # the exact version, or the PEP 440 range for a range match
    fixed: tuple[str, ...]
    note: str = ""  # for a range match: "range R admits affected versions X"

    @property
    def is_range(self) -> bool:
        return bool(self.note)

    def to_dict(self) -> dict[str, Any]:
        return {
            "release": self.release,
            "id": self.vuln_id,
            "aliases": list(self.aliases),
            "summary": self.summary,
            "severity": self.severity.name if self.severity else None,
            "package": self.package,
            "version": self.version,
            "fixed": list(self.fixed),
            "range": self.is_range,
            "note": self.note,
        }


def severity_at_least(match: VulnMatch, level: Severity | str, *, unknown: bool = True) -> bool:
    """True when ``match`` is at least ``level`` severe. A match whose severity could not be
    derived counts as ``unknown`` (default True: a publish policy fails closed).

    Raises:
        ValueError: ``level`` is not a severity name.
    """
    want = Severity.from_text(level) if isinstance(level, str) else level
    if want is None:
        raise ValueError(f"unknown severity level {level!r}")
    return unknown if match.severity is None else match.severity >= want


@dataclass(frozen=True)
class _Affected:
    keys: tuple[Key, ...]
    pypi: bool
    ranges: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]  # (type, ((event, version),..))
    versions: tuple[str, ...]


@dataclass(frozen=True)
class _Advisory:
    id: str
    aliases: tuple[str, ...]
    summary: str
    severity: Severity | None
    affected: tuple[_Affected, ...]


@dataclass(frozen=True)
class OsvDatabase:
    """Parsed OSV records, indexed by package; ``warnings`` names every skipped record."""

    advisories: tuple[_Advisory, ...]
    warnings: tuple[str, ...]
    _index: dict[Key, list[tuple[_Advisory, _Affected]]] = field(repr=False, compare=False)


def load_osv(path: Path, *, limits: SbomLimits = DEFAULT_LIMITS) -> OsvDatabase:
    """Read an OSV export: a folder of ``*.json`` records (recursive) or an OSV ``.zip``.

    Raises:
        SbomError: ``path`` is missing, or holds more than ``limits.max_osv_files`` records or
            ``limits.max_osv_total_bytes`` bytes.
    """
    warnings: list[str] = []
    advisories: list[_Advisory] = []
    for name, read in _records(Path(path), limits, warnings):
        try:
            data = read()
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            warnings.append(f"{name}: unreadable ({getattr(e, 'strerror', None) or e})")
            continue
        if len(data) > limits.max_osv_file_bytes:
            warnings.append(f"{name}: larger than {limits.max_osv_file_bytes} bytes, skipped")
            continue
        try:
            adv = _parse(json.loads(data))
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
            warnings.append(f"{name}: malformed OSV record, skipped ({str(e)[:200]})")
            continue
        if adv is not None:
            advisories.append(adv)
    for w in warnings:
        log.warning("OSV export: %s", w)
    index: dict[Key, list[tuple[_Advisory, _Affected]]] = {}
    for adv in advisories:
        for aff in adv.affected:
            for key in aff.keys:
                index.setdefault(key, []).append((adv, aff))
    return OsvDatabase(tuple(advisories), tuple(warnings), index)


def match_osv(
    sboms: Iterable[tuple[str, bytes]],
    osv_dir: Path | OsvDatabase,
    *,
    limits: SbomLimits = DEFAULT_LIMITS,
) -> list[VulnMatch]:
    """Every (release, vulnerability, component) match, sorted by release, id and package.

    ``sboms`` pairs a release id (e.g. ``"model@1.0.0"``) with its SBOM bytes; every SBOM is
    strictly validated. Skipped OSV records are logged (see :func:`load_osv` to get them).

    Raises:
        SbomError: an SBOM is invalid (the message names the release), or the export is
            refused by :func:`load_osv`.
    """
    db = osv_dir if isinstance(osv_dir, OsvDatabase) else load_osv(osv_dir, limits=limits)
    out: set[VulnMatch] = set()
    for release, data in sboms:
        try:
            view = load_sbom(data, limits=limits)
        except SbomError as e:
            raise SbomError(f"SBOM of {release}: {e}") from e
        for comp in view.all_components():
            out.update(_match_component(release, comp, db))
    return sorted(out, key=lambda m: (m.release, m.vuln_id, m.package, m.version))


# -- matching ------------------------------------------------------------------------------


def _match_component(release: str, comp: ComponentInfo, db: OsvDatabase) -> Iterator[VulnMatch]:
    from packageurl import PackageURL

    if not comp.purl:
        return
    try:
        purl = PackageURL.from_string(comp.purl)
    except ValueError:
        log.warning("%s: unparseable purl %r", release, comp.purl)
        return
    version = purl.version or comp.version
    spec = comp.prop(P_RUNTIME_RANGE) if not version else None
    if not version and not spec:
        return
    keys = _purl_keys(purl.type, purl.namespace, purl.name)
    base = PackageURL(type=purl.type, namespace=purl.namespace, name=purl.name).to_string()
    seen: set[int] = set()
    for key in keys:
        for adv, aff in db._index.get(key, ()):
            if id(aff) in seen:
                continue
            seen.add(id(aff))
            if spec:
                hit, fixed, admitted = _range_affects(aff, spec)
                if hit:
                    note = f"range {spec} admits affected versions {admitted}"
                    yield VulnMatch(release, adv.id, adv.aliases, adv.summary, adv.severity,
                                    base, spec, fixed, note)  # fmt: skip
                continue
            hit, fixed = _affects(aff, version)
            if hit:
                yield VulnMatch(release, adv.id, adv.aliases, adv.summary, adv.severity,
                                base, version, fixed)  # fmt: skip


# An interval of versions: (low, low_closed, high, high_closed); None is unbounded.
_Interval = tuple[Any, bool, Any, bool]


def _range_affects(aff: _Affected, spec: str) -> tuple[bool, tuple[str, ...], str]:
    """Whether the PEP 440 range ``spec`` admits a version that ``aff`` marks affected: the
    fixed versions of the affected intervals it meets, and those intervals as text.

    Conservative by construction: the range is widened to one interval (``!=`` ignored,
    pre-releases admitted); an unreadable range or record is treated as affected.
    """
    from packaging.version import InvalidVersion, Version

    want = _spec_interval(spec)
    if want is None:
        log.warning("unreadable runtime range %r: treated as affected", spec)
        return True, (), "(unreadable range: every version)"
    hits: list[str] = []
    fixed: set[str] = set()
    for x in aff.versions:
        try:
            v = Version(x)
        except InvalidVersion:
            hits.append(x)  # cannot compare: assume it is admitted
            continue
        if _meets(want, (v, True, v, True)):
            hits.append(f"=={x}")
    for kind, events in aff.ranges:
        if kind not in ("SEMVER", "ECOSYSTEM"):
            continue
        try:
            intervals = _affected_intervals(events)
        except InvalidVersion:
            log.warning("cannot compare range %r with OSV range %r: treated as affected",
                        spec, events)  # fmt: skip
            hits.append("(unreadable OSV range)")
            continue
        for iv, text, fix in intervals:
            if _meets(want, iv):
                hits.append(text)
                if fix:
                    fixed.add(fix)
    return bool(hits), tuple(sorted(fixed)), "; ".join(hits)


def _affected_intervals(events: tuple[tuple[str, str], ...]) -> list[tuple[_Interval, str, str]]:
    """The affected intervals of one OSV range, each with its text and its fixed version.

    Raises:
        InvalidVersion: an event's version is not PEP 440.
    """
    from packaging.version import Version

    keyed = sorted(
        ((e, x, None if (e == "introduced" and x == "0") else Version(x)) for e, x in events),
        key=lambda t: (t[2] is not None, t[2] or Version("0")),
    )
    out: list[tuple[_Interval, str, str]] = []
    start: tuple[str, Any] | None = None
    for event, text, key in keyed:
        if event == "introduced":
            if start is None:
                start = (text, key)
        elif start is not None:
            closed = event == "last_affected"
            low = f">={start[0]}," if start[1] is not None else ""
            label = f"{low}{'<=' if closed else '<'}{text}"
            out.append(((start[1], True, key, closed), label, "" if closed else text))
            start = None
    if start is not None:
        out.append(((start[1], True, None, False), f">={start[0]}", ""))
    return out


def _spec_interval(spec: str) -> _Interval | None:
    """The smallest interval holding every version ``spec`` admits (None: unreadable)."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        specs = list(SpecifierSet(spec))
    except InvalidSpecifier:
        return None
    low: tuple[Any, bool] = (None, True)
    high: tuple[Any, bool] = (None, True)
    try:
        for s in specs:
            op, ver = s.operator, s.version
            if op == "!=":
                continue
            if op in ("==", "~=") and (op == "~=" or ver.endswith(".*")):
                base = ver[:-2] if ver.endswith(".*") else ver
                v = Version(base)
                rel = v.release if op == "==" else v.release[:-1]
                top = Version(".".join(map(str, (*rel[:-1], rel[-1] + 1))) + ".dev0")
                bounds = [(">=", Version(base + ".dev0") if op == "==" else v), ("<", top)]
            elif op in ("==", "==="):
                v = Version(ver)
                bounds = [(">=", v), ("<=", v)]
            else:
                bounds = [(op, Version(ver))]
            for bop, v in bounds:
                if bop in (">=", ">"):
                    cand = (v, bop == ">=")
                    if low[0] is None or v > low[0] or (v == low[0] and not cand[1]):
                        low = cand
                else:
                    cand = (v, bop == "<=")
                    if high[0] is None or v < high[0] or (v == high[0] and not cand[1]):
                        high = cand
    except (InvalidVersion, IndexError):
        return None
    return (low[0], low[1], high[0], high[1])


def _meets(a: _Interval, b: _Interval) -> bool:
    """Whether two version intervals share a version (versions are dense enough: any two
    distinct versions have others between them, e.g. post- or dev-releases)."""
    lows = [(x, c) for x, c in ((a[0], a[1]), (b[0], b[1])) if x is not None]
    highs = [(x, c) for x, c in ((a[2], a[3]), (b[2], b[3])) if x is not None]
    if not lows or not highs:
        return True
    lo = max(lows, key=lambda t: (t[0], not t[1]))
    hi = min(highs, key=lambda t: (t[0], t[1]))
    return bool(lo[0] < hi[0] or (lo[0] == hi[0] and lo[1] and hi[1]))


def _affects(aff: _Affected, version: str) -> tuple[bool, tuple[str, ...]]:
    """Whether ``version`` is affected, and the first fixed version above it per range."""
    hit = False
    for x in aff.versions:
        keys = _keys([version, x], aff.pypi)
        hit = hit or (keys[0] == keys[1] if keys else version == x)
    fixed: list[str] = []
    for kind, events in aff.ranges:
        if kind not in ("SEMVER", "ECOSYSTEM"):
            continue
        nonzero = [x for e, x in events if not (e == "introduced" and x == "0")]
        keys = _keys([version, *nonzero], aff.pypi and kind == "ECOSYSTEM")
        if keys is None:
            log.warning("cannot compare %r with OSV range %r", version, events)
            continue
        v, table = keys[0], dict(zip(nonzero, keys[1:], strict=True))
        ordered = sorted(
            ((e, x, table.get(x) if not (e == "introduced" and x == "0") else None)
             for e, x in events),
            key=lambda t: (t[2] is not None, t[2] if t[2] is not None else v),
        )  # fmt: skip
        if _in_range(v, ordered):
            hit = True
            above = [(k, x) for e, x, k in ordered if e == "fixed" and k is not None and k > v]
            if above:
                fixed.append(min(above)[1])
    return hit, tuple(sorted(set(fixed)))


def _in_range(v: Any, events: list[tuple[str, str, Any]]) -> bool:
    """OSV evaluation over events sorted by version (the "0" introduction first)."""
    affected = False
    for event, _, k in events:
        if event == "introduced" and (k is None or v >= k):
            affected = True
        elif (event == "fixed" and v >= k) or (event == "last_affected" and v > k):
            affected = False
    return affected


def _keys(versions: list[str], pep440: bool) -> list[Any] | None:
    """Comparable keys for all ``versions`` under one scheme (SemVer 2.0 unless ``pep440``;
    PEP 440 when SemVer fails for any of them), or None when no scheme parses them all."""
    if not pep440:
        sem = [_semver_key(x) for x in versions]
        if all(k is not None for k in sem):
            return sem
    from packaging.version import InvalidVersion, Version

    try:
        return [Version(x) for x in versions]
    except InvalidVersion:
        return None


def _semver_key(version: str) -> Any:
    """SemVer 2.0 precedence (build metadata ignored), or None when not SemVer."""
    m = _SEMVER.match(version)
    if m is None:
        return None
    pre = m.group(4)
    ids = (
        tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split(".")) if pre else ()
    )
    return (int(m.group(1)), int(m.group(2)), int(m.group(3)), 0 if pre else 1, ids)


def _norm(purl_type: str, name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower() if purl_type == "pypi" else name


def _purl_keys(ptype: str, namespace: str | None, name: str) -> tuple[Key, ...]:
    keys: list[Key] = [("purl", ptype, namespace or "", _norm(ptype, name))]
    eco = _ECOSYSTEMS.get(ptype)
    if eco:
        full = name
        if namespace:
            full = f"{namespace}:{name}" if ptype == "maven" else f"{namespace}/{name}"
        keys.append(("eco", eco, _norm(ptype, full)))
    return tuple(keys)


# -- parsing -------------------------------------------------------------------------------


def _records(
    path: Path, limits: SbomLimits, warnings: list[str]
) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(name, reader) of every record; count and total size are checked before any read."""
    cap = limits.max_osv_file_bytes + 1
    if path.is_file() and zipfile.is_zipfile(path):
        try:
            zf = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile) as e:
            raise SbomError(f"OSV export {path} is not a readable zip file: {e}") from e
        with zf:
            infos = [i for i in zf.infolist() if i.filename.endswith(".json") and not i.is_dir()]
            _check_totals(path, len(infos), sum(i.file_size for i in infos), limits)
            for info in infos:

                def read_member(info: zipfile.ZipInfo = info) -> bytes:
                    with zf.open(info) as member:  # reads at most cap bytes, whatever it claims
                        return member.read(cap)

                yield info.filename, read_member
        return
    if not path.is_dir():
        raise SbomError(f"OSV export {path} is neither a folder nor a zip file")
    files: list[Path] = []
    for root, dirs, names in os.walk(path):  # does not follow symlinked folders
        dirs.sort()
        for n in sorted(names):
            p = Path(root, n)
            if not n.endswith(".json"):
                continue
            if p.is_symlink() or not p.is_file():
                warnings.append(f"{p.relative_to(path)}: not a regular file, skipped")
                continue
            files.append(p)
            if len(files) > limits.max_osv_files:
                break
    _check_totals(path, len(files), sum(p.stat().st_size for p in files), limits)

    def reader(p: Path) -> Callable[[], bytes]:
        def read() -> bytes:
            with open(p, "rb") as f:
                return f.read(cap)

        return read

    for p in files:
        yield str(p.relative_to(path)), reader(p)


def _check_totals(path: Path, count: int, size: int, limits: SbomLimits) -> None:
    if count > limits.max_osv_files:
        raise SbomError(f"OSV export {path} holds more than {limits.max_osv_files} records")
    if size > limits.max_osv_total_bytes:
        raise SbomError(f"OSV export {path} exceeds {limits.max_osv_total_bytes} bytes")


def _parse(doc: Any) -> _Advisory | None:
    """One OSV record, or None when withdrawn. Raises ValueError/TypeError/KeyError if bad."""
    if not isinstance(doc, dict):
        raise TypeError("record is not a JSON object")
    vid = _str(doc["id"], "id")
    if doc.get("withdrawn"):
        return None
    aliases = tuple(_str(a, "alias") for a in doc.get("aliases", []) or [])
    affected = tuple(_parse_affected(a) for a in _list(doc.get("affected", []), "affected"))
    return _Advisory(
        id=vid,
        aliases=aliases,
        summary=str(doc.get("summary", ""))[:300],
        severity=_severity(doc),
        affected=tuple(a for a in affected if a.keys),
    )


def _parse_affected(a: Any) -> _Affected:
    from packageurl import PackageURL

    if not isinstance(a, dict):
        raise TypeError("affected entry is not an object")
    pkg = a.get("package") or {}
    if not isinstance(pkg, dict):
        raise TypeError("package is not an object")
    keys: list[Key] = []
    eco = str(pkg.get("ecosystem", ""))
    pypi = eco == "PyPI"
    if pkg.get("purl"):
        p = PackageURL.from_string(_str(pkg["purl"], "purl"))
        keys.append(("purl", p.type, p.namespace or "", _norm(p.type, p.name)))
        pypi = pypi or p.type == "pypi"
    if eco and pkg.get("name"):
        name = _str(pkg["name"], "name")
        keys.append(("eco", eco.split(":", 1)[0], _norm("pypi" if pypi else "", name)))
    ranges = []
    for r in _list(a.get("ranges", []), "ranges"):
        events = []
        for e in _list(r["events"], "events"):
            if not isinstance(e, dict) or len(e) != 1:
                raise ValueError("an event must have exactly one key")
            ((kind, ver),) = e.items()
            if kind in ("introduced", "fixed", "last_affected"):
                events.append((kind, _str(ver, kind)))
        ranges.append((_str(r["type"], "range type"), tuple(events)))
    versions = tuple(_str(v, "version") for v in _list(a.get("versions", []), "versions"))
    return _Affected(tuple(keys), pypi, tuple(ranges), versions)


def _severity(doc: dict[str, Any]) -> Severity | None:
    """The highest rating any source in the record gives (text ratings, CVSS v2/v3 vectors)."""
    found: list[Severity | None] = []
    for holder in [doc, *[a for a in doc.get("affected", []) if isinstance(a, dict)]]:
        for key in ("database_specific", "ecosystem_specific"):
            extra = holder.get(key)
            if isinstance(extra, dict):
                found.append(Severity.from_text(extra.get("severity")))
        for s in holder.get("severity", []) or []:
            if not isinstance(s, dict):
                continue
            if s.get("type") == "Ubuntu":
                found.append(Severity.from_text(s.get("score")))
            else:
                score = cvss_base_score(s.get("score", ""))
                found.append(Severity.from_score(score) if score is not None else None)
    rated = [f for f in found if f is not None]
    return max(rated) if rated else None


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 1024:
        raise ValueError(f"bad {what}: {value!r:.80}")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"{what} is not a list")
    return value
