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
* a tier the stage cannot judge — it admits fewer than ``gates.install.min_devices`` of the
  tier's devices that run the model (its ring at its percentage, counted from enrolment and the
  client's bucket rule by :func:`tier_population`, never from reports) — is *deferred*: a HOLD
  of ``install.failures`` for it becomes a PASS naming the deferral ("judged in the next
  stage"; failures count over every ring, so the next stage's count still holds them), the
  health gates' rule (ADR 0015). Not deferred: a ``FAIL`` (``min_devices`` failed devices
  agree, whatever the tier's size), the security gate, and *conclusive* failures — the
  one-sided binomial test that the tier's failure rate exceeds ``max_failure_rate`` is at
  least :data:`CONCLUSIVE` sure, computed without the ``min_devices - 1`` confirmed devices
  most in its favour (so fewer forged successes than the minimum cannot dilute honest failures
  into a deferral); such a tier keeps holding the stage (its deadline pauses it) until
  ``min_devices`` failed devices fail it. One failure among a small tier's devices is never
  conclusive at the defaults (5 %: 95 % sure < 98 %); two failures among up to 8 executed
  devices are (2 of 4 once 4 successes are set aside: 98.6 %);
* the stage's sample is confirmed devices of the stage's ring; fewer than the stage's
  ``min_devices`` is ``HOLD`` (silence never promotes); so is a stage younger than its soak.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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
OTHER = "(other)"
CONCLUSIVE = 0.98  # how sure a too-small tier's failures must be to hold, not defer, a stage


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
    return _fold([(str(t), str(r), str(st), int(n), int(k or 0)) for t, r, st, n, k in rows], ring)


def _fold(rows: Sequence[tuple[str, str, str, int, int]], ring: str) -> Outcomes:
    """Outcomes from rows ``(tier, ring, state, devices, of which stale)``."""
    tiers: dict[str, Counts] = defaultdict(Counts)
    total = Counts()
    ring_confirmed = 0
    names = sorted({r[0] for r in rows})
    keep = set(names[:MAX_TIERS])
    for tier, dev_ring, state, n, n_stale in rows:
        c = tiers[tier if tier in keep else OTHER]
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


@dataclass(frozen=True)
class Want:
    """One live rollout's install-gate question: ``model version``, the stage's ``ring`` and
    the timeout ``cutoff`` (``now - device_timeout``)."""

    key: int
    model: str
    version: str
    ring: str
    cutoff: float


MAX_CUTOFFS = 16  # distinct device timeouts answered by one grouped query


def count_outcomes_many(s: Session, wants: Sequence[Want]) -> dict[int, Outcomes]:
    """:func:`count_outcomes` for many rollouts in one grouped query (one stale-count column
    per distinct cutoff; plans mostly share the default timeout). Rollouts whose cutoff
    would be past the ``MAX_CUTOFFS``-th distinct one are left out (the caller asks them one
    by one). Gives exactly what :func:`count_outcomes` gives for each."""
    cutoffs: list[float] = []
    for w in wants:
        if w.cutoff not in cutoffs and len(cutoffs) < MAX_CUTOFFS:
            cutoffs.append(w.cutoff)
    wants = [w for w in wants if w.cutoff in cutoffs]
    if not wants:
        return {}
    rs, d = ReleaseState, Device
    stale = [func.sum(case((rs.updated_at < c, 1), else_=0)) for c in cutoffs]
    rows = s.execute(
        select(rs.model, rs.version, d.tier, d.ring, rs.state, func.count(), *stale)
        .join(d, d.id == rs.device_pk)
        .where(
            rs.model.in_(sorted({w.model for w in wants})),
            rs.version.in_(sorted({w.version for w in wants})),
            rs.active.is_(True),
        )
        .group_by(rs.model, rs.version, d.tier, d.ring, rs.state)
    ).all()
    by_release: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for row in rows:
        by_release[(str(row[0]), str(row[1]))].append(row)
    out: dict[int, Outcomes] = {}
    for w in wants:
        k = 6 + cutoffs.index(w.cutoff)
        got = [
            (str(r[2]), str(r[3]), str(r[4]), int(r[5]), int(r[k] or 0))
            for r in by_release.get((w.model, w.version), [])
        ]
        out[w.key] = _fold(got, w.ring)
    return out


def tier_population(
    s: Session, model: str, version: str, ring: str, percent: float, tiers: Sequence[str]
) -> dict[str, tuple[int, int]]:
    """Per tier (of ``tiers``): ``(admitted, enrolled)``, the enrolled, unrevoked devices of
    ``ring`` that run ``model`` (any version, ``device_models``: a fleet's devices run
    different models) and that a stage at ``percent`` admits to ``model version``, and all of
    them (the others are the tier's concurrent baseline) — the client's own bucket rule
    (:func:`ota.client._policy.bucket`), from the service's enrolment records alone (never a
    device's report, so no device can shrink it). ``percent >= 100``: the tier's whole
    population in the ring. Bounded by the ring's size (one sha256 per device; the
    controller reuses the health gates' results while enrolments are unchanged)."""
    from ota.client._policy import bucket

    if not tiers:
        return {}
    from ota.fleet._models import DeviceModel

    rows = s.execute(
        select(Device.device_id, Device.tier)
        .distinct()
        .join(DeviceModel, DeviceModel.device_pk == Device.id)
        .where(
            DeviceModel.model == model,
            DeviceModel.active.is_(True),
            Device.ring == ring,
            Device.revoked_at.is_(None),
            Device.tier.in_(sorted(set(tiers))),
        )
    ).all()
    out = dict.fromkeys(tiers, (0, 0))
    for device_id, tier in rows:
        admitted, enrolled = out.get(str(tier), (0, 0))
        inside = percent >= 100.0 or bucket(str(device_id), model, version) < percent
        out[str(tier)] = (admitted + int(inside), enrolled + 1)
    return out


def telemetry_marks(
    s: Session, releases: Sequence[tuple[str, str]], since: float
) -> dict[tuple[str, str], tuple[int, int, float]]:
    """A change mark per release ``(model, version)`` of its telemetry rows in buckets from
    ``since`` on: ``(rows, summaries, newest updated_at)``. Every fold of a summary adds one
    to ``summaries`` and stamps ``updated_at`` (its bins are written in the same
    transaction), so a new summary always changes the mark."""
    from ota.fleet._models import TelemetryAgg as A

    if not releases:
        return {}
    rows = s.execute(
        select(A.model, A.version, func.count(), func.sum(A.summaries), func.max(A.updated_at))
        .where(
            A.model.in_(sorted({m for m, _ in releases})),
            A.version.in_(sorted({v for _, v in releases})),
            A.bucket >= since,
        )
        .group_by(A.model, A.version)
    ).all()
    return {(str(m), str(v)): (int(n), int(k or 0), float(t or 0.0)) for m, v, n, k, t in rows}


def fleet_marks(
    s: Session, models: Sequence[str]
) -> tuple[dict[str, tuple[int, float, int]], tuple[int, float, int, float]]:
    """Change marks of what the health gates read besides telemetry: per model its
    ``device_models`` rows ``(rows, newest updated_at, sum of counters)`` (who runs which
    version: the concurrent baseline), and the devices ``(rows, newest enrolment, revoked,
    newest revocation)`` (ring, tier and revocation change only at enrolment and
    revocation, both stamped)."""
    from ota.fleet._models import DeviceModel as M

    per_model: dict[str, tuple[int, float, int]] = {}
    if models:
        for m, n, t, c in s.execute(
            select(M.model, func.count(), func.max(M.updated_at), func.sum(M.counter))
            .where(M.model.in_(sorted(set(models))))
            .group_by(M.model)
        ).all():
            per_model[str(m)] = (int(n), float(t or 0.0), int(c or 0))
    n, enrolled, revoked, last_revoked = s.execute(
        select(
            func.count(),
            func.max(Device.enrolled_at),
            func.count(Device.revoked_at),
            func.max(Device.revoked_at),
        )
    ).one()
    return per_model, (int(n), float(enrolled or 0.0), int(revoked), float(last_revoked or 0.0))


def install_gates(
    s: Session | None,
    ctx: RolloutContext,
    plan: Plan,
    stage: Stage,
    outcomes: Outcomes | None = None,
    population: Mapping[str, tuple[int, int]] | None = None,
) -> list[GateResult]:
    """The install-outcome gates of one stage: security, failures per tier, sample, soak.
    ``outcomes``: the stage's counts when already read (:func:`count_outcomes_many`, then
    ``s`` may be ``None``). ``population``: :func:`tier_population` of the stage when already
    read; else read with ``s`` only when a tier would hold on failures
    (:func:`needs_population`); without either, nothing is deferred (fail closed: a hold)."""
    out = outcomes
    if out is None:
        if s is None:
            raise ValueError("install_gates needs a session or the outcomes")
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
    held = _held_tiers(out, plan)
    if held and population is None and s is not None:
        population = tier_population(s, ctx.model, ctx.version, stage.ring, stage.percent, held)
    if held and population is not None:
        results = [
            _defer_or_hold(g, out.tiers[g.tier], population.get(g.tier), stage.percent, plan)
            if g.gate == "install.failures" and g.tier in held
            else g
            for g in results
        ]
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
    results.append(soak_gate(ctx, stage))
    return results


def _holds(c: Counts, plan: Plan) -> bool:
    """Whether ``install.failures`` holds (neither passes nor fails) a tier with ``c``."""
    if c.failures == 0:
        return False
    if c.executed < plan.install.min_devices:
        return True
    rate = c.failures / c.executed
    return rate > plan.install.max_failure_rate and c.failures < plan.install.min_devices


def _held_tiers(out: Outcomes, plan: Plan) -> list[str]:
    """Tiers whose ``install.failures`` holds: those a deferral may concern (never
    ``(other)``, many tiers together)."""
    return sorted(t for t, c in out.tiers.items() if t != OTHER and _holds(c, plan))


def needs_population(out: Outcomes, plan: Plan) -> bool:
    """Whether :func:`install_gates` reads the stage's tier population for ``out`` (some
    tier holds on failures): the controller then gives it a session."""
    return bool(_held_tiers(out, plan))


def conclusive(c: Counts, plan: Plan) -> float:
    """How sure the tier's failure rate exceeds ``max_failure_rate``: one minus the one-sided
    binomial p-value of its failures among its executed devices, without the
    ``min_devices - 1`` confirmed devices most in its favour (so that fewer forged successes
    than the minimum cannot dilute honest failures). 1.0 when ``max_failure_rate`` is 0 and
    the tier has a failure (the plan tolerates none)."""
    from scipy.stats import binom  # type: ignore[import-untyped]

    aside = min(plan.install.min_devices - 1, c.confirmed)
    n = c.executed - aside
    if c.failures <= 0 or n <= 0:
        return 0.0
    p = float(binom.sf(c.failures - 1, n, plan.install.max_failure_rate))
    return float(min(1.0, max(0.0, 1.0 - p)))


def _defer_or_hold(
    g: GateResult, c: Counts, pop: tuple[int, int] | None, percent: float, plan: Plan
) -> GateResult:
    """A held tier's ``install.failures``: deferred (PASS naming why) when the stage admits
    fewer than ``gates.install.min_devices`` of the tier and its failures are not
    :func:`conclusive`; otherwise kept as the HOLD it is (with the figures)."""
    min_exec = plan.install.min_devices
    admitted = pop[0] if pop is not None else 0
    if pop is None or admitted >= min_exec:
        return g
    sure = conclusive(c, plan)
    ev = {**g.evidence, "admitted_devices": admitted, "confidence_above_rate": round(sure, 6)}
    if sure >= CONCLUSIVE:
        return GateResult(
            g.gate,
            GateStatus.HOLD,
            f"{g.reason}; conclusive (confidence {sure:.3f} >= {CONCLUSIVE}) though the stage "
            f"admits only {admitted} device(s) of tier {g.tier}: not deferred",
            g.value,
            g.threshold,
            g.baseline,
            sure,
            g.tier,
            {**ev, "not_deferred": "conclusive"},
        )
    where = (
        "judged with the tier's devices of the later stages"
        if percent >= 100.0
        else "judged in the next stage"
    )
    why = (
        f"tier {g.tier}: {admitted} device(s) in this stage < min_devices {min_exec}: {where} "
        f"({c.failures} failure(s) among {c.executed} executed, confidence {sure:.3f} < "
        f"{CONCLUSIVE})"
    )
    return g.deferred(why, **ev)


def soak_gate(ctx: RolloutContext, stage: Stage) -> GateResult:
    """The stage's age against its soak (a function of the clock alone)."""
    age = max(0.0, ctx.now - ctx.stage_started_at)
    return GateResult(
        "soak",
        GateStatus.PASS if age >= stage.soak_s else GateStatus.HOLD,
        f"stage running {age:.0f} s of a {stage.soak_s:.0f} s soak",
        value=round(age, 3),
        threshold=stage.soak_s,
    )
