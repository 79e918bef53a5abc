"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright with
``executable_path``), against the real service under gunicorn (issue 10).

What is proved: an operator logs in with a token; watches a rollout progress (the real
controller, real reports through the service's ingest code) and halt on failures; resumes and
pauses it through the UI behind a confirmation (the signed state follows); opens a device and
a release (its audit passes); a read-only operator sees no action and is refused one.
Accessibility basics in the browser, on every page: every input labelled, the keyboard (Tab)
reaches every link, button and field, and every text's colour against its background has a
contrast of at least 4.5:1 (computed here from the browser's computed styles).

``OTA_REQUIRE_CHROMIUM=1`` (CI) makes a missing Chromium or Playwright a failure, not a skip.
``OTA_SCREENSHOTS_DIR=docs/screenshots`` also saves a PNG of each page (``scripts/screenshots``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ota.repository import Project
from ota.repository._ops import model_index
from ota.rollout import _lease
from ota.rollout._controller import Controller
from ota.rollout._plan import plan_from_dict
from tests.fleet_fixtures import FleetService, start_service
from tests.test_dashboard_pages import _telemetry
from tests.test_dashboard_security import World
from tests.test_rollout_controller import project, published  # noqa: F401

CHROMIUM = os.environ.get("OTA_CHROMIUM", "/usr/bin/chromium")
DEADLINE_MS = 30_000


def _need_browser() -> Any:
    why = ""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        why = "playwright is not installed (pip install -e '.[dev]')"
    else:
        if not Path(CHROMIUM).exists():
            why = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if why:
        if os.environ.get("OTA_REQUIRE_CHROMIUM") == "1":
            pytest.fail(f"OTA_REQUIRE_CHROMIUM=1 but {why}")
        pytest.skip(why)
    return sync_playwright


@pytest.fixture
def browser() -> Iterator[Any]:
    sync_playwright = _need_browser()
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def served(
    project: Project,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[World, FleetService]]:
    monkeypatch.setenv("OTA_PROJECT", str(project.root_dir))
    monkeypatch.setenv("OTA_DASHBOARD_KEY_FILE", str(tmp_path / "dash.key"))
    w = World(project, tmp_path, failing_pilot=False)
    try:
        with start_service(w.cfg.db_url) as svc:
            yield w, svc
    finally:
        w.engine.dispose()


def login(page: Any, url: str, token: str) -> None:
    page.goto(f"{url}/dashboard/")
    page.get_by_label("Operator token").fill(token)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_load_state()
    assert page.url == f"{url}/dashboard/", page.content()[:3000]


def tick(w: World, at: float) -> None:
    """One controller evaluation at ``at``, then the lease is let go (as ``--once``), so the
    dashboard's actions are carried out at once."""
    ctl = Controller(w.engine, w.project, holder="ctl")
    ctl.tick(at)
    _lease.release(w.engine, "ctl")


def signed_paused(w: World) -> bool:
    index = model_index(w.project, "m")
    assert index is not None
    state = index.get("2.0.0")
    assert state is not None
    return state.paused


def shoot(page: Any, name: str) -> None:
    out = os.environ.get("OTA_SCREENSHOTS_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(out) / f"{name}.png"), full_page=True)


def test_a_rollout_progresses_halts_and_is_resumed_and_paused_in_the_browser(
    browser: Any, served: tuple[World, FleetService]
) -> None:
    w, svc = served
    page = browser.new_page()
    page.set_default_timeout(DEADLINE_MS)
    login(page, svc.url, w.tokens["rollout"])
    page.get_by_role("link", name="Rollouts").click()
    page.get_by_role("link", name=f"#{w.rid}").click()
    rollout_url = page.url
    assert page.locator("#rollout-stage").inner_text() == "1/3"
    assert page.locator("#rollout-state").inner_text() == "running"

    # progress: the canary soaked with enough confirmed devices -> the controller promotes
    t0 = w.rollout().stage_started_at
    tick(w, t0 + 601)
    page.reload()
    assert page.locator("#rollout-stage").inner_text() == "2/3"
    assert "promote" in page.locator("#h-verdicts + details, details.verdict").first.inner_text()

    # halt: pilot devices revert -> the failure gate fails -> paused, signed
    for i in range(1, 4):
        w.enroll(f"pil-{i}", "pilot")
        w.report(f"pil-{i}", "downloaded", "staged", "smoke_passed", "committed", "reverted")
    tick(w, t0 + 700)
    page.reload()
    assert page.locator("#rollout-state").inner_text() == "paused"
    assert "install.failures" in page.locator("#gates").inner_text()
    assert signed_paused(w)

    # resume through the UI, behind a confirmation
    page.get_by_role("link", name="Resume…").click()
    page.get_by_label("Reason (optional)").fill("false alarm: reverts were a power cut")
    page.get_by_role("button", name="Confirm: resume").click()
    page.wait_for_url(f"{rollout_url}?*")
    assert page.locator("#rollout-state").inner_text() == "running"
    assert not signed_paused(w)
    # and pause it again
    page.get_by_role("link", name="Pause…").click()
    page.get_by_role("button", name="Confirm: pause").click()
    page.wait_for_url(f"{rollout_url}?*")
    assert page.locator("#rollout-state").inner_text() == "paused"
    assert signed_paused(w) and w.rollout().state == "paused"

    # open a release (its audit passes) and a device
    page.get_by_role("link", name="m 2.0.0").first.click()
    assert "PASS" in page.locator("#audit-result").inner_text()
    page.get_by_role("link", name="Devices").click()  # (the Fleet page's lists are cached 10 s)
    page.get_by_label("Health").select_option("failing")
    page.get_by_role("button", name="Filter").click()
    page.get_by_role("link", name="pil-1").click()
    assert page.get_by_role("heading", name="Device pil-1").is_visible()
    assert "reverted" in page.locator("main").inner_text()

    # without the scope: no action offered, and the action's page refused
    reader = browser.new_page()
    reader.set_default_timeout(DEADLINE_MS)
    login(reader, svc.url, w.tokens["read"])
    reader.goto(rollout_url)
    assert "needs the rollout scope" in reader.locator("main").inner_text()
    assert reader.get_by_role("link", name="Resume…").count() == 0
    resp = reader.goto(f"{svc.url}/dashboard/rollouts/{w.rid}/resume")
    assert resp is not None and resp.status == 403
    assert "rollout" in reader.locator("main").inner_text()
    assert w.rollout().state == "paused"  # nothing changed


# --- accessibility ----------------------------------------------------------------------------

_LABELS = """() => [...document.querySelectorAll('input, select, textarea')]
  .filter(e => e.type !== 'hidden')
  .filter(e => e.labels.length === 0 && !e.getAttribute('aria-label'))
  .map(e => e.outerHTML)"""

_MARK = """() => {
  const els = [...document.querySelectorAll(
    'a[href], button, input:not([type=hidden]), select, textarea, summary')];
  els.forEach((e, i) => e.setAttribute('data-kbd', String(i)));
  return els.length;
}"""

_TEXTS = """() => {
  const parse = c => (c.match(/[\\d.]+/g) || []).map(Number);
  const bg = e => {
    for (let n = e; n && n.nodeType === 1; n = n.parentElement) {
      const c = parse(getComputedStyle(n).backgroundColor);
      if (c.length >= 3 && (c.length < 4 || c[3] > 0)) return c.slice(0, 3);
    }
    return [255, 255, 255];
  };
  const out = [];
  for (const e of document.querySelectorAll('body *')) {
    const own = [...e.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
    if (!own || e.closest('[hidden]')) continue;
    const r = e.getBoundingClientRect();
    if (r.width === 0 || r.height === 0) continue;
    const s = getComputedStyle(e);
    const svg = e instanceof SVGElement;
    const fg = parse(svg ? s.fill : s.color).slice(0, 3);
    out.push({text: e.textContent.trim().slice(0, 40), fg, bg: bg(svg ? e.closest('svg') : e)});
  }
  return out;
}"""


_CHARTS = """() => [...document.querySelectorAll('svg')]
  .filter(e => e.getAttribute('role') !== 'img' || !e.querySelector(':scope > title')
               || !e.querySelector(':scope > title').textContent.trim())
  .map(e => e.outerHTML.slice(0, 80))"""


def _luminance(rgb: list[float]) -> float:
    def channel(c: float) -> float:
        c = c / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(fg: list[float], bg: list[float]) -> float:
    """WCAG 2 contrast ratio of two sRGB colours."""
    hi, lo = sorted((_luminance(fg), _luminance(bg)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_contrast_formula() -> None:
    assert round(contrast([0, 0, 0], [255, 255, 255]), 1) == 21.0
    assert round(contrast([119, 119, 119], [255, 255, 255]), 2) == 4.48  # the classic #777


def check_page(page: Any) -> None:
    unlabeled = page.evaluate(_LABELS)
    assert unlabeled == [], f"{page.url}: inputs without a label: {unlabeled}"
    n = page.evaluate(_MARK)
    assert n > 0  # at least the skip link
    reached: set[str] = set()
    page.locator("body").focus()
    page.evaluate("() => document.activeElement && document.activeElement.blur()")
    for _ in range(n + 3):
        page.keyboard.press("Tab")
        k = page.evaluate("() => document.activeElement.getAttribute('data-kbd')")
        if k is not None:
            reached.add(k)
    missing = set(map(str, range(n))) - reached
    assert not missing, f"{page.url}: Tab never reaches elements {sorted(missing)}"
    texts = page.evaluate(_TEXTS)
    assert len(texts) >= 3, texts
    low = [
        (t["text"], t["fg"], t["bg"], round(contrast(t["fg"], t["bg"]), 2))
        for t in texts
        if contrast(t["fg"], t["bg"]) < 4.5
    ]
    assert not low, f"{page.url}: text below 4.5:1 contrast: {low[:5]}"
    untitled = page.evaluate(_CHARTS)
    assert untitled == [], f"{page.url}: charts without a <title>: {untitled}"


def test_every_page_is_labelled_keyboard_reachable_and_readable(
    browser: Any, served: tuple[World, FleetService]
) -> None:
    w, svc = served
    # latency telemetry of the baseline from the first stage's ring, received now (the tick
    # below runs the stages on simulated time, after it): the rollout page charts it
    ring = plan_from_dict(w.rollout().plan).stages[w.rollout().stage].ring
    w.enroll("lat-0", ring)
    w.report("lat-0", "telemetry", version="1.0.0", summary=_telemetry("1.0.0", {11: 3, 12: 1}))
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(DEADLINE_MS)
    page.goto(f"{svc.url}/dashboard/login")
    check_page(page)
    shoot(page, "login")
    login(page, svc.url, w.tokens["admin"])
    page.goto(f"{svc.url}/dashboard/rollouts/{w.rid}")
    assert page.locator("#latency").count() == 1  # the chart's table, checked with it
    chart = page.locator("svg[aria-labelledby='lat-title lat-desc']")
    assert "4 inferences" in chart.locator("desc").text_content()
    check_page(page)
    shoot(page, "rollout-latency")
    tick(w, w.rollout().stage_started_at + 601)  # a verdict with gates to show
    pages = {
        "fleet": "/dashboard/",
        "devices": "/dashboard/devices",
        "device": "/dashboard/devices/can-0",
        "rollouts": "/dashboard/rollouts",
        "rollout": f"/dashboard/rollouts/{w.rid}",
        "confirm": f"/dashboard/rollouts/{w.rid}/pause",
        "releases": "/dashboard/releases",
        "release": "/dashboard/releases/m/2.0.0",
        "audit-log": "/dashboard/audit",
    }
    for name, path in pages.items():
        resp = page.goto(f"{svc.url}{path}")
        assert resp is not None and resp.status == 200, path
        check_page(page)
        shoot(page, name)
    # the log is verified on its page
    page.goto(f"{svc.url}/dashboard/audit")
    assert "Chain intact" in page.locator("#log-verification").inner_text()
