"""Install-outcome gates: what the devices that took a release did with it.

Counted from the fleet's derived state (``release_states``: one row per device and release,
its latest state), joined to the device for its enrolled ring and hardware tier, with one
aggregate query — never from the event log, so a device that reports ten times counts once.

Invariants (FLEET.md, DESIGN decision 11):

* only ``confirmed`` (committed, then healthy through the device's health window) is a
  success; ``smoke_failed``, ``reverted``, ``failed`` and ``refused`` are failures;
* a device that started on the release (any state) and has not reached an outcome within the
  plan's ``device_timeout`` of its last step is a failure (``timed_out``): a bricked or stuck
  device never leaves a stage waiting;
* a ``security`` refusal of the release fails the stage at once, whatever the rate or soak,
  once ``security_min_devices`` distinct devices report it (a signature or downgrade problem
  is release-wide, not a statistic); fewer hold it, so one forged device cannot halt;
* a tier's failure rate is judged only once that tier has the plan's minimum of executed
  devices (AWS IoT Jobs), and fails only when at least that many of them failed; fewer is
  ``HOLD`` if it has failures: so fewer forged reports than the minimum can neither halt a
  stage (even among many honest successes) nor let it promote past a failing tier;
* the stage's sample is confirmed devices of the stage's ring; fewer than the stage's
  ``min_devices`` is ``HOLD`` (silence never promotes); so is a stage younger than its soak.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from ota.fleet._models import Device, ReleaseState

from ._context import RolloutContext
from ._plan import Plan, Stage
from ._verdict import GateResult, GateStatus

SUCCESS = frozenset({"confirmed"})
FAILURES = frozenset({"smoke_failed", "reverted", "failed", "refused"})
SECURITY = "security"
MAX_TIERS = 64  # tiers judged one by one; more are judged together as "(other)"


@dataclass
class Counts:
    """Distinct devices by outcome (one tier, or the whole stage)."""

    confirmed: int = 0
    failed: int = 0
    timed_out: int = 0
    in_progress: int = 0
    security: int = 0
    by_state: dict[str, int] = field(default_factory=dict)

    @property
    def executed(self) -> int:
        return self.confirmed + self.failed + self.timed_out

    @property
    def failures(self) -> int:
        return self.failed + self.timed_out

    def to_json(self) -> dict[str, int]:
        return {
            "confirmed": self.confirmed,
            "failed": self.failed,
            "timed_out": self.timed_out,
            "in_progress": self.in_progress,
            "security": self.security,
            "executed": self.executed,
        }


@dataclass
class Outcomes:
    """Per tier over every ring, and the stage ring's confirmed count."""

    tiers: dict[str, Counts]
    total: Counts
    ring_confirmed: int


def count_outcomes(s: Session, model: str, version: str, ring: str, cutoff: float) -> Outcomes:
    """One aggregate query: devices by tier, ring and latest state of ``model version``; a
    device still in progress whose last step is older than ``cutoff`` is timed out."""
    rs, d = ReleaseState, Device
    stale = func.sum(case((rs.updated_at < cutoff, 1), else_=0))
    rows = s.execute(
        select(d.tier, d.ring, rs.state, func.count(), stale)
        .join(d, d.id == rs.device_pk)
        .where(rs.model == model, rs.version == version, rs.active.is_(True))
        .group_by(d.tier, d.ring, rs.state)
    ).all()
    tiers: dict[str, Counts] = defaultdict(Counts)
    total = Counts()
    ring_confirmed = 0
    names = sorted({str(r[0]) for r in rows})
    keep = set(names[:MAX_TIERS])
    for tier, dev_ring, state, n_raw, stale_raw in rows:
        n, n_stale = int(n_raw), int(stale_raw or 0)
        c = tiers[tier if tier in keep else "(other)"]
        for target in (c, total):
            target.by_state[state] = target.by_state.get(state, 0) + n
            if state in SUCCESS:
                target.confirmed += n
            elif state in FAILURES:
                target.failed += n
            elif state == SECURITY:
                target.security += n
            else:
                target.timed_out += n_stale
                target.in_progress += n - n_stale
        if state in SUCCESS and dev_ring == ring:
            ring_confirmed += n
    return Outcomes(dict(tiers), total, ring_confirmed)


def install_gates(s: Session, ctx: RolloutContext, plan: Plan, stage: Stage) -> list[GateResult]:
    """The install-outcome gates of one stage: security, failures per tier, sample, soak."""
    out = count_outcomes(s, ctx.model, ctx.version, stage.ring, ctx.now - plan.device_timeout_s)
    results: list[GateResult] = []
    sec, sec_min = out.total.security, plan.install.security_min_devices
    if sec:
        results.append(
            GateResult(
                "install.security",
                GateStatus.FAIL if sec >= sec_min else GateStatus.HOLD,
                f"{sec} device(s) refused {ctx.model} {ctx.version} for a security reason: "
                + ("halted at once" if sec >= sec_min else f"held until {sec_min} agree"),
                value=float(sec),
                threshold=float(sec_min),
                evidence={"security": sec},
            )
        )
    else:
        results.append(
            GateResult(
                "install.security",
                GateStatus.PASS,
                "no security refusal",
                value=0.0,
                threshold=float(sec_min),
            )
        )
    rate_max = plan.install.max_failure_rate
    min_exec = plan.install.min_devices
    for tier in sorted(out.tiers):
        c = out.tiers[tier]
        ev = c.to_json()
        if c.failures == 0:
            results.append(
                GateResult(
                    "install.failures",
                    GateStatus.PASS,
                    f"no failure among {c.executed} executed device(s)",
                    value=0.0,
                    threshold=rate_max,
                    tier=tier,
                    evidence=ev,
                )
            )
            continue
        rate = c.failures / c.executed
        if c.executed < min_exec:
            results.append(
                GateResult(
                    "install.failures",
                    GateStatus.HOLD,
                    f"{c.failures} failure(s) among {c.executed} executed device(s): too few to "
                    f"judge (at least {min_exec})",
                    value=rate,
                    threshold=rate_max,
                    tier=tier,
                    evidence=ev,
                )
            )
        elif rate > rate_max and c.failures < min_exec:
            # fewer failed devices than the minimum sample may be forged (a device's report is
            # its own word): they hold the stage, never halt it (the fleet simulation showed
            # two forged smoke failures halting a good release in a 13-device canary)
            results.append(
                GateResult(
                    "install.failures",
                    GateStatus.HOLD,
                    f"failure rate {rate:.1%} above {rate_max:.1%} but only {c.failures} "
                    f"device(s) failed: held until {min_exec} agree",
                    value=rate,
                    threshold=rate_max,
                    tier=tier,
                    evidence=ev,
                )
            )
        elif rate > rate_max:
            results.append(
                GateResult(
                    "install.failures",
                    GateStatus.FAIL,
                    f"failure rate {rate:.1%} ({c.failed} failed, {c.timed_out} timed out of "
                    f"{c.executed} executed) above {rate_max:.1%}",
                    value=rate,
                    threshold=rate_max,
                    tier=tier,
                    evidence=ev,
                )
            )
        else:
            results.append(
                GateResult(
                    "install.failures",
                    GateStatus.PASS,
                    f"failure rate {rate:.1%} of {c.executed} executed within {rate_max:.1%}",
                    value=rate,
                    threshold=rate_max,
                    tier=tier,
                    evidence=ev,
                )
            )
    n = out.ring_confirmed
    results.append(
        GateResult(
            "install.sample",
            GateStatus.PASS if n >= stage.min_devices else GateStatus.HOLD,
            f"{n} confirmed device(s) in ring {stage.ring}, {stage.min_devices} needed",
            value=float(n),
            threshold=float(stage.min_devices),
            evidence={"ring": stage.ring, "total": out.total.to_json()},
        )
    )
    age = max(0.0, ctx.now - ctx.stage_started_at)
    results.append(
        GateResult(
            "soak",
            GateStatus.PASS if age >= stage.soak_s else GateStatus.HOLD,
            f"stage running {age:.0f} s of a {stage.soak_s:.0f} s soak",
            value=round(age, 3),
            threshold=stage.soak_s,
        )
    )
    return results
