"""Pure install decisions: what this device may install, and why not. No IO, no clock.

Like python-tuf's ``trusted_metadata_set``, this module only decides and raises; the updater
does the downloading and the disk. Inputs are the device's facts, what it has committed, a
TUF-verified :class:`~ota.bundle.ModelIndex` and the TUF-verified :class:`~ota.bundle.TargetFacts`
of a candidate.

Invariants enforced here (DESIGN decisions 3 and 4):

* a release is installable only if its counter is strictly above the committed counter of its
  model (or equal to it when it *is* the committed release, re-installed after a local revert)
  and its content is not below any security floor (the index's, the release's, the highest
  one this device has verified); a rollback release is judged by the counter of the release
  whose content it carries (``Release.content_counter``, signed in its facts), never by its
  own newer counter;
* the rollout state must let this device in: not paused, not yanked, ring order
  ``canary < pilot < ga`` (a device in ring ``d`` takes a release at ring ``r`` iff
  ``index(d) <= index(r)``); the percentage applies only to the ring being entered
  (``d == r``): a ring the release has passed (``index(d) < index(r)``) stays at 100 %;
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
    """What the device has committed: highest confirmed counter per model and its version,
    the highest security floor it has ever verified per model, and the releases that failed
    here (``(name, version)`` pairs)."""

    counters: Mapping[str, int] = field(default_factory=dict)
    floors: Mapping[str, int] = field(default_factory=dict)
    failed: frozenset[tuple[str, str]] = frozenset()
    versions: Mapping[str, str] = field(default_factory=dict)


# Kinds of skip: why a release was not taken (``Skip.kind``); the rollout kinds say the
# repository has it but has not rolled it out to this device yet.
ROLLOUT_KINDS = frozenset({"paused", "ring", "bucket"})


@dataclass(frozen=True)
class Skip:
    """Why one release of the index was not chosen. ``security`` marks a refusal that must be
    reported as a security event (a downgrade attempt, an inconsistent repository). ``kind``
    is one of yanked, failed, downgrade, floor, paused, ring, bucket."""

    version: str
    reason: str
    security: bool = False
    kind: str = ""
    counter: int = 0


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


def content_counter(rel: Release) -> int:
    """The counter of the release whose bytes ``rel`` carries: its own, or for a rollback the
    one it re-publishes (signed in its facts). A rollback published before rollbacks carried
    it counts as 0: under any floor it is refused (fail closed)."""
    if rel.rollback_of is None:
        return rel.counter
    return rel.content_counter if rel.content_counter is not None else 0


def floor_to_keep(index: ModelIndex) -> int:
    """The floor a device may persist from a TUF-verified index: the index's floor, but never
    above the highest counter it lists (a publisher never signs a floor above its own release's
    counter). This bounds what a forged index can make a device refuse forever to the counters
    it names; the floors signed by the release key (in release facts) are kept unbounded."""
    top = max((r.counter for r in index.releases), default=0)
    return min(index.security_floor, top)


def stale_floor_reason(index: ModelIndex, committed: Committed) -> str | None:
    """Why ``index`` cannot be the repository's current index, or None.

    A genuine index's floor is the highest floor ever published for its model, so it is never
    below a floor this device verified (from release facts, or an earlier index). A lower one
    is a forged or replayed index: what an attacker holding only the online keys signs to
    make old, vulnerable releases installable again."""
    mine = committed.floors.get(index.name, 0)
    if index.security_floor < mine:
        return (f"the index of {index.name} says security floor {index.security_floor}, below "
                f"the floor {mine} this device has verified: a forged or replayed index")
    return None


def nothing_status(skipped: Iterable[Skip], committed_counter: int) -> str:
    """Status of a cycle that installs nothing, from the skips: ``not_in_rollout`` when a
    release newer than the committed one exists but its rollout (ring, percentage, pause)
    leaves this device out, else ``up_to_date``."""
    if any(s.counter > committed_counter and s.kind in ROLLOUT_KINDS for s in skipped):
        return "not_in_rollout"
    return "up_to_date"


def rank(index: ModelIndex, device: DeviceFacts, committed: Committed,
         current_version: str | None = None) -> Ranking:
    """Order the index's releases this device may take, best (highest counter) first.

    ``current_version`` is the release the device runs now. A release whose SemVer version
    is above it but whose counter is not above the committed counter is a downgrade attempt
    (a newly signed pointer to old bytes with a lower counter): a security skip.

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
        reinstall = _reinstall(r.version, name, committed, current_version)
        kind, reason = _rollout_reason(r, name, device, committed,
                                       have=have - 1 if reinstall else have, floor=floor)
        if reason is None:
            ok.append(r)
            continue
        # An equal counter is the release this device committed (counters are unique per
        # model): not an attack, e.g. after a yank or a local revert. A lower counter on a
        # version that looks newer is a newly signed pointer to old bytes.
        security = (
            reason.startswith("downgrade")
            and r.counter < have
            and _looks_newer(r.version, current_version)
        )
        skipped.append(Skip(r.version, reason, security, kind, r.counter))
    ok.sort(key=lambda r: r.counter, reverse=True)
    return Ranking(tuple(ok), tuple(skipped))


def check_release(facts: TargetFacts, state: RolloutState, index: ModelIndex,
                  device: DeviceFacts, committed: Committed,
                  current_version: str | None = None) -> str | None:
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
    check_counter(rel, index, committed, current_version)
    return compat_reason(rel, device)


def check_counter(rel: Release, index: ModelIndex | None, committed: Committed,
                  current_version: str | None = None) -> None:
    """Raise unless ``rel`` is strictly above the committed counter (or is the committed
    release itself while the device runs another one) and its content is not below any floor.

    Raises:
        DowngradeError: a counter at or below the committed one, or content below a floor.
    """
    have = committed.counters.get(rel.name, 0)
    if _reinstall(rel.version, rel.name, committed, current_version):
        have -= 1
    if rel.counter <= have:
        raise DowngradeError(
            f"downgrade refused: {rel.name} {rel.version} has counter {rel.counter}, "
            f"committed counter is {have}"
        )
    floor = max(floor_of(rel.name, index, committed), rel.security_floor)
    content = content_counter(rel)
    if content < floor:
        what = f"counter {rel.counter}" if content == rel.counter else (
            f"a rollback to {rel.rollback_of}, content counter {content}")
        raise DowngradeError(
            f"{rel.name} {rel.version} ({what}) is below the security floor {floor}"
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
                    *, have: int, floor: int) -> tuple[str, str | None]:
    """The first ``(kind, reason)``, in this order, that keeps ``r`` from this device, or
    ``("", None)``. The percentage applies only to the ring the release is entering: a device
    in an earlier ring than the release's (one the release has passed) is always in."""
    entering = device.ring == r.ring
    checks = (
        (r.yanked, "yanked", "yanked"),
        ((name, r.version) in committed.failed, "failed", "failed on this device before"),
        (r.counter <= have, "downgrade",
         f"downgrade: counter {r.counter} is not above committed {have}"),
        (r.counter < floor, "floor",
         f"downgrade: counter {r.counter} below security floor {floor}"),
        (r.paused, "paused", "rollout paused"),
        (not ring_allows(device.ring, r.ring), "ring",
         f"rollout at ring {r.ring}, device is in ring {device.ring}"),
        (entering and bucket(device.device_id, name, r.version) >= r.percent, "bucket",
         f"outside the {r.percent:g}% rollout bucket of ring {r.ring}"),
    )
    return next(((kind, why) for hit, kind, why in checks if hit), ("", None))


def _reinstall(version: str, name: str, committed: Committed, current_version: str | None) -> bool:
    """True when ``version`` is the release this device committed while it runs another
    one (after ``ota device revert``): taking it again is no downgrade (same counter)."""
    return (committed.versions.get(name) == version and current_version is not None
            and current_version != version)


def _looks_newer(version: str, committed_version: str | None) -> bool:
    if committed_version is None:
        return False
    return semver_key(version) > semver_key(committed_version)
