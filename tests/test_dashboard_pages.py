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
import time
from pathlib import Path

from ota.dashboard import _cache
from ota.dashboard._svg import latency_bucket_label as latency_label
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


def _telemetry(version: str, hist: dict[int, int]) -> dict[str, object]:
    """A valid ``edge-ota.telemetry/1`` summary whose latency histogram is ``hist``."""
    from ota.client._telemetry_format import LATENCY_BUCKETS, TELEMETRY_FORMAT, validate_summary

    counts = [hist.get(i, 0) for i in range(LATENCY_BUCKETS)]
    now = time.time()
    doc: dict[str, object] = {
        "format": TELEMETRY_FORMAT, "model": "m", "version": version, "start": now - 300,
        "end": now, "inferences": sum(counts), "errors": 0, "crashes": 0,
        "latency": {"counts": counts, "sum_s": 0.01 * sum(counts)}, "outputs": [],
    }  # fmt: skip
    validate_summary(doc)
    return doc


def test_the_stage_latency_chart_shows_the_rows(world: World) -> None:  # noqa: F811
    """Summaries reported through the real ingest route: the chart and its table show the
    canary ring's summed buckets of the new release and of the baseline, each normalised,
    with the pooled p95s; another ring's telemetry is left out; before any, "no telemetry"."""
    from ota.client._telemetry_format import LATENCY_EDGES
    from ota.rollout._health import p95

    c = world.client("read")
    page = c.get(f"/dashboard/rollouts/{world.rid}").text
    assert 'id="latency-empty"' in page and "No telemetry yet" in page
    assert 'id="latency"' not in page
    # the new release on two canaries (which ran it), the baseline on a third, noise elsewhere
    world.report("can-0", "telemetry", summary=_telemetry("2.0.0", {12: 20, 16: 5}))
    world.report("can-1", "telemetry", summary=_telemetry("2.0.0", {12: 10, 16: 5}))
    world.enroll("can-b", "canary")
    world.report(
        "can-b", "telemetry", version="1.0.0", summary=_telemetry("1.0.0", {11: 30, 12: 10})
    )
    world.enroll("ga-b", "ga")
    world.report("ga-b", "telemetry", version="1.0.0", summary=_telemetry("1.0.0", {25: 999}))
    assert 'id="latency-empty"' in c.get(f"/dashboard/rollouts/{world.rid}").text  # cached
    _cache.clear()  # as when summary_max_age_s has passed
    page = c.get(f"/dashboard/rollouts/{world.rid}").text
    assert 'id="latency-empty"' not in page
    table = re.search(r'<table id="latency">(.*?)</table>', page, re.S)
    assert table is not None
    rows = dict(
        re.findall(
            r'<tr><th scope="row">([^<]+)</th>((?:<td[^>]*>[^<]*</td>)+)</tr>', table.group(1)
        )
    )
    cells = {k: re.findall(r"<td[^>]*>([^<]*)</td>", v) for k, v in rows.items()}
    b11, b12, b16 = (latency_label(i, LATENCY_EDGES) for i in (11, 12, 16))
    # columns: new count, new %, baseline count, baseline %
    assert cells[b11] == ["0", "0.0", "30", "75.0"]
    assert cells[b12] == ["30", "75.0", "10", "25.0"]
    assert cells[b16] == ["10", "25.0", "0", "0.0"]
    assert cells["Inferences"] == ["40", "100", "40", "100"]  # the ga ring's 999 left out
    assert len(cells) == 3 + 2  # only the buckets holding data, then the two footer rows
    new_p95 = p95([20 + 10 if i == 12 else 10 if i == 16 else 0 for i in range(30)])
    base_p95 = p95([30 if i == 11 else 10 if i == 12 else 0 for i in range(30)])
    assert cells["p95 (ms)"] == [f"{new_p95 * 1000:.4g}", f"{base_p95 * 1000:.4g}"]
    assert LATENCY_EDGES[15] <= new_p95 <= LATENCY_EDGES[16]  # the new one is slower
    # the chart draws the same numbers: one bar per non-empty bucket, a p95 line per release
    svg = re.search(
        r'<svg class="chart" role="img" aria-labelledby="lat-title lat-desc".*?</svg>', page, re.S
    )
    assert svg is not None
    bars = re.findall(r"<rect [^>]*><title>([^<]+)</title></rect>", svg.group(0))
    assert sorted(bars) == sorted([
        f"2.0.0 (new) {b12}: 75.0 % (30)", f"2.0.0 (new) {b16}: 25.0 % (10)",
        f"1.0.0 (baseline) {b11}: 75.0 % (30)", f"1.0.0 (baseline) {b12}: 25.0 % (10)",
    ])  # fmt: skip
    assert '<desc id="lat-desc">' in svg.group(0) and "40 inferences" in svg.group(0)
    assert svg.group(0).count('stroke-dasharray="5,3"') == 2
    heights = {
        t: float(h)
        for h, t in re.findall(
            r'height="([\d.]+)" fill="[^"]+"><title>([^<]+)</title>', svg.group(0)
        )
    }
    # each release normalised: 75 % bars equally tall, 25 % bars a third of them
    assert (
        heights[f"2.0.0 (new) {b12}: 75.0 % (30)"]
        == heights[f"1.0.0 (baseline) {b11}: 75.0 % (30)"]
    )
    assert (
        abs(
            heights[f"2.0.0 (new) {b16}: 25.0 % (10)"] * 3
            - heights[f"2.0.0 (new) {b12}: 75.0 % (30)"]
        )
        < 0.3
    )
