"""Pure install decisions (``ota.client._policy``): no IO, every rule one test."""

from __future__ import annotations

import pytest

from ota.bundle import Compat, ModelIndex, Release, RolloutState, TargetFacts
from ota.client._policy import (
    Committed,
    DeviceFacts,
    Skip,
    bucket,
    check_counter,
    check_release,
    compat_reason,
    content_counter,
    floor_to_keep,
    nothing_status,
    rank,
    ring_allows,
    semver_key,
)
from ota.errors import DowngradeError, SecurityError

DEV = DeviceFacts("dev-1", "aarch64", "cpu-small", "pilot", "1.31.1", "0.1.0")


def idx(*states: RolloutState, floor: int = 0) -> ModelIndex:
    return ModelIndex("det", tuple(states), floor)


def rs(version: str, counter: int, **kw: object) -> RolloutState:
    return RolloutState(version, counter, **kw)  # type: ignore[arg-type]


def facts(version: str, counter: int, **kw: object) -> TargetFacts:
    return TargetFacts(Release("det", version, counter, **kw), {})  # type: ignore[arg-type]


def test_bucket_is_deterministic_and_uniform() -> None:
    assert bucket("d", "det", "1.0.0") == bucket("d", "det", "1.0.0")
    values = [bucket(f"dev-{i}", "det", "1.0.0") for i in range(4000)]
    assert all(0 <= v < 100 for v in values)
    below = sum(v < 25 for v in values) / len(values)
    assert 0.22 < below < 0.28


@pytest.mark.parametrize(("device", "release", "ok"), [
    ("canary", "canary", True), ("canary", "ga", True), ("pilot", "canary", False),
    ("pilot", "pilot", True), ("ga", "pilot", False), ("ga", "ga", True),
])
def test_ring_order(device: str, release: str, ok: bool) -> None:
    assert ring_allows(device, release) is ok


def test_ring_unknown_raises() -> None:
    with pytest.raises(SecurityError):
        ring_allows("beta", "ga")


def test_rank_orders_by_counter_and_filters() -> None:
    index = idx(rs("1.0.0", 1, ring="ga"), rs("1.2.0", 3, ring="ga"), rs("1.1.0", 2, ring="ga"),
                rs("1.3.0", 4, ring="ga", yanked=True), rs("1.4.0", 5, ring="ga", paused=True),
                rs("1.5.0", 6, ring="canary"), rs("1.6.0", 7, ring="pilot", percent=0.0))
    r = rank(index, DEV, Committed(counters={"det": 1}, failed=frozenset({("det", "1.1.0")})),
             "1.0.0")
    assert [c.version for c in r.candidates] == ["1.2.0"]
    reasons = {s.version: s.reason for s in r.skipped}
    assert reasons["1.0.0"].startswith("downgrade")
    assert reasons["1.1.0"] == "failed on this device before"
    assert reasons["1.3.0"] == "yanked" and reasons["1.4.0"] == "rollout paused"
    assert "ring" in reasons["1.5.0"] and "bucket" in reasons["1.6.0"]
    assert not any(s.security for s in r.skipped)


def test_newer_version_with_lower_counter_is_a_security_skip() -> None:
    r = rank(idx(rs("2.0.0", 1, ring="ga")), DEV, Committed(counters={"det": 3}), "1.5.0")
    assert not r.candidates and r.skipped[0].security


def test_security_floor_from_index_and_device() -> None:
    r = rank(idx(rs("1.1.0", 2, ring="ga"), floor=3), DEV, Committed())
    assert not r.candidates and "floor" in r.skipped[0].reason
    r = rank(idx(rs("1.1.0", 2, ring="ga")), DEV, Committed(floors={"det": 4}))
    assert not r.candidates


def test_index_repeating_a_counter_is_refused() -> None:
    with pytest.raises(SecurityError):
        rank(idx(rs("1.0.0", 1), rs("1.1.0", 1)), DEV, Committed())


def test_check_release_cross_checks_index_and_counter() -> None:
    state = rs("1.1.0", 2, ring="ga")
    index = idx(state)
    assert check_release(facts("1.1.0", 2), state, index, DEV, Committed()) is None
    with pytest.raises(SecurityError, match="contradicts"):
        check_release(facts("1.1.0", 9), state, index, DEV, Committed())
    with pytest.raises(DowngradeError):
        check_release(facts("1.1.0", 2), state, index, DEV, Committed(counters={"det": 2}))
    with pytest.raises(DowngradeError, match="floor"):
        check_counter(Release("det", "1.1.0", 2, security_floor=3), None, Committed())


@pytest.mark.parametrize(("compat", "needle"), [
    (Compat(arch=("x86_64",)), "arch"),
    (Compat(tiers=("gpu",)), "tier"),
    (Compat(providers=("CUDAExecutionProvider",)), "providers"),
    (Compat(runtime=">=1.32,<2"), "runtime"),
    (Compat(runtime="not a range"), "unparseable"),
    (Compat(min_client="9.0.0"), "client"),
])
def test_compat_reasons(compat: Compat, needle: str) -> None:
    reason = compat_reason(Release("det", "1.0.0", 1, compat=compat), DEV)
    assert reason is not None and needle in reason


def test_compat_ok_with_arch_alias_and_range() -> None:
    compat = Compat(arch=("arm64",), tiers=("cpu-small",), runtime=">=1.20,<2", min_client="0.1.0")
    assert compat_reason(Release("det", "1.0.0", 1, compat=compat), DEV) is None


def test_semver_precedence() -> None:
    ordered = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-beta", "1.0.0-beta.2", "1.0.0-beta.11",
               "1.0.0-rc.1", "1.0.0", "1.0.1", "1.10.0"]
    assert sorted(ordered, key=semver_key) == ordered


# -- issue 12: percentages, floors carried by content, statuses ---------------------------


def test_percentage_applies_only_to_the_ring_being_entered() -> None:
    """After ``publish --ring canary`` then ``promote --ring pilot --percent 10`` every canary
    device may install (canary was passed: 100 %), and about 10 % of pilot devices."""
    index = idx(rs("1.1.0", 2, ring="pilot", percent=10.0))
    canary = [DeviceFacts(f"cam-{i}", "aarch64", "cpu-small", "canary") for i in range(20)]
    assert all(rank(index, d, Committed()).candidates for d in canary)
    pilot = [DeviceFacts(f"cam-{i}", "aarch64", "cpu-small", "pilot") for i in range(400)]
    taken = sum(bool(rank(index, d, Committed()).candidates) for d in pilot)
    assert 20 <= taken <= 60, taken  # 10 % of 400, with room for the hash's spread
    ga = DeviceFacts("cam-0", "aarch64", "cpu-small", "ga")
    assert rank(index, ga, Committed()).skipped[0].kind == "ring"


def test_a_rollback_is_judged_by_the_counter_of_its_content() -> None:
    """``1.0.0+rollback.5`` carries 1.0.0's bytes (counter 1): under floor 3 it is refused
    although its own counter (5) is above the floor; a rollback without a content counter
    (published before they carried one) counts as 0."""
    rb = Release("det", "1.0.0+rollback.5", 5, security_floor=3, rollback_of="1.0.0",
                 content_counter=1)
    assert content_counter(rb) == 1
    with pytest.raises(DowngradeError, match="content counter 1"):
        check_counter(rb, idx(floor=0), Committed(counters={"det": 4}))
    ok = Release("det", "1.3.0+rollback.6", 6, security_floor=3, rollback_of="1.3.0",
                 content_counter=4)
    check_counter(ok, idx(floor=3), Committed(counters={"det": 5}))
    legacy = Release("det", "1.0.0+rollback.5", 5, rollback_of="1.0.0")
    assert content_counter(legacy) == 0
    check_counter(legacy, None, Committed())  # no floor anywhere: allowed
    with pytest.raises(DowngradeError):
        check_counter(legacy, None, Committed(floors={"det": 1}))


def test_the_device_floor_beats_a_forged_index_floor() -> None:
    """An index re-signed with floor 0 does not lower the floor this device keeps."""
    rel = Release("det", "1.1.0", 2)
    with pytest.raises(DowngradeError, match="floor 3"):
        check_counter(rel, idx(rs("1.1.0", 2), floor=0), Committed(floors={"det": 3}))


def test_floor_kept_from_an_index_is_bounded_by_its_counters() -> None:
    assert floor_to_keep(idx(rs("1.0.0", 1), rs("1.1.0", 4), floor=3)) == 3
    assert floor_to_keep(idx(rs("1.0.0", 1), floor=2**40)) == 1
    assert floor_to_keep(idx(floor=7)) == 0


def test_reinstalling_the_committed_release_after_a_local_revert() -> None:
    """Committed 1.1.0 (counter 2), running 1.0.0 after ``ota device revert``: 1.1.0 may be
    taken again once its failure is forgotten; while it is failed it is not; a device that
    runs it is up to date."""
    index = idx(rs("1.0.0", 1, ring="ga"), rs("1.1.0", 2, ring="ga"))
    c = Committed(counters={"det": 2}, versions={"det": "1.1.0"})
    assert [r.version for r in rank(index, DEV, c, "1.0.0").candidates] == ["1.1.0"]
    check_counter(Release("det", "1.1.0", 2), index, c, "1.0.0")
    assert not rank(index, DEV, c, "1.1.0").candidates
    with pytest.raises(DowngradeError):
        check_counter(Release("det", "1.1.0", 2), index, c, "1.1.0")
    failed = Committed(counters={"det": 2}, versions={"det": "1.1.0"},
                       failed=frozenset({("det", "1.1.0")}))
    assert not rank(index, DEV, failed, "1.0.0").candidates


def test_nothing_status_tells_waiting_for_a_rollout_from_up_to_date() -> None:
    index = idx(rs("1.0.0", 1, ring="ga"), rs("1.1.0", 2, ring="pilot", percent=0.0))
    c = Committed(counters={"det": 1})
    r = rank(index, DEV, c, "1.0.0")
    assert not r.candidates and nothing_status(r.skipped, 1) == "not_in_rollout"
    assert nothing_status([Skip("1.0.0", "downgrade", kind="downgrade", counter=1)], 1) == (
        "up_to_date")
    assert nothing_status([Skip("1.1.0", "failed", kind="failed", counter=2)], 1) == "up_to_date"
    assert nothing_status([Skip("1.1.0", "paused", kind="paused", counter=2)], 1) == (
        "not_in_rollout")


def test_an_index_whose_floor_is_below_the_kept_one_is_stale() -> None:
    from ota.client._policy import stale_floor_reason

    assert stale_floor_reason(idx(floor=3), Committed(floors={"det": 3})) is None
    assert stale_floor_reason(idx(floor=4), Committed(floors={"det": 3})) is None
    reason = stale_floor_reason(idx(floor=0), Committed(floors={"det": 3}))
    assert reason is not None and "forged" in reason
