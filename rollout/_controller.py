"""The rollout controller: judge each live rollout every tick, record the verdict, act.

One tick, for the controller that holds the lease (:mod:`ota.rollout._lease`), per live
rollout, at most one action:

1. an intent left ``pending`` (by a start, an earlier tick, or a controller killed mid-action)
   is carried out first (:meth:`Controller._carry_out`);
2. else an operator's queued request (pause, resume, abort, promote now) becomes the intent;
3. else, for a running rollout, the gates are judged (install outcomes, then every extra gate
   such as the inference-health gates) and :func:`~ota.rollout._verdict.combine` gives the
   action: promote to the next stage (or finish after the last), hold (pause once past the
   stage's deadline, saying why), pause, or roll back (yank).

Invariants:

* **intent before signature.** An action is first recorded in the rollout row (``pending``:
  the signed state it must reach, the stage and state after it) in a transaction that also
  checks the lease; then its verdict is appended to the audit log; then the rollout metadata
  is signed through the normal publish transaction (online key, audit entry anchored by the
  commit); then the row is updated and ``pending`` cleared. A controller killed anywhere in
  between resumes from ``pending``: it compares the *signed* state with the target and signs
  only if they differ, so no action is signed twice, and the metadata is always valid (each
  publish transaction is atomic);
* **one actor.** Every signature is preceded by a fencing check that the lease (holder and
  epoch) is still held; operator commands never sign, they queue a request;
* **evidence.** Each new verdict (action, reason, every gate's figures, thresholds and
  confidence) is stored in ``rollout_verdicts`` and the repository's audit log; a verdict equal
  to the previous one only bumps its ``repeats`` (the log grows with changes, not ticks);
* **silence never promotes**: no gates, or any gate holding, is a hold; a stage holding past
  its deadline pauses with the holding gates' reasons;
* a hook (``on_verdict``) or an extra gate that raises never stops the controller: a failing
  gate is a ``HOLD`` naming the error (fail closed: it cannot promote), a failing hook is logged;
* **one tick, many rollouts** (ADR 0011): the install outcomes of every running rollout are
  one grouped query, their inputs' change marks two more, and their signed states one read
  of the repository (:meth:`Controller._inputs`); the extra gates' results are reused while
  those marks, the stage and the telemetry bucket are unchanged and for at most ``refresh_s``
  (the install gates, the soak and the deadline are judged every tick from fresh counts and
  the clock, so a deadline or a failure is acted on at its tick); the intents recorded in one
  tick are signed together in one steering transaction (:meth:`Controller._flush`), each
  with its own audit entry, at most ``flush_s`` after they were recorded;
* **when a tick runs** (ADR 0011): :meth:`Controller.run` ticks fully every ``interval``,
  and between full ticks wakes a *due* tick at the earliest soak end or deadline of a running
  stage and when a report or an operator's change is stored (:meth:`Controller.evidence_mark`),
  so a stage passes at its soak's end or deciding report plus one judgement, not at the next
  multiple of the interval. Within a tick the urgent go first (:meth:`Controller._order`:
  intents and requests; changed outcomes, stage or clock; changed health inputs; unchanged
  last, and not at all in a due tick) and each group's intents are signed before the next
  group is judged. Only the lease holder wakes early; what is judged and how is unchanged
  (the same gates on fresh counts, the same intent-before-signature path), only when.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from ota.bundle import RolloutState, index_target_path
from ota.client._telemetry_format import OutputSummary
from ota.fleet._rollout_models import LIVE_STATES, Rollout, RolloutVerdict
from ota.repository import _auditlog
from ota.repository._project import Project

from . import _lease
from ._context import GateFn, RolloutContext
from ._gates import (
    Outcomes,
    Want,
    count_outcomes_many,
    fleet_marks,
    install_gates,
    needs_population,
    telemetry_marks,
)
from ._plan import Plan, plan_from_dict
from ._store import (
    SignedReference,
    enter_intent,
    signed_reference,
    signed_state,
    signed_states,
)
from ._verdict import Action, GateResult, GateStatus, combine

log = logging.getLogger("ota.rollout")
VERDICT_FORMAT = "edge-ota.rollout-verdict/1"
MAX_AUDIT_GATES = 64  # an audit entry is at most 64 KiB: more gates are summarised
VerdictHook = Callable[[dict[str, Any]], None]
DEFAULT_REFRESH_S = 60.0  # extra gates judged again at least this often, inputs unchanged
DEFAULT_FLUSH_S = 2.0  # an intent waits at most this long for the tick's batch signature
DEFAULT_POLL_S = 0.25  # an idle controller's look for new evidence (two index reads)
DEFAULT_WAKE_GAP_S = 0.5  # at least this long between the starts of two ticks woken early
BUCKET_S = 900.0  # the telemetry buckets' width (``ota.fleet._telemetry.BUCKET_S``)


@runtime_checkable
class TransactionalHook(Protocol):
    """A verdict hook that writes in the verdict's own transaction (the webhook outbox):
    ``in_transaction(session, verdict_json)`` runs before the verdict row commits (if it
    raises, neither is stored and the rollout is judged again next tick); ``deliver()`` runs
    after each new verdict's commit and at the end of each tick (sending what is queued,
    including what a crashed controller left)."""

    def in_transaction(self, session: Session, doc: dict[str, Any]) -> None: ...

    def deliver(self) -> None: ...


def _transactional(hook: object) -> TransactionalHook | None:
    return hook if isinstance(hook, TransactionalHook) else None


class LostLease(Exception):
    """The lease was lost between deciding and signing: another controller acts now."""


@dataclass
class TickInputs:
    """What one tick read for every live rollout at once (one grouped query each), keyed by
    rollout id: install outcomes, the change marks of the extra gates' inputs, and the
    signed state of each release. A rollout missing from a map is read on its own."""

    outcomes: dict[int, Outcomes] = field(default_factory=dict)
    marks: dict[int, tuple[Any, ...]] = field(default_factory=dict)
    signed: dict[tuple[str, str], tuple[RolloutState | None, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Judged:
    """The extra gates' results of a rollout's last judgement, and what they were judged on:
    ``key`` (release, baseline, stage, its start, plan, reference, the inputs' change marks
    read *before* the gates ran) and the clock ``at``."""

    key: tuple[Any, ...]
    gates: tuple[GateResult, ...]
    at: float


@dataclass
class _Prepared:
    """An intent ready to carry out: its (audited) ``pending``, whether the signed state
    still differs from its target (``sign``), and whether this controller signed it."""

    r: Rollout
    pending: dict[str, Any]
    sign: bool
    signed: bool = False


@dataclass
class TickReport:
    """What one tick did: whether it led, and the verdicts and actions it recorded."""

    leader: bool
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: ``"full"`` (every live rollout) or ``"due"`` (only those whose inputs, soak or
    #: deadline changed since their last judgement: a tick woken early, :meth:`Controller.run`)
    kind: str = "full"
    judged: int = 0  # rollouts judged or acted on in this tick
    #: the tick's stopwatch (wall clock, ``time.time()``): ``start``, ``inputs`` (the grouped
    #: reads done); per rollout id that acted: ``judged`` (its gates combined), ``recorded``
    #: (verdict and intent committed), ``signed`` (steering transaction returned), ``done``
    #: (row updated, intent cleared). Instrumentation only: nothing is decided from it.
    times: dict[str, float] = field(default_factory=dict)
    timings: dict[int, dict[str, float]] = field(default_factory=dict)


def _default_holder() -> str:
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _matches(signed: RolloutState, target: dict[str, Any]) -> bool:
    for k, want in target.items():
        have = getattr(signed, k)
        if k == "percent":
            if abs(float(have) - float(want)) > 1e-9:
                return False
        elif have != want:
            return False
    return True


def _digest(action: str, reason: str, gates: Sequence[GateResult]) -> str:
    key = [action, [(g.gate, g.tier, g.status.value) for g in gates]]
    if action != Action.HOLD.value:
        key.append(reason)
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


class Controller:
    """Judges and steers every live rollout of one fleet database and one repository.

    ``extra_gates``: functions ``(session, ctx) -> list[GateResult]`` judged after the install
    gates (the inference-health gates plug in here). They are judged again only when their
    inputs may have changed (:meth:`_extra`): a new telemetry row or summary of the release or
    its baseline, a change of who runs the model, an enrolment or revocation, a new stage, a
    telemetry bucket boundary, or ``refresh_s`` since their last run; otherwise their last
    results are reused (the install gates, the soak and the deadline are judged every tick).
    ``on_verdict``: called with each new verdict's JSON (the webhook sender plugs in here).
    ``after_sign``: called right after a signature, before the row is updated (tests kill the
    process there).
    """

    def __init__(
        self,
        engine: Engine,
        project: Project,
        *,
        holder: str | None = None,
        extra_gates: Sequence[GateFn] = (),
        on_verdict: Sequence[VerdictHook] = (),
        lease_ttl: float = _lease.DEFAULT_TTL_S,
        after_sign: Callable[[], None] | None = None,
        refresh_s: float = DEFAULT_REFRESH_S,
        flush_s: float = DEFAULT_FLUSH_S,
    ) -> None:
        self.engine = engine
        self.project = project
        self.holder = holder or _default_holder()
        self.extra_gates = list(extra_gates)
        self.on_verdict = list(on_verdict)
        self.lease_ttl = lease_ttl
        self.after_sign = after_sign
        self.actor = f"controller:{self.holder}"[:128]
        self._references: dict[tuple[str, str], SignedReference] = {}
        self.refresh_s = refresh_s
        self.flush_s = flush_s
        self._batch: list[int] | None = None  # intents deferred to the tick's one signature
        self._tick_inputs: TickInputs | None = None  # the tick's grouped reads
        self._judged: dict[int, _Judged] = {}
        #: per rollout, what its last judgement saw: (install outcomes, extra gates' marks,
        #: (stage, its start, approved stage, plan), the clock): what :meth:`_order` compares
        self._seen: dict[int, tuple[Any, Any, tuple[Any, ...], float]] = {}
        self._plans: dict[str, Plan] = {}
        self._due: float | None = None  # monotonic: the next soak end or deadline

    # -- the loop ---------------------------------------------------------------------------

    def run(
        self,
        interval: float,
        stop: threading.Event,
        *,
        on_tick: Callable[[float, float, TickReport], None] | None = None,
        poll_s: float = DEFAULT_POLL_S,
        wake_gap_s: float = DEFAULT_WAKE_GAP_S,
    ) -> None:
        """Tick until ``stop`` is set; give the lease up then.

        A *full* tick (every live rollout) runs every ``interval`` seconds. In between, a
        *due* tick (only the rollouts whose inputs, soak or deadline changed since their last
        judgement, :meth:`_order`) runs as soon as a decision may be due, at most every
        ``wake_gap_s``: at the earliest soak end or deadline of a running stage (known from
        the last tick), and when new evidence is stored — a device report or a new or changed
        live rollout (:meth:`evidence_mark`, two index reads, polled every ``poll_s``; read
        *before* each tick, so what arrives during a tick wakes the next). A stage therefore
        passes at its soak's end or its deciding report plus one judgement, not at the next
        multiple of ``interval``. ``on_tick(start, end, report)`` sees every tick (the
        benchmarks' stopwatch)."""
        try:
            next_full = time.monotonic()
            while not stop.is_set():
                started = time.monotonic()
                mark = self.evidence_mark()
                full = started >= next_full
                t0 = time.time()
                rep: TickReport | None = None
                try:
                    rep = self.tick(full=full)
                except Exception:  # a database or storage outage: log, try again next tick
                    log.exception("rollout controller tick failed")
                    self._due = None
                if full:
                    next_full = started + interval
                if on_tick is not None and rep is not None:
                    try:
                        on_tick(t0, time.time(), rep)
                    except Exception:
                        log.exception("on_tick failed")
                if rep is None or not rep.leader:  # a standby (or an outage) waits for the
                    mark = None  # next full tick: no early lease attempts, no busy retries
                    self._due = None
                self._sleep(stop, next_full, started + wake_gap_s, mark, poll_s)
        finally:
            try:
                _lease.release(self.engine, self.holder)
            except Exception:
                log.exception("could not release the controller lease")

    def _sleep(
        self,
        stop: threading.Event,
        until: float,
        not_before: float,
        mark: tuple[Any, ...] | None,
        poll_s: float,
    ) -> None:
        """Wait until ``until`` (the next full tick, monotonic); from ``not_before`` on, also
        until a running stage's soak end or deadline (:attr:`_due`) or a change of the
        evidence mark."""
        while not stop.is_set():
            t = time.monotonic()
            if t >= until:
                return
            due = self._due
            if t >= not_before:
                if due is not None and t >= due:
                    return
                if mark is not None and self.evidence_mark() != mark:
                    return
            step = min(until - t, poll_s)
            if due is not None:
                step = min(step, max(due, not_before) - t)
            stop.wait(max(step, 0.005))

    def evidence_mark(self) -> tuple[Any, ...] | None:
        """What changes when new evidence or a new operator action is stored: the newest
        event id (every stored report event, including telemetry summaries, is a new
        ``events`` row: a primary-key lookup) and the live rollouts' newest id and change
        time (through the unique ``live_model`` index). ``None`` when it cannot be read (the
        loop then waits for the next full tick)."""
        from sqlalchemy import func

        from ota.fleet._db import read_only
        from ota.fleet._models import Event

        try:
            with Session(read_only(self.engine)) as s, s.begin():
                ev = s.execute(select(func.max(Event.id))).scalar()
                ro = s.execute(
                    select(func.max(Rollout.id), func.max(Rollout.updated_at)).where(
                        Rollout.live_model.is_not(None)
                    )
                ).one()
            return (ev, ro[0], ro[1])
        except Exception:
            log.debug("evidence mark unreadable", exc_info=True)
            return None

    def tick(self, now: float | None = None, *, full: bool = True) -> TickReport:
        """One evaluation, if this controller holds the lease: of every live rollout
        (``full``), or only of those whose inputs, soak or deadline changed since their last
        judgement (a *due* tick). Either way, in order of urgency (:meth:`_order`): pending
        intents and operator requests, then rollouts whose install outcomes, stage or clock
        (soak end, deadline) changed, then those whose health inputs changed, then the
        unchanged; the intents of each group are signed before the next group is judged."""
        now = time.time() if now is None else now
        report = TickReport(leader=False, kind="full" if full else "due")
        report.times["start"] = time.time()
        epoch = _lease.acquire(self.engine, self.holder, now, self.lease_ttl)
        report.leader = epoch is not None
        if epoch is None:
            return report
        rows = self._live_rows()
        inputs = self._inputs(rows, now)
        report.times["inputs"] = time.time()
        order = self._order(rows, inputs, now, full)
        report.judged = len(order)
        self._batch = []
        flushed = time.monotonic()
        group: int | None = None
        try:
            for g, r in order:
                rid = int(r.id)
                try:
                    if self._batch and (
                        g != group or time.monotonic() - flushed >= self.flush_s
                    ):  # each group's intents signed before the next is judged
                        self._flush(epoch, now, report)
                        flushed = time.monotonic()
                    group = g
                    self._one(rid, epoch, now, report, inputs, row=r)
                except LostLease:
                    report.errors.append("lost the lease")
                    self._batch = []
                    break
                except Exception as e:  # one rollout's trouble does not stop the others
                    log.exception("rollout #%s", rid)
                    report.errors.append(f"rollout #{rid}: {type(e).__name__}: {str(e)[:200]}")
            try:
                self._flush(epoch, now, report)
            except LostLease:
                report.errors.append("lost the lease")
        finally:
            self._batch = None
            self._tick_inputs = None
        self._deliver()  # what is queued, also what a crashed controller left
        live = {int(r.id) for r in rows}
        for gone in set(self._judged) - live:
            del self._judged[gone]
        for gone in set(self._seen) - live:
            del self._seen[gone]
        self._due = self._next_due(rows, now)
        report.times["end"] = time.time()
        return report

    def _live_rows(self) -> list[Rollout]:
        """Every live rollout's row, in one query (detached: read, never written through)."""
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            return list(
                s.execute(
                    select(Rollout).where(Rollout.state.in_(LIVE_STATES)).order_by(Rollout.id)
                ).scalars()
            )

    def _plan(self, r: Rollout) -> Plan:
        """The rollout's stored plan, validated once per distinct plan (kept by its text)."""
        text = json.dumps(r.plan, sort_keys=True)
        got = self._plans.get(text)
        if got is None:
            got = plan_from_dict(r.plan)
            if len(self._plans) >= 256:
                self._plans.clear()
            self._plans[text] = got
        return got

    def _order(
        self, rows: Sequence[Rollout], inputs: TickInputs, now: float, full: bool
    ) -> list[tuple[int, Rollout]]:
        """The rollouts to look at in this tick, most urgent first, as ``(group, row)``:
        0 a pending intent or an operator's request; 1 never judged by this controller, or
        its install outcomes (a report, a device timing out), stage, approval, or clock (its
        soak's end or deadline passed since its last judgement) changed — those whose soak is
        over (a promotion may be due) first; 2 only the extra gates' inputs changed, or their
        reuse expired; 3 nothing changed (left out of a due tick). A rollout whose grouped
        read is missing is group 1. Paused rollouts without a request are left out."""
        out: list[tuple[int, int, int, Rollout]] = []
        for r in rows:
            rid = int(r.id)
            if r.pending is not None or r.request is not None:
                out.append((0, 0, rid, r))
                continue
            if r.state != "running":
                continue
            plan = self._plan(r)
            if not 0 <= r.stage < len(plan.stages):
                out.append((1, 1, rid, r))
                continue
            stage = plan.stages[r.stage]
            soak_end = r.stage_started_at + stage.soak_s
            over = 0 if now >= soak_end else 1
            seen = self._seen.get(rid)
            outcomes = inputs.outcomes.get(rid)
            marks = inputs.marks.get(rid)
            if seen is None or outcomes is None or (self.extra_gates and marks is None):
                g = 1
            else:
                s_out, s_marks, s_key, at = seen
                deadline = r.stage_started_at + stage.deadline_s + 1e-6
                crossed = any(at < t <= now for t in (soak_end, deadline))
                key = (r.stage, r.stage_started_at, r.approved_stage, plan.digest())
                if key != s_key or crossed or outcomes != s_out:
                    g = 1
                elif (
                    marks != s_marks
                    or now - at >= self.refresh_s
                    or int(at // BUCKET_S) != int(now // BUCKET_S)
                ):
                    g = 2
                else:
                    g = 3
            if g < 3 or full:
                out.append((g, over, rid, r))
        out.sort(key=lambda x: (x[0], x[1], x[2]))
        return [(g, r) for g, _, _, r in out]

    def _next_due(self, rows: Sequence[Rollout], now: float) -> float | None:
        """When (monotonic) the earliest soak end or deadline after ``now`` of a running
        stage falls: a decision may be due then without any new report."""
        times: list[float] = []
        for r in rows:
            if r.state != "running" or r.pending is not None:
                continue
            plan = self._plan(r)
            if not 0 <= r.stage < len(plan.stages):
                continue
            stage = plan.stages[r.stage]
            for t in (  # a hair late: the soak passes at age >= soak, a deadline past it
                r.stage_started_at + stage.soak_s + 1e-3,
                r.stage_started_at + stage.deadline_s + 1e-3,
            ):
                if t > now:
                    times.append(t)
        if not times:
            return None
        return time.monotonic() + (min(times) - time.time())

    def _inputs(self, rows: Sequence[Rollout], now: float) -> TickInputs:
        """Every running rollout's install outcomes and change marks in a few grouped
        queries, and every release's signed state in one read of the repository. On any
        error, nothing (each rollout is then read on its own, as before)."""
        from ota.fleet._db import read_only

        got = TickInputs()
        try:
            live = [(r, self._plan(r)) for r in rows if r.state == "running"]
            live = [(r, p) for r, p in live if 0 <= r.stage < len(p.stages)]
            wants = [
                Want(int(r.id), r.model, r.version, p.stages[r.stage].ring,
                     now - p.device_timeout_s)
                for r, p in live
            ]  # fmt: skip
            with Session(read_only(self.engine)) as s, s.begin():
                got.outcomes = count_outcomes_many(s, wants)
                if self.extra_gates and live:
                    since = min(r.stage_started_at for r, _ in live) - BUCKET_S
                    releases = {
                        (r.model, v) for r, _ in live for v in (r.version, r.baseline_version)
                    }
                    tele = telemetry_marks(s, sorted(releases), since)
                    per_model, devices = fleet_marks(s, [r.model for r, _ in live])
                    for r, _ in live:
                        got.marks[int(r.id)] = (
                            tele.get((r.model, r.version)),
                            tele.get((r.model, r.baseline_version)),
                            per_model.get(r.model),
                            devices,
                        )
            pairs = [(r.model, r.version) for r, _ in live]
            got.signed = signed_states(self.project, pairs)
        except Exception:  # a failed batch read: each rollout reads its own, as before
            log.exception("grouped read of the live rollouts failed")
            return TickInputs()
        return got

    # -- one rollout ------------------------------------------------------------------------

    def _load(self, rid: int) -> Rollout:
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            r = s.get(Rollout, rid)
            assert r is not None
            return r

    def _one(
        self,
        rid: int,
        epoch: int,
        now: float,
        report: TickReport,
        inputs: TickInputs | None = None,
        *,
        row: Rollout | None = None,
    ) -> None:
        """Carry out, or judge and record, one rollout (``row``: as this tick read it)."""
        inputs = inputs or TickInputs()
        r = row if row is not None else self._load(rid)
        if r.pending is not None:
            self._carry_out_if_pending(rid, epoch, now, report)
            return
        plan = self._plan(r)
        if r.request is not None:
            self._from_request(r, plan, epoch, now, report)
            return
        if r.state != "running":
            return
        known = inputs.signed.get((r.model, r.version))
        signed, _ = known if known is not None else signed_state(self.project, r.model, r.version)
        if signed is None or signed.yanked or signed.paused:
            why = (
                "no longer a live release"
                if signed is None
                else "yanked"
                if signed.yanked
                else "paused"
            )
            self._end_outside(r, now, why)
            return
        stage = plan.stages[r.stage]
        reference, source, ref_hold = self._reference(r.model, r.version)
        ctx = RolloutContext(
            rollout_id=rid,
            model=r.model,
            version=r.version,
            baseline_version=r.baseline_version,
            stage_index=r.stage,
            ring=stage.ring,
            percent=stage.percent,
            stage_started_at=r.stage_started_at,
            now=now,
            health=dict(plan.health),
            reference=reference,
            reference_source=source,
        )
        self._tick_inputs = inputs
        gates = self._judge(ctx, plan) + ([ref_hold] if ref_hold is not None else [])
        self._note_seen(r, plan, inputs, now)
        action = combine(gates, plan.on_failure)
        reason = self._reason(action, gates)
        intent: dict[str, Any] | None = None
        last = r.stage + 1 >= len(plan.stages)
        if action in (Action.PAUSE, Action.ROLLBACK):
            intent = self._halt_intent(action, r.stage, reason)
        elif action == Action.PROMOTE and last:
            intent = {
                "event": "",
                "target": {},
                "stage_after": r.stage,
                "state_after": "done",
                "restart_clock": False,
                "reason": "every stage passed",
            }
        elif action == Action.PROMOTE:
            nxt = plan.stages[r.stage + 1]
            if nxt.approval and r.approved_stage < r.stage + 1:
                action, reason = (
                    Action.HOLD,
                    (
                        f"gates passed; entering stage {r.stage + 1} ({nxt.ring} {nxt.percent:g}%) "
                        "awaits `ota rollout approve`"
                    ),
                )
            else:
                intent = enter_intent(plan, r.stage + 1, reason)
        elif now - r.stage_started_at > stage.deadline_s:
            reason = f"held past the stage deadline ({stage.deadline_s:.0f} s): {reason}"
            action = Action.PAUSE
            intent = self._halt_intent(Action.PAUSE, r.stage, reason)
        judged = time.time()
        verdict = self._record(r, plan, action, reason, gates, intent, epoch, now)
        if verdict is not None:
            report.verdicts.append(verdict)
        if intent is not None:
            report.timings[rid] = {"judged": judged, "recorded": time.time()}
        self._carry_out_if_pending(rid, epoch, now, report)

    def _note_seen(self, r: Rollout, plan: Plan, inputs: TickInputs, now: float) -> None:
        """Keep what this judgement saw, for :meth:`_order` to compare at the next tick."""
        outcomes = inputs.outcomes.get(int(r.id))
        if outcomes is not None:
            key = (r.stage, r.stage_started_at, r.approved_stage, plan.digest())
            self._seen[int(r.id)] = (outcomes, inputs.marks.get(int(r.id)), key, now)

    def _reference(
        self, model: str, version: str
    ) -> tuple[tuple[OutputSummary, ...] | None, str, GateResult | None]:
        """The release's own signed reference (kept once read: release facts never change).
        One that cannot be read or validated is a HOLD naming why (fail closed: a release is
        never judged against a reference it does not validly carry, nor promoted without
        it)."""
        got = self._references.get((model, version))
        if got is None:
            try:
                got = signed_reference(self.project, model, version)
            except Exception as e:
                log.exception("reference of %s %s", model, version)
                return (
                    None,
                    "",
                    GateResult(
                        "health.reference",
                        GateStatus.HOLD,
                        f"the release's signed reference cannot be read: "
                        f"{type(e).__name__}: {str(e)[:200]}",
                    ),
                )
            if len(self._references) >= 256:  # releases rolled out by one process: bounded
                self._references.clear()
            self._references[(model, version)] = got
        source = f"{got.source} sha256:{got.sha256}" if got.outputs else ""
        return got.outputs, source, None

    def _carry_out_if_pending(self, rid: int, epoch: int, now: float, report: TickReport) -> None:
        if self._batch is not None:  # in a tick: signed with the others (:meth:`_flush`)
            self._batch.append(rid)
            return
        r = self._load(rid)
        if r.pending is not None:
            report.actions.append(self._carry_out(r, epoch, now))
            report.timings.setdefault(rid, {})["done"] = time.time()

    def _judge(self, ctx: RolloutContext, plan: Plan) -> list[GateResult]:
        """Install gates (from the tick's grouped read when there: ``_tick_inputs``), soak,
        then the extra gates (their last results while their inputs are unchanged)."""
        from ota.fleet._db import read_only

        inputs = self._tick_inputs or TickInputs()
        stage = plan.stages[ctx.stage_index]
        outcomes = inputs.outcomes.get(ctx.rollout_id)
        marks = inputs.marks.get(ctx.rollout_id)
        key: tuple[Any, ...] | None = None
        if marks is not None and ctx.reference is not None:  # an unread reference: no reuse
            key = (
                ctx.version,
                ctx.baseline_version,
                ctx.stage_index,
                ctx.stage_started_at,
                ctx.ring,
                ctx.percent,
                plan.digest(),
                ctx.reference_source,
                marks,
            )
        cached = self._judged.get(ctx.rollout_id)
        fresh = (
            key is not None
            and cached is not None
            and cached.key == key
            and cached.at <= ctx.now < cached.at + self.refresh_s
            and int(cached.at // BUCKET_S) == int(ctx.now // BUCKET_S)
        )
        # no query at all (unless a tier holds on failures: its population may defer it)
        if (
            fresh
            and outcomes is not None
            and cached is not None
            and not needs_population(outcomes, plan)
        ):
            return install_gates(None, ctx, plan, stage, outcomes) + list(cached.gates)
        with Session(read_only(self.engine)) as s, s.begin():
            results = install_gates(s, ctx, plan, stage, outcomes)  # the soak: by the clock
            if fresh and cached is not None:
                return results + list(cached.gates)
            extra = self._extra(s, ctx)
        if key is not None and not any(g.gate.startswith("error.") for g in extra):
            self._judged[ctx.rollout_id] = _Judged(key, tuple(extra), ctx.now)
        else:  # a gate that raised is judged again next tick
            self._judged.pop(ctx.rollout_id, None)
        return results + extra

    def _extra(self, s: Session, ctx: RolloutContext) -> list[GateResult]:
        results: list[GateResult] = []
        for gate in self.extra_gates:
            name = getattr(gate, "__name__", "gate")
            try:
                got = list(gate(s, ctx))
                if not all(isinstance(g, GateResult) for g in got):
                    raise TypeError("a gate must return GateResult objects")
                results += got
            except Exception as e:  # fail closed: a broken gate can only hold
                log.exception("gate %s failed", name)
                results.append(
                    GateResult(
                        f"error.{name}"[:64],
                        GateStatus.HOLD,
                        f"gate raised {type(e).__name__}: {str(e)[:200]}",
                    )
                )
        return results

    @staticmethod
    def _reason(action: Action, gates: Sequence[GateResult]) -> str:
        if action in (Action.PAUSE, Action.ROLLBACK):
            picked = [g for g in gates if g.status == GateStatus.FAIL]
        elif action == Action.HOLD:
            picked = [g for g in gates if g.status == GateStatus.HOLD]
        else:
            return "every gate passed"
        if not picked:
            return "no gate gave a result"
        text = "; ".join(
            f"{g.gate}{'[' + g.tier + ']' if g.tier else ''}: {g.reason}" for g in picked
        )
        return text[:1000]

    @staticmethod
    def _halt_intent(action: Action, stage: int, reason: str) -> dict[str, Any]:
        if action == Action.ROLLBACK:
            return {
                "event": "yank",
                "target": {"yanked": True},
                "stage_after": stage,
                "state_after": "rolled_back",
                "restart_clock": False,
                "reason": reason,
            }
        return {
            "event": "pause",
            "target": {"paused": True},
            "stage_after": stage,
            "state_after": "paused",
            "restart_clock": False,
            "reason": reason,
        }

    def _from_request(
        self, r: Rollout, plan: Plan, epoch: int, now: float, report: TickReport
    ) -> None:
        req = dict(r.request or {})
        op, who, why = str(req.get("op")), str(req.get("actor", "")), str(req.get("reason", ""))
        by = f"{op} by {who}" + (f": {why}" if why else "")
        intent: dict[str, Any] | None
        if op == "pause":
            intent = {
                "event": "pause",
                "target": {"paused": True},
                "stage_after": r.stage,
                "state_after": "paused",
                "restart_clock": False,
                "reason": by,
            }
        elif op == "resume" and r.state == "paused":
            intent = {
                "event": "resume",
                "target": {"paused": False},
                "stage_after": r.stage,
                "state_after": "running",
                "restart_clock": True,
                "reason": by,
            }
        elif op == "abort":
            intent = {
                "event": "pause",
                "target": {"paused": True},
                "stage_after": r.stage,
                "state_after": "aborted",
                "restart_clock": False,
                "reason": by,
            }
        elif op == "promote" and r.state == "running":
            if r.stage + 1 >= len(plan.stages):
                intent = {
                    "event": "",
                    "target": {},
                    "stage_after": r.stage,
                    "state_after": "done",
                    "restart_clock": False,
                    "reason": by,
                }
            else:
                intent = enter_intent(plan, r.stage + 1, by)
        else:
            intent = None  # no longer applies (e.g. resume of a rollout a verdict ended)
        action = {
            "pause": Action.PAUSE,
            "abort": Action.PAUSE,
            "resume": Action.PROMOTE,
            "promote": Action.PROMOTE,
        }.get(op, Action.HOLD)
        gate = GateResult(
            "operator",
            GateStatus.PASS if intent else GateStatus.HOLD,
            by[:500],
            evidence={"op": op, "actor": who},
        )
        verdict = self._record(
            r, plan, action, by, [gate], intent, epoch, now, clear_request=True, force=True
        )
        if verdict is not None:
            report.verdicts.append(verdict)
        self._carry_out_if_pending(r.id, epoch, now, report)

    def _end_outside(self, r: Rollout, now: float, why: str) -> None:
        """Someone steered the release by hand (``ota pause``/``yank``): follow, never fight."""
        with Session(self.engine) as s, s.begin():
            row = s.get(Rollout, r.id, with_for_update=True)
            if row is None or row.state != "running" or row.pending is not None:
                return
            row.state = "rolled_back" if why == "yanked" else "paused"
            if why == "no longer a live release":
                row.state = "aborted"
            row.live_model = row.model if row.state in LIVE_STATES else None
            row.reason = f"the release was {why} outside the controller"
            row.updated_at = now

    # -- verdicts and actions ---------------------------------------------------------------

    def _record(
        self,
        r: Rollout,
        plan: Plan,
        action: Action,
        reason: str,
        gates: Sequence[GateResult],
        intent: dict[str, Any] | None,
        epoch: int,
        now: float,
        *,
        clear_request: bool = False,
        force: bool = False,
    ) -> dict[str, Any] | None:
        """Store the verdict (and the intent, under the lease) in one transaction; then the
        audit entry and the hooks for a new verdict. Returns the new verdict's JSON, or
        ``None`` when it repeats the previous one."""
        digest = _digest(action.value, reason, gates)
        gates_json = [g.to_json() for g in gates]
        stage = plan.stages[r.stage] if 0 <= r.stage < len(plan.stages) else None
        with Session(self.engine) as s, s.begin():
            if not _lease.hold(s, self.holder, epoch, now):
                raise LostLease()
            row = s.get(Rollout, r.id, with_for_update=True)
            if row is None or row.pending is not None or row.state not in LIVE_STATES:
                return None
            prev = s.execute(
                select(RolloutVerdict)
                .where(RolloutVerdict.rollout_id == r.id)
                .order_by(RolloutVerdict.id.desc())
                .limit(1)
            ).scalar_one_or_none()
            if (
                not force
                and intent is None
                and prev is not None
                and prev.digest == digest
                and prev.stage == r.stage
            ):
                prev.repeats += 1
                prev.last_at = now
                prev.gates = gates_json  # the newest figures, same statuses
                row.reason = reason
                return None
            v = RolloutVerdict(
                rollout_id=r.id,
                at=now,
                last_at=now,
                repeats=1,
                stage=r.stage,
                action=action.value,
                reason=reason[:1024],
                acted=False,
                digest=digest,
                gates=gates_json,
            )
            s.add(v)
            s.flush()
            vid = int(v.id)
            if intent is not None:
                row.pending = {**intent, "verdict": vid, "epoch": epoch}
            if clear_request:
                row.request = None
            row.reason = reason[:1024]
            row.updated_at = now
            doc = {
                "format": VERDICT_FORMAT,
                "verdict": vid,
                "rollout": int(r.id),
                "model": r.model,
                "version": r.version,
                "baseline_version": r.baseline_version,
                "stage": r.stage,
                "ring": stage.ring if stage else None,
                "percent": stage.percent if stage else None,
                "action": action.value,
                "reason": reason,
                "at": now,
                "acts": intent is not None,
                "gates": gates_json,
            }
            for hook in self.on_verdict:  # the notification commits with the verdict, or not
                txn_hook = _transactional(hook)
                if txn_hook is not None:
                    txn_hook.in_transaction(s, doc)
        if intent is None:  # a hold: logged now (anchored by the next signed entry)
            self._audit_verdict(doc)
        self._notify(doc)
        return doc

    def _audit_verdict(self, doc: dict[str, Any]) -> int:
        details = dict(doc)
        details.pop("format", None)
        gates = details["gates"]
        if len(gates) > MAX_AUDIT_GATES:
            details["gates"] = gates[:MAX_AUDIT_GATES]
            details["gates_omitted"] = len(gates) - MAX_AUDIT_GATES
        # floats (and any non-finite value) as text: the log's canonical JSON has no floats
        details = json.loads(json.dumps(details, default=str), parse_float=str, parse_constant=str)
        try:
            entry = _auditlog.append_event(
                self.project.storage,
                "rollout-verdict",
                actor=self.actor,
                subject=f"{doc['model']} {doc['version']}",
                details=details,
            )
        except ValueError:  # too large even so: keep the statuses, drop the evidence
            details["gates"] = [
                {k: g[k] for k in ("gate", "tier", "status")} for g in details["gates"]
            ]
            entry = _auditlog.append_event(
                self.project.storage,
                "rollout-verdict",
                actor=self.actor,
                subject=f"{doc['model']} {doc['version']}",
                details=details,
            )
        return entry.seq

    def _notify(self, doc: dict[str, Any]) -> None:
        for hook in self.on_verdict:
            try:
                txn_hook = _transactional(hook)
                if txn_hook is not None:
                    txn_hook.deliver()  # already stored with the verdict
                else:
                    hook(doc)
            except Exception:
                log.exception("on_verdict hook %r failed", hook)

    def _deliver(self) -> None:
        for hook in self.on_verdict:
            txn_hook = _transactional(hook)
            if txn_hook is not None:
                try:
                    txn_hook.deliver()
                except Exception:
                    log.exception("on_verdict hook %r failed to deliver", hook)

    def _carry_out(self, r: Rollout, epoch: int, now: float) -> dict[str, Any]:
        """Bring the signed state to the pending intent's target (unless it is there already),
        then record the step as done. Safe to repeat after a crash at any point."""
        prep = self._prepare(r, epoch, now)
        if prep.sign:
            # fencing: still the one actor? renewing also gives the signature a whole lease
            if _lease.acquire(self.engine, self.holder, now, self.lease_ttl) != epoch:
                raise LostLease()
            self._sign(r, prep.pending)
            prep.signed = True
            if self.after_sign is not None:
                self.after_sign()
        return self._finish(prep, now)

    def _prepare(
        self,
        r: Rollout,
        epoch: int,
        now: float,
        known: tuple[RolloutState | None, str] | None = None,
    ) -> _Prepared:
        """Log the pending verdict (once) and decide whether the intent still needs signing
        (the *signed* state, read now or ``known`` from a read made after the intent was
        recorded, differs from its target)."""
        pending = dict(r.pending or {})
        target = dict(pending.get("target", {}))
        signed, _ = known if known is not None else signed_state(self.project, r.model, r.version)
        if pending.get("verdict") is not None and "audit_seq" not in pending:
            # the verdict's evidence is logged before its action, once (its seq is kept)
            pending["audit_seq"] = self._audit_pending(r, pending)
            self._save_pending(r.id, pending, epoch, now)
        if target and signed is None:
            pending.update(
                state_after="aborted",
                reason=f"{r.model} {r.version} is no longer a live release; nothing to sign",
            )
        need = bool(target) and signed is not None and not _matches(signed, target)
        return _Prepared(r, pending, need)

    def _finish(self, prep: _Prepared, now: float) -> dict[str, Any]:
        """Record the intent as carried out (the row's stage and state; the verdict acted)."""
        r, pending, signed_now = prep.r, prep.pending, prep.signed
        state_after = str(pending["state_after"])
        with Session(self.engine) as s, s.begin():
            row = s.get(Rollout, r.id, with_for_update=True)
            if row is None or row.pending is None:
                return {"rollout": r.id, "event": pending.get("event"), "signed": signed_now}
            row.stage = int(pending["stage_after"])
            if pending.get("restart_clock"):
                row.stage_started_at = now
            row.state = state_after
            row.live_model = row.model if state_after in LIVE_STATES else None
            row.reason = str(pending.get("reason", ""))[:1024]
            row.pending = None
            row.updated_at = now
            vid = pending.get("verdict")
            if vid is not None:
                v = s.get(RolloutVerdict, int(vid))
                if v is not None:
                    v.acted = True
        return {
            "rollout": r.id,
            "event": pending.get("event"),
            "signed": signed_now,
            "stage": int(pending["stage_after"]),
            "state": state_after,
        }

    def _flush(self, epoch: int, now: float, report: TickReport) -> None:
        """Carry out the intents this tick deferred: every signature in **one** steering
        transaction (one commit, each rollout's own audit entry, the last anchored by it),
        then each row. A batch that fails is signed rollout by rollout (nothing of it was
        committed: a transaction is atomic); a rollout that still fails keeps its intent for
        the next tick."""
        rids, self._batch = list(dict.fromkeys(self._batch or [])), []
        rows = [r for r in (self._load(rid) for rid in rids) if r.pending is not None]
        try:
            known = signed_states(self.project, [(r.model, r.version) for r in rows])
        except Exception:  # each reads its own
            log.exception("reading the signed states failed")
            known = {}
        preps: list[_Prepared] = []
        for r in rows:
            try:
                preps.append(self._prepare(r, epoch, now, known.get((r.model, r.version))))
            except LostLease:
                raise
            except Exception as e:
                log.exception("rollout #%s", r.id)
                report.errors.append(f"rollout #{r.id}: {type(e).__name__}: {str(e)[:200]}")
        to_sign = [p for p in preps if p.sign]
        if to_sign:
            if _lease.acquire(self.engine, self.holder, now, self.lease_ttl) != epoch:
                raise LostLease()
            self._sign_batch(to_sign, preps, report)
            signed_at = time.time()
            for p in to_sign:
                if p.signed:
                    report.timings.setdefault(int(p.r.id), {})["signed"] = signed_at
        for p in preps:
            try:
                report.actions.append(self._finish(p, now))
                report.timings.setdefault(int(p.r.id), {})["done"] = time.time()
            except Exception as e:
                log.exception("rollout #%s", p.r.id)
                report.errors.append(f"rollout #{p.r.id}: {type(e).__name__}: {str(e)[:200]}")

    def _sign_batch(
        self, to_sign: list[_Prepared], preps: list[_Prepared], report: TickReport
    ) -> None:
        try:
            if len(to_sign) == 1:
                self._sign(to_sign[0].r, to_sign[0].pending)
            else:
                self._sign_many([(p.r, p.pending) for p in to_sign])
            for p in to_sign:
                p.signed = True
        except Exception:
            log.exception("signing %d rollouts together failed; one by one", len(to_sign))
            for p in to_sign:
                try:
                    self._sign(p.r, p.pending)
                    p.signed = True
                except Exception as e:
                    log.exception("rollout #%s", p.r.id)
                    report.errors.append(f"rollout #{p.r.id}: {type(e).__name__}: {str(e)[:200]}")
                    preps.remove(p)  # its intent stays pending: carried out next tick
        if self.after_sign is not None and any(p.signed for p in preps):
            self.after_sign()

    def _audit_pending(self, r: Rollout, pending: dict[str, Any]) -> int:
        with Session(self.engine) as s, s.begin():
            v = s.get(RolloutVerdict, int(pending["verdict"]))
            gates = list(v.gates) if v is not None else []
            action = v.action if v is not None else ""
            at = v.at if v is not None else 0.0
        doc = {
            "format": VERDICT_FORMAT,
            "verdict": pending["verdict"],
            "rollout": int(r.id),
            "model": r.model,
            "version": r.version,
            "baseline_version": r.baseline_version,
            "stage": r.stage,
            "action": action,
            "reason": pending.get("reason", ""),
            "at": at,
            "acts": True,
            "target": pending.get("target"),
            "gates": gates,
        }
        return self._audit_verdict(doc)

    def _save_pending(self, rid: int, pending: dict[str, Any], epoch: int, now: float) -> None:
        with Session(self.engine) as s, s.begin():
            if not _lease.hold(s, self.holder, epoch, now):
                raise LostLease()
            row = s.get(Rollout, rid, with_for_update=True)
            if row is not None and row.pending is not None:
                row.pending = pending

    def _sign(self, r: Rollout, pending: dict[str, Any]) -> None:
        """The normal steering transaction (online bins key), its audit entry anchored by the
        commit and naming the rollout, the verdict and the verdict's audit entry."""
        from ota.repository._index import update_rollout
        from ota.repository._preflight import require_keys

        event = str(pending["event"])
        changes = dict(pending["target"])
        require_keys(self.project, event, targets=[index_target_path(r.model)])
        details = self._sign_details(r, pending, changes)
        _auditlog.run_logged(
            self.project,
            event,
            lambda txn: update_rollout(self.project, txn, r.model, r.version, **changes),
            subject=f"{r.model} {r.version}",
            details=details,
            actor=self.actor,
        )

    def _sign_many(self, items: Sequence[tuple[Rollout, dict[str, Any]]]) -> None:
        """Several rollouts' steering in one transaction: each its own audit entry (as
        :meth:`_sign` writes it), appended before the commit; the commit applies every
        change and anchors the last entry (the log is a hash chain: the anchored head
        covers the entries before it), as :func:`~ota.repository._auditlog.run_logged` does
        for one."""
        from ota.repository._index import update_rollout
        from ota.repository._preflight import require_keys
        from ota.repository._txn import Transaction, run

        changes: list[tuple[Rollout, dict[str, Any]]] = []
        entries = []
        for r, pending in items:
            event = str(pending["event"])
            change = dict(pending["target"])
            require_keys(self.project, event, targets=[index_target_path(r.model)])
            details = self._sign_details(r, pending, change)
            entries.append(
                _auditlog.append_event(
                    self.project.storage,
                    event,
                    actor=self.actor,
                    subject=f"{r.model} {r.version}",
                    details=details,
                )
            )
            changes.append((r, change))

        def apply(txn: Transaction) -> None:
            for r, change in changes:
                update_rollout(self.project, txn, r.model, r.version, **change)
            _auditlog.anchor_in(self.project, txn, entries[-1])

        try:
            run(self.project.storage, self.project.signers, self.project.expiry(), apply)
        except Exception as e:
            for entry, (r, _) in zip(entries, changes, strict=True):
                try:
                    _auditlog.append_event(
                        self.project.storage,
                        "aborted",
                        actor=self.actor,
                        subject=f"{r.model} {r.version}",
                        details={"seq": entry.seq, "error": type(e).__name__},
                    )
                except Exception:
                    log.exception("could not log the aborted batch")
            raise

    @staticmethod
    def _sign_details(
        r: Rollout, pending: dict[str, Any], changes: dict[str, Any]
    ) -> dict[str, Any]:
        details: dict[str, Any] = {
            k: repr(float(v)) if k == "percent" else v for k, v in changes.items()
        }
        details.update(
            rollout=int(r.id),
            verdict=pending.get("verdict"),
            verdict_seq=pending.get("audit_seq"),
            reason=str(pending.get("reason", ""))[:500],
        )
        return details


def build(
    engine: Engine,
    project: Project,
    *,
    extra_gates: Iterable[GateFn] = (),
    on_verdict: Iterable[VerdictHook] = (),
    **kw: Any,
) -> Controller:
    """A controller with the given plug-ins (a convenience for the CLI and the service)."""
    return Controller(
        engine, project, extra_gates=list(extra_gates), on_verdict=list(on_verdict), **kw
    )


def settle(controller: Controller, rid: int, now: float | None = None) -> list[dict[str, Any]]:
    """Carry out the pending intent or queued request of one rollout now, if no other
    controller holds the lease (the CLI's way to act at once); judges no gates (only a
    controller with every gate plugged in does). Returns the actions taken."""
    now = time.time() if now is None else now
    epoch = _lease.acquire(controller.engine, controller.holder, now, controller.lease_ttl)
    if epoch is None:
        return []
    report = TickReport(leader=True)
    try:
        r = controller._load(rid)
        if r.pending is not None:
            report.actions.append(controller._carry_out(r, epoch, now))
        elif r.request is not None and r.state in LIVE_STATES:
            controller._from_request(r, plan_from_dict(r.plan), epoch, now, report)
    finally:
        _lease.release(controller.engine, controller.holder)
    return report.actions
