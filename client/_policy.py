"""Pure install decisions: what this device may install, and why not. No IO, no clock.

Like python-tuf's ``trusted_metadata_set``, this module only decides and raises; the updater
does the downloading and the disk. Inputs are the device's facts, what it has committed, a
TUF-verified :class:`~ota.bundle.ModelIndex` and the TUF-verified :class:`~ota.bundle.TargetFacts`
of a candidate.

Invariants enforced here (DESIGN decisions 3 and 4):

* a release is installable only if its counter is strictly above the committed counter of its
  model and not below any security floor (the index's, the release's, the committed one);
* the rollout state must let this device in: not paused, not yanked, ring order
  ``canary < pilot < ga`` (a device in ring ``d`` takes a release at ring ``r`` iff
  ``index(d) <= index(r)``), and the device's deterministic bucket below the percentage;
* the release must be compatible: arch, hardware tier, execution providers, PEP 440 runtime
  range, minimum client version;
* a release that failed here is never retried;
* the index and the release target must agree on name, version and counter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from ota.bundle import RINGS, ModelIndex, Release, RolloutState, TargetFacts
from ota.errors import DowngradeError, SecurityError

_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "aarch64": "arm64", "armv8": "arm64"}


def normalize_arch(arch: str) -> str:
    """Canonical architecture token: ``x86_64`` or ``arm64`` for their usual aliases."""
    a = arch.strip().lower()
    return _ARCH_ALIASES.get(a, a)


@dataclass(frozen=True)
class DeviceFacts:
    """What the device is. ``ring`` is one of :data:`ota.bundle.RINGS`."""

    device_id: str
    arch: str
    tier: str
    ring: str = "ga"
    runtime_version: str = ""
    client_version: str = "0.0.0"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)


@dataclass(frozen=True)
class Committed:
    """What the device has committed: highest confirmed counter and floor per model, and the
    releases that failed here (``(name, version)`` pairs)."""

    counters: Mapping[str, int] = field(default_factory=dict)
    floors: Mapping[str, int] = field(default_factory=dict)
    failed: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True)
class Skip:
    """Why one release of the index was not chosen. ``security`` marks a refusal that must be
    reported as a security event (a downgrade attempt, an inconsistent repository)."""

    version: str
    reason: str
    security: bool = False


@dataclass(frozen=True)
class Ranking:
    """Result of :func:`rank`: eligible rollout entries, best first, and the skipped ones."""

    candidates: tuple[RolloutState, ...]
    skipped: tuple[Skip, ...]


def bucket(device_id: str, name: str, version: str) -> float:
    """Deterministic percentage bucket in ``[0, 100)`` of a device for one release.

    Stable across runs and platforms: sha256 of ``device_id``, ``name`` and ``version``
    separated by NUL bytes, first 8 bytes as a big-endian integer, scaled.
    """
    digest = hashlib.sha256(f"{device_id}\0{name}\0{version}".encode()).digest()
    return int.from_bytes(digest[:8], "big") * 100.0 / 2.0**64


def ring_allows(device_ring: str, release_ring: str) -> bool:
    """True iff a device in ``device_ring`` may take a release rolled out to ``release_ring``.

    Raises:
        SecurityError: an unknown ring name (the index parser already refuses them).
    """
    if device_ring not in RINGS or release_ring not in RINGS:
        raise SecurityError(f"unknown ring {device_ring!r} or {release_ring!r}")
    return RINGS.index(device_ring) <= RINGS.index(release_ring)


def semver_key(version: str) -> tuple[int, int, int, int, tuple[tuple[int, int, str], ...]]:
    """Sort key of a SemVer 2.0 version by precedence (build metadata ignored)."""
    core, _, pre = version.split("+", 1)[0].partition("-")
    major, minor, patch = (int(x) for x in core.split("."))
    if not pre:
        return (major, minor, patch, 1, ())
    ids = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return (major, minor, patch, 0, ids)


def floor_of(name: str, index: ModelIndex | None, committed: Committed) -> int:
    """The security floor in force for ``name``: the highest of the index's and the device's."""
    return max(index.security_floor if index else 0, committed.floors.get(name, 0))


def rank(index: ModelIndex, device: DeviceFacts, committed: Committed,
         committed_version: str | None = None) -> Ranking:
    """Order the index's releases this device may take, best (highest counter) first.

    A release whose SemVer version is above the committed version but whose counter is not
    above the committed counter is a downgrade attempt (a newly signed pointer to old bytes
    with a lower counter) and is reported as a security skip.

    Raises:
        SecurityError: the index lists one version twice or one counter for two versions.
    """
    _check_index(index)
    name = index.name
    have = committed.counters.get(name, 0)
    floor = floor_of(name, index, committed)
    ok: list[RolloutState] = []
    skipped: list[Skip] = []
    for r in index.releases:
        reason = _rollout_reason(r, name, device, committed, have=have, floor=floor)
        if reason is None:
            ok.append(r)
            continue
        # An equal counter is the release this device committed (counters are unique per
        # model): not an attack, e.g. after a yank or a local revert. A lower counter on a
        # version that looks newer is a newly signed pointer to old bytes.
        security = (
            reason.startswith("downgrade")
            and r.counter < have
            and _looks_newer(r.version, committed_version)
        )
        skipped.append(Skip(r.version, reason, security))
    ok.sort(key=lambda r: r.counter, reverse=True)
    return Ranking(tuple(ok), tuple(skipped))


def check_release(facts: TargetFacts, state: RolloutState, index: ModelIndex,
                  device: DeviceFacts, committed: Committed) -> str | None:
    """Check a candidate's signed facts against its index entry and this device.

    Returns None if the release may be installed, else the reason it is incompatible with
    this device (an ordinary skip: another release may fit).

    Raises:
        SecurityError: the target's facts contradict the index (name, version, counter).
        DowngradeError: the counter is not above the committed one, or below a floor.
    """
    rel = facts.release
    if (rel.name, rel.version, rel.counter) != (index.name, state.version, state.counter):
        raise SecurityError(
            f"release target {rel.name} {rel.version} (counter {rel.counter}) contradicts its "
            f"index entry {index.name} {state.version} (counter {state.counter})"
        )
    check_counter(rel, index, committed)
    return compat_reason(rel, device)


def check_counter(rel: Release, index: ModelIndex | None, committed: Committed) -> None:
    """Raise unless ``rel`` is strictly above the committed counter and every floor.

    Raises:
        DowngradeError: a counter at or below the committed one, or below a security floor.
    """
    have = committed.counters.get(rel.name, 0)
    if rel.counter <= have:
        raise DowngradeError(
            f"downgrade refused: {rel.name} {rel.version} has counter {rel.counter}, "
            f"committed counter is {have}"
        )
    floor = max(floor_of(rel.name, index, committed), rel.security_floor)
    if rel.counter < floor:
        raise DowngradeError(
            f"{rel.name} {rel.version} (counter {rel.counter}) is below the security floor {floor}"
        )


def compat_reason(rel: Release, device: DeviceFacts) -> str | None:
    """None if ``rel`` is compatible with ``device``, else a human-readable reason."""
    c = rel.compat
    reasons = []
    if c.arch and normalize_arch(device.arch) not in {normalize_arch(a) for a in c.arch}:
        reasons.append(f"arch {device.arch} not in {list(c.arch)}")
    if c.tiers and device.tier not in c.tiers:
        reasons.append(f"hardware tier {device.tier} not in {list(c.tiers)}")
    missing = [p for p in c.providers if p not in device.providers]
    if missing:
        reasons.append(f"execution providers {missing} not available")
    reasons.append(_runtime_reason(c.runtime, device.runtime_version) or "")
    try:
        if Version(device.client_version) < Version(c.min_client):
            reasons.append(f"client {device.client_version} older than required {c.min_client}")
    except InvalidVersion:
        reasons.append(f"client version {device.client_version!r} cannot be compared")
    reasons = [r for r in reasons if r]
    return "; ".join(reasons) if reasons else None


def _runtime_reason(runtime_range: str, runtime_version: str) -> str | None:
    if not runtime_range:
        return None
    try:
        spec = SpecifierSet(runtime_range)
    except InvalidSpecifier:
        return f"unparseable runtime range {runtime_range!r}"
    try:
        runtime = Version(runtime_version)
    except InvalidVersion:
        return f"runtime version {runtime_version!r} unknown; release needs {spec}"
    if not spec.contains(runtime, prereleases=True):
        return f"runtime {runtime} not in {spec}"
    return None


def failed_set(pairs: Iterable[tuple[str, str]]) -> frozenset[tuple[str, str]]:
    return frozenset((n, v) for n, v in pairs)


# -- helpers -------------------------------------------------------------------------------


def _check_index(index: ModelIndex) -> None:
    versions: set[str] = set()
    counters: set[int] = set()
    for r in index.releases:
        if r.version in versions or r.counter in counters:
            raise SecurityError(f"index of {index.name} repeats version or counter of {r.version}")
        versions.add(r.version)
        counters.add(r.counter)


def _rollout_reason(r: RolloutState, name: str, device: DeviceFacts, committed: Committed,
                    *, have: int, floor: int) -> str | None:
    """The first reason, in this order, that keeps ``r`` from this device, or None."""
    checks = (
        (r.yanked, "yanked"),
        ((name, r.version) in committed.failed, "failed on this device before"),
        (r.counter <= have, f"downgrade: counter {r.counter} is not above committed {have}"),
        (r.counter < floor, f"downgrade: counter {r.counter} below security floor {floor}"),
        (r.paused, "rollout paused"),
        (not ring_allows(device.ring, r.ring),
         f"rollout at ring {r.ring}, device is in ring {device.ring}"),
        (bucket(device.device_id, name, r.version) >= r.percent,
         f"outside the {r.percent:g}% rollout bucket"),
    )
    return next((why for hit, why in checks if hit), None)


def _looks_newer(version: str, committed_version: str | None) -> bool:
    if committed_version is None:
        return False
    return semver_key(version) > semver_key(committed_version)
