"""When the controller judges: at a soak's end, on new evidence, the urgent rollouts first.

Real parts as in ``tests/test_rollout_controller.py`` (a real repository steered with the
online key; the fleet database on SQLite and PostgreSQL; reports through the service's own
parser and ingest). What is proved (ADR 0011, "When a tick runs"): with a full tick only every
hour, the controller's own loop still passes a stage at its soak's end, acts on the deciding
reports (a promotion, a halt) and on an operator's request, each in a *due* tick woken
early; within a tick, a rollout whose decision is due is judged and **signed** before the
unchanged rollouts are judged; a due tick leaves unchanged rollouts alone; a standby
controller (no lease) never wakes early. No test here measures a duration: each waits for a
condition with a generous deadline, and the full tick (one hour) is far beyond it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.orm import Session

from ota.fleet._models import Device, ReleaseState
from ota.fleet._rollout_models import RolloutVerdict
from ota.repository import Project
from ota.rollout import _store
from ota.rollout._context import RolloutContext
from ota.rollout._controller import Controller, TickReport
from ota.rollout._plan import plan_from_toml
from ota.rollout._verdict import GateResult, GateStatus
from tests.fleet_fixtures import fleet_backend, new_db, postgres  # noqa: F401
from tests.test_rollout_controller import (  # noqa: F401 - fixtures
    Fleet,
    any_fleet,
    project,
    published,
    row,
    signed,
)
from tests.test_rollout_tick import signed_of, start_of_bucket

HOUR = 3600.0  # the full tick's interval: no test waits that long
WAIT_S = 120.0  # a generous deadline for each condition on a loaded machine

SOAK_PLAN = """
on_failure = "pause"
device_timeout = "1h"
[[stages]]
ring = "canary"
percent = 100
min_devices = 2
soak = "{soak}"
[[stages]]
ring = "pilot"
percent = 50
min_devices = 1
soak = "10m"
[gates.install]
max_failure_rate = 0.2
min_devices = 3
"""


def wait_for(cond: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.05)


@contextmanager
def running(ctl: Controller, ticks: list[TickReport]) -> Iterator[None]:
    """The controller's own loop in a thread (a full tick every hour), every tick kept."""
    stop = threading.Event()
    th = threading.Thread(
        target=ctl.run,
        args=(HOUR, stop),
        kwargs={"on_tick": lambda _a, _b, rep: ticks.append(rep)},
        daemon=True,
    )
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join(timeout=WAIT_S)
        assert not th.is_alive()


def acting(ticks: list[TickReport]) -> list[tuple[str, str, int]]:
    """(tick kind, event, stage) of every signed action, in order."""
    return [
        (t.kind, str(a["event"]), int(a["stage"])) for t in ticks for a in t.actions if a["signed"]
    ]


def test_a_stage_passes_at_its_soak_end_without_waiting_for_the_full_tick(
    project: Project,  # noqa: F811
    any_fleet: Fleet,  # noqa: F811
) -> None:
    f = any_fleet
    for i in range(2):
        f.take(f"can-{i}", "canary")  # the evidence is in before the stage starts
    ticks: list[TickReport] = []
    ctl = Controller(f.engine, project, holder="A")
    _store.start(f.engine, project, "m", "2.0.0", plan_from_toml(SOAK_PLAN.format(soak="3s")), "t")
    with running(ctl, ticks):
        wait_for(lambda: signed(project).ring == "pilot", "stage 1 signed after the soak")
    # the entry by the first (full) tick; the promotion by a tick woken at the soak's end
    assert acting(ticks) == [("full", "promote", 0), ("due", "promote", 1)]
    assert [t.kind for t in ticks].count("full") == 1
    with Session(f.engine) as s:  # the soak held first: never promoted before its end
        held = s.query(RolloutVerdict).filter(RolloutVerdict.action == "hold").all()
        assert any("soak" in v.reason for v in held)


def test_reports_and_requests_wake_the_controller(
    project: Project,  # noqa: F811
    any_fleet: Fleet,  # noqa: F811
) -> None:
    f = any_fleet
    ticks: list[TickReport] = []
    other: list[TickReport] = []  # a second instance's controller: one of the two acts
    ctl = Controller(f.engine, project, holder="A")
    plan = plan_from_toml(SOAK_PLAN.format(soak="0s"))
    rid = _store.start(f.engine, project, "m", "2.0.0", plan, "local:test")
    with running(ctl, ticks), running(Controller(f.engine, project, holder="B"), other):
        wait_for(lambda: row(f.engine, rid).stage == 0, "stage 0 entered")
        wait_for(  # silence holds (install.sample), never promotes
            lambda: "install.sample" in row(f.engine, rid).reason, "a hold on too few devices"
        )
        assert signed(project).ring == "canary"
        for i in range(2):
            f.take(f"can-{i}", "canary")  # the deciding reports
        wait_for(lambda: signed(project).ring == "pilot", "stage 1 signed after the reports")
        _store.request(f.engine, project, "m", "pause", "local:test", reason="look first")
        wait_for(lambda: signed(project).paused, "the pause request signed")
    leader, standby = (ticks, other) if ticks[0].leader else (other, ticks)
    assert acting(leader) == [("full", "promote", 0), ("due", "promote", 1), ("due", "pause", 1)]
    assert row(f.engine, rid).state == "paused"
    # the standby tried once (its full tick) and then waits for the next full tick: it never
    # wakes early, so it neither acts nor contends for the lease at every report
    assert [(t.kind, t.leader) for t in standby] == [("full", False)]


def test_failure_reports_wake_the_controller_to_halt(
    project: Project,  # noqa: F811
    any_fleet: Fleet,  # noqa: F811
) -> None:
    f = any_fleet
    ticks: list[TickReport] = []
    ctl = Controller(f.engine, project, holder="A")
    plan = plan_from_toml(SOAK_PLAN.format(soak="10m"))  # nothing due by the clock
    rid = _store.start(f.engine, project, "m", "2.0.0", plan, "local:test")
    with running(ctl, ticks):
        wait_for(lambda: row(f.engine, rid).stage == 0, "stage 0 entered")
        for i in range(3):  # the deciding reports: 3 of 3 failed (min_devices 3)
            f.enroll(f"bad-{i}", "canary")
            f.report(f"bad-{i}", "downloaded", "staged", "smoke_failed", reason="smoke")
        wait_for(lambda: signed(project).paused, "the halt signed after the failures")
    assert acting(ticks) == [("full", "promote", 0), ("due", "pause", 0)]
    r = row(f.engine, rid)
    assert r.state == "paused" and "install.failures" in r.reason


class Seeing:
    """An extra gate that passes and notes, at each call, which model it judges and the
    *signed* ring of model ``c`` at that moment."""

    def __init__(self, proj: Project) -> None:
        self.proj = proj
        self.calls: list[tuple[float, str, str]] = []
        self.__name__ = "seeing"

    def __call__(self, _s: Session, ctx: RolloutContext) -> list[GateResult]:
        self.calls.append((ctx.now, ctx.model, signed_of(self.proj, "c").ring))
        return [GateResult("health.test", GateStatus.PASS, "ok", tier="cpu")]


LONG = """
on_failure = "pause"
[[stages]]
ring = "canary"
percent = 100
min_devices = 1
soak = "{soak}"
[[stages]]
ring = "ga"
percent = 100
min_devices = 1
soak = 0
"""


def test_a_due_decision_is_signed_before_the_unchanged_rollouts_are_judged(
    tmp_path: Path,
    fleet_backend: str,  # noqa: F811
) -> None:
    from tests.repo_helpers import make_project, publish_mlp

    proj = make_project(tmp_path)
    for m in ("a", "b", "c"):
        publish_mlp(proj, m, "1.0.0", ring="ga")
        publish_mlp(proj, m, "2.0.0", seed=1, percent=0.0)
    f = Fleet(fleet_backend)
    try:
        gate = Seeing(proj)
        # refresh_s = 0: the extra gates of every rollout are judged at every tick
        ctl = Controller(f.engine, proj, holder="A", extra_gates=[gate], refresh_s=0)
        long, short = (plan_from_toml(LONG.format(soak=s)) for s in ("10m", "1m"))
        ids = [_store.start(f.engine, proj, m, "2.0.0", long, "t") for m in ("a", "b")]
        ids.append(_store.start(f.engine, proj, "c", "2.0.0", short, "t"))  # judged last by id
        t0 = start_of_bucket()
        assert len([a for a in ctl.tick(t0).actions if a["signed"]]) == 3  # stage 0 entered
        ctl.tick(t0 + 10)  # every rollout judged once: holds on the sample and the soak
        with Session(f.engine) as s, s.begin():  # a canary device confirms c 2.0.0
            d = Device(device_id="d0", credential_hash="0" * 64, ring="canary", tier="cpu",
                       enrolled_at=t0, health="ok", events_total=0, dropped_total=0,
                       rate_window_start=0.0, rate_count=0)  # fmt: skip
            s.add(d)
            s.flush()
            s.add(ReleaseState(device_pk=d.id, model="c", version="2.0.0", state="confirmed",
                               updated_at=t0 + 20, active=True))  # fmt: skip
        gate.calls.clear()
        rep = ctl.tick(t0 + 61)  # c: soak over and its outcomes changed; a, b: nothing due
        assert [(a["rollout"], a["stage"]) for a in rep.actions] == [(ids[2], 1)]
        # c judged first, and signed before a and b were judged
        assert [(m, ring) for _, m, ring in gate.calls] == [
            ("c", "canary"),
            ("a", "ga"),
            ("b", "ga"),
        ]
        t = rep.timings[ids[2]]
        assert t["judged"] <= t["recorded"] <= t["signed"] <= t["done"]
        # a due tick leaves the unchanged rollouts alone: only c (its new stage) is judged
        ctl.refresh_s = 3600
        ctl.tick(t0 + 62)  # a and b judged once more (refresh_s 0 then), c at its new stage
        gate.calls.clear()
        rep = ctl.tick(t0 + 63, full=False)
        assert rep.kind == "due" and rep.judged == 0 and gate.calls == []
        rep = ctl.tick(t0 + 64)  # a full tick looks at every live rollout (reusing results)
        assert rep.judged == 3 and gate.calls == []
    finally:
        f.engine.dispose()
