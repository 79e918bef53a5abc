"""Rollouts in the fleet database: start one, queue an operator's request, read their status.

Nothing here signs: every change of signed rollout state is made by the one controller that
holds the lease (:mod:`ota.rollout._controller`), from an intent recorded here first. So a
start or an operator's request is one short database transaction, refused whole when it does
not apply (exit 3 for bad input, 8 for a conflict), and acted on at the controller's next tick.

Invariants:

* at most one live (running or paused) rollout per model: the unique ``live_model`` column,
  checked first for a clear message and enforced by the constraint under races;
* a rollout is started only for a live, not yanked release of the signed index; its baseline
  is the newest live, not yanked release below it (by counter);
* an operator request is refused while another is queued (one at a time, each audited).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ota.bundle import RINGS, RolloutState, validate_name, validate_version
from ota.errors import ConflictError, InputError
from ota.fleet._models import Device
from ota.fleet._rollout_models import LIVE_STATES, Rollout, RolloutVerdict
from ota.repository import _auditlog
from ota.repository._index import UnknownRelease
from ota.repository._project import Project

from ._plan import Plan, plan_from_dict

if TYPE_CHECKING:
    from ota.bundle import ModelIndex
    from ota.client._telemetry_format import OutputSummary

REQUESTS = ("pause", "resume", "abort", "promote")
MAX_REASON = 500


def signed_state(project: Project, model: str, version: str) -> tuple[RolloutState | None, str]:
    """The release's signed rollout state (``None`` if not live) and the baseline version."""
    from ota.repository._ops import model_index

    return _state_in(model_index(project, model), version)


def signed_states(
    project: Project, releases: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], tuple[RolloutState | None, str]]:
    """:func:`signed_state` of many releases from one read of the signed metadata (one
    transaction's head and snapshot, each model's index read once)."""
    from ota.repository._index import read_index
    from ota.repository._txn import Transaction

    if not releases:
        return {}
    txn = Transaction.begin(project.storage, project.signers, project.expiry())
    indexes = {m: read_index(txn, m) for m in sorted({m for m, _ in releases})}
    return {(m, v): _state_in(indexes[m], v) for m, v in releases}


def _state_in(index: ModelIndex | None, version: str) -> tuple[RolloutState | None, str]:
    if index is None:
        return None, ""
    state = index.get(version)
    below = [
        r
        for r in index.releases
        if state is not None and r.counter < state.counter and not r.yanked
    ]
    baseline = max(below, key=lambda r: r.counter).version if below else ""
    return state, baseline


@dataclass(frozen=True)
class SignedReference:
    """A release's own reference output distribution, as its signed release facts carry it.

    ``outputs``: validated summaries (``()`` when the release was published without one).
    ``source``: what it is, for the verdict's evidence (``"<model> <version> signed release
    facts"``); ``sha256``: of the canonical JSON of the ``telemetry`` fact, so a verdict names
    exactly which reference it was judged against."""

    outputs: tuple[OutputSummary, ...]
    source: str
    sha256: str


def signed_reference(project: Project, model: str, version: str) -> SignedReference:
    """The release's reference from the repository's signed metadata: the ``telemetry`` fact
    of its TUF target's custom data (signed with the bins key, repeated from the release
    document the release key signed), read as :func:`signed_state` reads the index, never
    from a device. Facts are immutable once published (a version is never re-published), so
    a caller may keep the answer.

    Raises:
        UnknownRelease: no such published release.
        FormatError / TelemetryError: the stored facts or reference are malformed (the caller
            holds: a release is never judged against a reference it does not validly carry).
    """
    from ota.bundle import canonical_json
    from ota.client._telemetry_format import validate_reference
    from ota.repository._index import read_facts
    from ota.repository._txn import Transaction

    txn = Transaction.begin(project.storage, project.signers, project.expiry())
    facts = read_facts(txn, model, version)
    if facts is None:
        raise UnknownRelease(f"{model} {version} is not published")
    fact = facts.release.telemetry
    return SignedReference(
        outputs=validate_reference(fact) if fact else (),
        source=f"{model} {version} signed release facts",
        sha256=hashlib.sha256(canonical_json(fact)).hexdigest() if fact else "",
    )


def enter_intent(plan: Plan, stage: int, reason: str, event: str = "promote") -> dict[str, Any]:
    s = plan.stages[stage]
    return {
        "event": event,
        "target": {"ring": s.ring, "percent": s.percent, "paused": False},
        "stage_after": stage,
        "state_after": "running",
        "restart_clock": True,
        "reason": reason,
    }


def start(
    engine: Engine,
    project: Project,
    model: str,
    version: str,
    plan: Plan,
    actor: str,
    now: float | None = None,
) -> int:
    """Record a new rollout whose first action (entering stage 0) the controller takes.

    Raises:
        UnknownRelease: no such live release (exit 3).
        InputError: the release is yanked (exit 3).
        ConflictError: the model has a live rollout already (exit 8).
    """
    validate_name(model)
    validate_version(version)
    state, baseline = signed_state(project, model, version)
    if state is None:
        raise UnknownRelease(
            f"{model} {version} is not a live release", remedy="see `ota releases`"
        )
    if state.yanked:
        raise InputError(
            f"{model} {version} is yanked: it cannot be rolled out", remedy="publish a new release"
        )
    now = time.time() if now is None else now
    try:
        with Session(engine) as s, s.begin():
            live = s.execute(
                select(Rollout.id, Rollout.version).where(Rollout.live_model == model)
            ).one_or_none()
            if live is not None:
                raise ConflictError(
                    f"{model} has a live rollout already (#{live.id}, {live.version})",
                    remedy="`ota rollout abort` it first, or wait until it ends",
                )
            r = Rollout(
                model=model,
                version=version,
                baseline_version=baseline,
                live_model=model,
                state="running",
                reason="starting",
                plan=plan.to_dict(),
                plan_sha256=plan.digest(),
                stage=-1,
                stage_started_at=now,
                approved_stage=-1,
                pending=enter_intent(plan, 0, "rollout started"),
                request=None,
                created_at=now,
                created_by=actor[:160],
                updated_at=now,
            )
            s.add(r)
            s.flush()
            rid = int(r.id)
    except IntegrityError as e:
        raise ConflictError(f"{model} has a live rollout already (a concurrent start)") from e
    try:
        _auditlog.append_event(
            project.storage,
            "rollout-start",
            actor=actor,
            subject=f"{model} {version}",
            details={
                "rollout": rid,
                "baseline": baseline,
                "plan_sha256": plan.digest(),
                "stages": [f"{s.ring}@{s.percent:g}" for s in plan.stages],
            },
        )
    except BaseException:  # no unaudited rollout: end it before anything was signed
        with Session(engine) as s, s.begin():
            gone = s.get(Rollout, rid, with_for_update=True)
            if gone is not None and gone.stage == -1:
                gone.state, gone.live_model, gone.pending = "aborted", None, None
                gone.reason = "its start could not be written to the audit log"
        raise
    return rid


def _live(s: Session, model: str) -> Rollout:
    validate_name(model)
    r = s.execute(
        select(Rollout).where(Rollout.live_model == model).with_for_update()
    ).scalar_one_or_none()
    if r is None:
        raise InputError(f"{model} has no live rollout", remedy="see `ota rollout status`")
    return r


def request(
    engine: Engine,
    project: Project,
    model: str,
    op: str,
    actor: str,
    reason: str = "",
    now: float | None = None,
) -> int:
    """Queue an operator's ``pause``, ``resume``, ``abort`` or ``promote`` (now, past the
    gates) of the live rollout of ``model``; the controller carries it out.

    Raises:
        InputError: no live rollout, a request that does not apply (resume of a running one,
            promote without a reason), a reason too long.
        ConflictError: another request or action is still being carried out.
    """
    if op not in REQUESTS:
        raise InputError(f"unknown request {op!r}")
    if len(reason) > MAX_REASON:
        raise InputError(f"--reason longer than {MAX_REASON} characters")
    if op == "promote" and not reason.strip():
        raise InputError("promote --now needs --reason (it overrides the gates)")
    now = time.time() if now is None else now
    with Session(engine) as s, s.begin():
        r = _live(s, model)
        if r.request is not None:
            raise ConflictError(
                f"a {r.request.get('op')} request of rollout #{r.id} is still queued",
                remedy="wait for the controller's next tick (`ota rollout status`)",
            )
        if op == "resume" and r.state != "paused":
            raise InputError(f"rollout #{r.id} is {r.state}, not paused")
        if op == "pause" and r.state == "paused":
            raise InputError(f"rollout #{r.id} is paused already")
        if op == "promote" and r.state != "running":
            raise InputError(f"rollout #{r.id} is {r.state}: resume it before promoting")
        r.request = {"op": op, "actor": actor[:160], "reason": reason, "at": now}
        r.updated_at = now
        rid = int(r.id)
        version = r.version
    try:
        _auditlog.append_event(
            project.storage,
            "rollout-operator",
            actor=actor,
            subject=f"{model} {version}",
            details={"rollout": rid, "op": op, "reason": reason},
        )
    except BaseException:  # no unaudited request: withdraw it unless already taken up
        with Session(engine) as s, s.begin():
            mine = s.get(Rollout, rid, with_for_update=True)
            if mine is not None and mine.request is not None and mine.request.get("at") == now:
                mine.request = None
        raise
    return rid


def approve(
    engine: Engine, project: Project, model: str, actor: str, now: float | None = None
) -> dict[str, Any]:
    """Approve entering the next stage of the live rollout (needed where the plan says so).

    Raises:
        InputError: no live rollout, or no next stage.
    """
    now = time.time() if now is None else now
    with Session(engine) as s, s.begin():
        r = _live(s, model)
        plan = plan_from_dict(r.plan)
        nxt = r.stage + 1
        if nxt >= len(plan.stages):
            raise InputError(f"rollout #{r.id} is at its last stage: nothing to approve")
        previous = r.approved_stage
        r.approved_stage = nxt
        r.updated_at = now
        out = {
            "rollout": int(r.id),
            "approved_stage": nxt,
            "ring": plan.stages[nxt].ring,
            "percent": plan.stages[nxt].percent,
        }
        version = r.version
    try:
        _auditlog.append_event(
            project.storage,
            "rollout-operator",
            actor=actor,
            subject=f"{model} {version}",
            details={**out, "op": "approve"},
        )
    except BaseException:  # no unaudited approval
        with Session(engine) as s, s.begin():
            mine = s.get(Rollout, out["rollout"], with_for_update=True)
            if mine is not None and mine.approved_stage == out["approved_stage"]:
                mine.approved_stage = previous
        raise
    return out


def verdict_json(v: RolloutVerdict) -> dict[str, Any]:
    return {
        "id": int(v.id),
        "at": v.at,
        "last_at": v.last_at,
        "repeats": v.repeats,
        "stage": v.stage,
        "action": v.action,
        "reason": v.reason,
        "acted": v.acted,
        "gates": v.gates,
    }


def rollout_json(s: Session, r: Rollout, verdicts: int = 1) -> dict[str, Any]:
    plan = plan_from_dict(r.plan)
    stage = plan.stages[r.stage] if 0 <= r.stage < len(plan.stages) else None
    vs = (
        s.execute(
            select(RolloutVerdict)
            .where(RolloutVerdict.rollout_id == r.id)
            .order_by(RolloutVerdict.id.desc())
            .limit(verdicts)
        )
        .scalars()
        .all()
    )
    return {
        "id": int(r.id),
        "model": r.model,
        "version": r.version,
        "baseline_version": r.baseline_version,
        "state": r.state,
        "reason": r.reason,
        "stage": r.stage,
        "stages": len(plan.stages),
        "ring": stage.ring if stage else None,
        "percent": stage.percent if stage else None,
        "stage_started_at": r.stage_started_at,
        "approved_stage": r.approved_stage,
        "pending": r.pending,
        "request": r.request,
        "created_at": r.created_at,
        "created_by": r.created_by,
        "plan_sha256": r.plan_sha256,
        "verdicts": [verdict_json(v) for v in vs],
    }


def status(
    engine: Engine, model: str | None = None, *, all_: bool = False, verdicts: int = 1
) -> list[dict[str, Any]]:
    """Live rollouts (every rollout with ``all_``), newest first, with their latest verdicts."""
    with Session(engine) as s, s.begin():
        q = select(Rollout).order_by(Rollout.id.desc()).limit(200)
        if model:
            q = q.where(Rollout.model == validate_name(model))
        if not all_:
            q = q.where(Rollout.state.in_(LIVE_STATES))
        return [rollout_json(s, r, verdicts) for r in s.execute(q).scalars().all()]


@dataclass(frozen=True)
class StagePreview:
    index: int
    ring: str
    percent: float
    devices: int  # of today's enrolled, active devices that this stage admits
    earliest_at: float
    min_devices: int
    approval: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def preview(
    engine: Engine, model: str, version: str, plan: Plan, now: float | None = None
) -> list[StagePreview]:
    """What each stage would reach among today's enrolled devices (the client's own ring and
    bucket rule, :mod:`ota.client._policy`), and when it can start at the earliest."""
    from ota.client._policy import bucket

    now = time.time() if now is None else now
    with Session(engine) as s, s.begin():
        per_ring = dict(
            s.execute(
                select(Device.ring, func.count())
                .where(Device.revoked_at.is_(None))
                .group_by(Device.ring)
            ).all()
        )
        buckets: dict[str, list[float]] = {}
        for ring in {st.ring for st in plan.stages}:
            ids = s.execute(
                select(Device.device_id).where(Device.revoked_at.is_(None), Device.ring == ring)
            ).scalars()
            buckets[ring] = sorted(bucket(i, model, version) for i in ids)
    out = []
    for i, (st, at) in enumerate(zip(plan.stages, plan.earliest_timeline(), strict=True)):
        before = sum(int(per_ring.get(r, 0)) for r in RINGS[: RINGS.index(st.ring)])
        inside = sum(1 for b in buckets[st.ring] if b < st.percent)
        out.append(
            StagePreview(
                i, st.ring, st.percent, before + inside, now + at, st.min_devices, st.approval
            )
        )
    return out
