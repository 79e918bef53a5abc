"""What the dashboard's pages show, on real parts (the World of test_dashboard_security: a real
repository, fleet database, devices reporting through ingest, the real rollout store).

Proved: the rollout actions are the CLI's (approve, promote now with a reason, abort with a
reason; refused without one), each in the audit log; lists and timelines are paginated and
every page's rows are distinct and complete; the release page shows the audit result, the
SBOM, the diff against the previous release and the devices running it; the audit log page
shows a tampered log as not verified.
"""

from __future__ import annotations

import re
from pathlib import Path

from ota.repository import Project
from ota.repository._auditlog import LOG_PREFIX, read_log
from ota.rollout import _lease
from ota.rollout._controller import Controller
from tests.test_dashboard_security import World, csrf_of, dash_env, world  # noqa: F401
from tests.test_rollout_controller import project, published  # noqa: F401


def act(w: World, scope: str, op: str, reason: str = "") -> int:
    c = w.client(scope)
    url = f"/dashboard/rollouts/{w.rid}/{op}"
    page = c.get(url)
    assert page.status_code == 200
    return c.post(url, data={"csrf": csrf_of(page.text), "reason": reason}).status_code


def test_rollout_actions_are_the_clis_and_are_audited(world: World) -> None:  # noqa: F811
    w = world
    assert act(w, "rollout", "approve") == 303
    assert w.rollout().approved_stage == 1
    assert act(w, "rollout", "promote") == 400  # overriding the gates needs a reason
    assert w.rollout().stage == 0
    assert act(w, "rollout", "promote", "canary looked fine on the bench") == 303
    assert w.rollout().stage == 1  # carried out at once: no controller holds the lease
    assert act(w, "rollout", "resume") == 400  # not paused
    assert act(w, "rollout", "abort") == 400
    assert act(w, "rollout", "abort", "wrong build") == 303
    r = w.rollout()
    assert r.state == "aborted" and r.live_model is None
    assert act(w, "rollout", "pause") == 409  # ended
    ops = [
        (e.details["op"], e.details.get("reason", ""), e.actor)
        for e in read_log(w.project.storage)
        if e.event == "rollout-operator"
    ]
    assert ops == [
        ("approve", "", "token:rollout-op"),
        ("promote", "canary looked fine on the bench", "token:rollout-op"),
        ("abort", "wrong build", "token:rollout-op"),
    ]
    page = w.client("read").get(f"/dashboard/rollouts/{w.rid}").text
    assert "aborted" in page and "This rollout has ended" in page


def test_lists_and_timelines_are_paginated(world: World) -> None:  # noqa: F811
    w = world
    for i in range(55):
        w.enroll(f"z-{i:03d}", "ga")
    w.report("can-0", *(["checked"] * 60))  # 60 more events on one device
    c = w.client("read")
    seen: list[str] = []
    url = "/dashboard/devices"
    while url:
        page = c.get(url)
        assert page.status_code == 200
        seen += re.findall(r'href="/dashboard/devices/([^"/]+)"', page.text)
        nxt = re.search(r'rel="next" href="([^"]+)"', page.text)
        url = nxt.group(1).replace("&amp;", "&") if nxt else ""
    assert len(seen) == len(set(seen)) == 55 + 3  # every device once, over two pages
    first = c.get("/dashboard/devices/can-0").text
    nxt = re.search(r'rel="next" href="([^"]+)"', first)
    row = "<td>checked</td><td>m 2.0.0</td>"  # a timeline row (kind, then release)
    assert nxt is not None and first.count(row) == 50
    older = c.get(nxt.group(1).replace("&amp;", "&")).text
    assert older.count(row) == 10 and "<td>confirmed</td><td>m 2.0.0</td>" in older


def test_the_release_page_shows_audit_sbom_diff_and_devices(world: World) -> None:  # noqa: F811
    c = world.client("read")
    page = c.get("/dashboard/releases/m/2.0.0").text
    assert "PASS: every check passed" in page
    assert "Changes since 1.0.0" in page and 'id="sbom-diff"' in page
    assert "machine-learning-model" in page  # an SBOM component row
    assert 'href="/dashboard/devices/can-0"' in page  # runs it
    assert "OpenSSF model signature" in page and "SLSA provenance" in page
    index = c.get("/dashboard/releases").text
    assert "/dashboard/releases/m/2.0.0" in index and "yanked" in index


def test_the_audit_log_page_shows_a_tampered_log(world: World, dash_env: Path) -> None:  # noqa: F811
    admin = world.client("admin")
    ok = admin.get("/dashboard/audit").text
    assert "Chain intact" in ok and "rollout-start" in ok
    p: Project = world.project
    key = sorted(p.storage.list(LOG_PREFIX))[0]  # the first entry of the chain
    data, _ = p.storage.get(key)
    p.storage.put(key, data.replace(b'"actor":"', b'"actor":"mallory-', 1))
    bad = admin.get("/dashboard/audit").text
    assert "NOT VERIFIED" in bad and "Chain intact" not in bad


def test_a_gate_with_a_baseline_is_charted_beside_it(world: World) -> None:  # noqa: F811
    """A health-style gate plugged into the real controller (as ``rollout/_health.py`` plugs
    in): its value, baseline and threshold reach the page as a chart and a table row, and its
    name is escaped in both."""
    from sqlalchemy.orm import Session as DbSession

    from ota.rollout._context import RolloutContext
    from ota.rollout._verdict import GateResult, GateStatus

    def latency(_s: DbSession, ctx: RolloutContext) -> list[GateResult]:
        return [
            GateResult(
                "health.latency_p95<b>",
                GateStatus.HOLD,
                "p95 of the new release vs the old",
                value=41.5,
                threshold=50.0,
                baseline=38.25,
                tier="npu",
            )
        ]

    ctl = Controller(world.engine, world.project, holder="G", extra_gates=[latency])
    ctl.tick(world.rollout().stage_started_at + 5)
    _lease.release(world.engine, "G")
    page = world.client("read").get(f"/dashboard/rollouts/{world.rid}").text
    assert "Gate values: this release against the baseline" in page
    assert "health.latency_p95&lt;b&gt; npu" in page and "<b>" not in page
    row = re.search(r"<td>health\.latency_p95&lt;b&gt;</td>(.*?)</tr>", page)
    assert row and "<td>41.5</td><td>50</td><td>38.25</td>" in row.group(1)
