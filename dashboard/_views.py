"""Routes of the dashboard blueprint (mounted at ``/dashboard`` on the fleet app).

Invariants:

* every page needs a session whose token allows the page's scope (``read``; the audit log
  ``admin``), every action its own (rollout actions ``rollout``, revoking a device ``admin``),
  checked on the token row at each request;
* a GET never changes anything; every POST carries the session's CSRF value and no foreign
  ``Origin``; an action is shown on a confirmation page (GET) before its form is posted;
* rollout actions call :mod:`ota.rollout._store` and ``settle`` exactly as ``ota rollout``
  does, so the dashboard can do nothing the CLI cannot, and every action is audited;
* every reply carries a strict Content-Security-Policy (no script at all) and every value is
  escaped by Jinja's autoescape; errors are HTML pages with a 4xx/503 status, never a trace.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask import Blueprint, Flask, Response, abort, g, redirect, render_template, request, url_for
from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as WResponse

from ota.errors import ConflictError, InputError, OtaError
from ota.fleet import _store
from ota.fleet._validate import DEVICE_ID_RE, NAME_RE, Rejected, device_filters

from . import _cache, _queries, _security, _supply, _svg

log = logging.getLogger("ota.dashboard")
ACTIONS = {
    "pause": "Pause the rollout (the release is signed paused; devices stop taking it).",
    "resume": "Resume the paused rollout (the stage clock restarts).",
    "approve": "Approve entering the next stage.",
    "abort": "Abort the rollout (the release stays paused).",
    "promote": "Promote now to the next stage, overriding the gates.",
}
NEEDS_REASON = ("abort", "promote")

bp = Blueprint("dashboard", __name__, template_folder="templates", static_folder="static")


def _when(t: float | None) -> str:
    if not t:
        return "-"
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _num(v: Any) -> str:
    if v is None:
        return "-"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return f"{f:.4g}"


class _Env:
    def __init__(self, app: Flask) -> None:
        fleet = app.extensions["ota_fleet"]
        self.engine: Engine = fleet["engine"]
        self.read_engine: Engine = fleet["read_engine"]
        self.config = fleet["config"]
        self._sessions: _security.Sessions | None = None

    @property
    def sessions(self) -> _security.Sessions:
        if self._sessions is None:
            self._sessions = _security.Sessions(_security.load_key())
        return self._sessions


def _env() -> _Env:
    from flask import current_app

    env: _Env = current_app.extensions["ota_dashboard"]
    return env


@contextmanager
def _read() -> Iterator[Session]:
    with Session(_env().read_engine, expire_on_commit=False) as s, s.begin():
        yield s


@contextmanager
def _write() -> Iterator[Session]:
    with Session(_env().engine, expire_on_commit=False) as s, s.begin():
        yield s


def _agg(name: str, *args: Any) -> tuple[Any, float]:
    """A fleet-wide aggregate of :mod:`._queries`, counted at most ``summary_max_age_s`` ago
    (:mod:`._cache`), and when it was counted."""
    env = _env()
    fn = getattr(_queries, name)

    def count() -> Any:
        with _read() as s:
            return fn(s, *args)

    return _cache.cached((env.config.db_url, name, *args), env.config.summary_max_age_s, count)


def _session_doc() -> dict[str, Any] | None:
    return _env().sessions.read(request.cookies.get(_security.COOKIE))


def _operator(need: str) -> _security.Operator:
    """The session's operator allowing ``need``: a redirect to the login page without one,
    403 when the token's scope is too small."""
    doc = _session_doc()
    with _read() as s:
        op = _security.operator_of(s, doc, time.time())
    if op is None:
        abort(redirect(url_for("dashboard.login", next=request.path)))
    if not op.allows(need):
        abort(403, f"this needs the {need!r} scope; your token has {op.scope!r}")
    g.dash_operator = op
    return op


def _check_post(doc: dict[str, Any] | None) -> None:
    if not _security.origin_ok(request.headers.get("Origin"), request.host_url):
        abort(403, "a form from another site was refused")
    if not _security.csrf_ok(doc, request.form.get("csrf")):
        abort(403, "the form's CSRF token is missing or wrong; reload the page")


def _arg_int(key: str) -> int | None:
    raw = request.args.get(key, "")
    if not raw:
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 15:
        abort(400, f"{key!r} must be a non-negative integer")
    return int(raw)


def _name(v: str, what: str) -> str:
    if not v or len(v) > 128 or not NAME_RE.match(v):
        abort(400, f"{what} has characters that are not allowed")
    return v


def _float_or_none(v: Any) -> float | None:
    """A gate's figure (stored as text or number) as a float, or ``None``."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _page(template: str, **kw: Any) -> str:
    return render_template(template, op=g.get("dash_operator"), when=_when, num=_num, **kw)


def register(app: Flask) -> None:
    """Mount the dashboard on the fleet app (``/dashboard``)."""
    app.extensions["ota_dashboard"] = env = _Env(app)
    _security.note_db_url(env.config.db_url)
    app.register_blueprint(bp, url_prefix="/dashboard")


@bp.after_request
def _headers(resp: Response) -> Response:
    for k, v in _security.HEADERS.items():
        resp.headers[k] = v
    return resp


@bp.errorhandler(HTTPException)
def _http_error(e: HTTPException) -> Any:
    resp = e.get_response()
    if 300 <= (e.code or 0) < 400 or (resp.status_code and 300 <= resp.status_code < 400):
        return resp
    return _error(e.code or 400, e.description or e.name)


@bp.errorhandler(Rejected)
def _rejected(e: Rejected) -> Any:
    return _error(e.status, e.message, e.headers)


@bp.errorhandler(sa_exc.OperationalError)
@bp.errorhandler(sa_exc.InterfaceError)
@bp.errorhandler(sa_exc.TimeoutError)
def _db_down(e: Exception) -> Any:
    log.warning("database unavailable: %s", str(e).splitlines()[0][:200])
    return _error(503, "the database is unavailable; retry", {"Retry-After": "5"})


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Any:
    return (
        render_template("error.html", status=status, message=message, op=None),
        status,
        (headers or {}),
    )


# --- login ---------------------------------------------------------------------------------


def _set_cookie(resp: WResponse, value: str) -> WResponse:
    secure = request.is_secure or os.environ.get(_security.SECURE_ENV) == "1"
    resp.set_cookie(
        _security.COOKIE,
        value,
        max_age=_security.SESSION_S,
        path="/dashboard",
        httponly=True,
        samesite="Strict",
        secure=secure,
    )
    return resp


def _safe_next(raw: str | None) -> str:
    nxt = raw or ""
    if not nxt.startswith("/dashboard") or "//" in nxt or "\\" in nxt or len(nxt) > 512:
        return url_for("dashboard.fleet")
    return nxt


@bp.get("/login")
def login() -> Any:
    doc = _session_doc()
    fresh = doc is None
    if fresh:
        cookie, doc = _env().sessions.anonymous()
    assert doc is not None
    resp = Response(
        render_template(
            "login.html", csrf=doc["c"], next=_safe_next(request.args.get("next")), op=None
        )
    )
    return _set_cookie(resp, cookie) if fresh else resp


@bp.post("/login")
def login_post() -> Any:
    doc = _session_doc()
    _check_post(doc)
    client = (request.remote_addr or "unknown")[:128]
    token = request.form.get("token", "").strip()
    now = time.time()
    with _write() as s:
        allowed = _security.login_allowed(s, client, now)
        if not allowed:
            _security.record(s, "dashboard", "dashboard.login_limited", client)
    if not allowed:
        raise Rejected(
            429,
            "rate_limited",
            "too many failed logins; wait and retry",
            {"Retry-After": str(int(_security.LOGIN_WINDOW_S))},
        )
    failure = ""
    with _write() as s:
        try:
            tok = _store.authenticate_operator(s, token[:600], "read", now)
        except Rejected as e:
            failure = e.message
            _security.record(s, "dashboard", "dashboard.login_failed", client)
        else:
            cookie, _ = _env().sessions.issue(tok)
            _security.record(s, f"token:{tok.name}", "dashboard.login", client)
    if failure:
        return Response(
            render_template(
                "login.html",
                csrf=doc["c"] if doc else "",
                next=_safe_next(request.form.get("next")),
                error=failure,
                op=None,
            ),
            401,
        )
    return _set_cookie(redirect(_safe_next(request.form.get("next")), 303), cookie)


@bp.post("/logout")
def logout() -> Any:
    doc = _session_doc()
    _check_post(doc)
    op = _operator("read")
    with _write() as s:
        _security.record(s, op.actor, "dashboard.logout", op.sid)
    resp = redirect(url_for("dashboard.login"), 303)
    resp.delete_cookie(_security.COOKIE, path="/dashboard")
    return resp


# --- pages ---------------------------------------------------------------------------------


@bp.get("/")
def fleet() -> Any:
    _operator("read")
    from ota.fleet import _summary

    env, now = _env(), time.time()
    summary = _summary.cached_summary(
        env.engine,
        env.read_engine,
        now,
        env.config.silent_after_s,
        int(env.config.summary_max_age_s),
    )
    models = sorted({m["model"] for m in summary["models"]})
    model = request.args.get("model") or (models[0] if models else "")
    if model:
        _name(model, "'model'")
    by_version: dict[tuple[str, str], int] = {}
    by_ring: dict[str, int] = {}
    for m in summary["models"]:
        by_version[(m["model"], m["version"])] = (
            by_version.get((m["model"], m["version"]), 0) + m["devices"]
        )
    chart_data, as_of = _agg("adoption", model) if model else ({}, now)
    rings, _ = _agg("by_ring_tier")
    problems, _ = _agg("problems")
    with _read() as s:
        silent = _queries.silent(s, now - env.config.silent_after_s)
    for ring, _tier, n in rings:
        by_ring[ring] = by_ring.get(ring, 0) + n
    return _page(
        "fleet.html",
        summary=summary,
        models=models,
        model=model,
        by_version=sorted(by_version.items())[:200],
        rings=rings,
        adoption=_svg.adoption_chart(f"Adoption of {model} over time", chart_data),
        health_chart=_svg.bar_chart(
            "Devices by health", list(summary["devices"]["by_health"].items())
        ),
        ring_chart=_svg.bar_chart("Devices by ring", sorted(by_ring.items())),
        silent=silent,
        problems=problems,
        silent_after_h=env.config.silent_after_s / 3600,
        as_of=as_of,
    )


@bp.get("/devices")
def devices() -> Any:
    _operator("read")
    try:
        args: dict[str, Any] = dict(device_filters(request.args))
    except Rejected as e:
        abort(400, e.message)
    h = request.args.get("health", "")
    if h and h not in _store.HEALTH:
        abort(400, "unknown health")
    args["health"] = h
    if request.args.get("silent") == "1":
        args["seen_before"] = time.time() - _env().config.silent_after_s
        args["revoked"] = False
    with _read() as s:
        page = _store.list_devices(s, limit=_queries.PAGE, **args)
    return _page(
        "devices.html",
        page=page,
        args=args,
        health=_store.HEALTH,
        silent=request.args.get("silent") == "1",
    )


@bp.get("/devices/<device_id>")
def device(device_id: str) -> Any:
    _operator("read")
    if len(device_id) > 128 or not DEVICE_ID_RE.match(device_id):
        abort(400, "not a device id")
    with _read() as s:
        page = _queries.device_page(s, device_id, _arg_int("before"))
        enrolled_by = page["device"].enrolled_by if page else ""
    if page is None:
        abort(404, f"no device {device_id}")
    return _page(
        "device.html", p=page, d=page["device"], enrolled_by=enrolled_by, csrf=g.dash_operator.csrf
    )


@bp.get("/rollouts")
def rollouts() -> Any:
    _operator("read")
    with _read() as s:
        rows, nxt = _queries.rollouts_page(s, _arg_int("before"))
        items = [_rollout_row(r) for r in rows]
    return _page("rollouts.html", rollouts=items, next=nxt)


def _rollout_row(r: Any) -> dict[str, Any]:
    from ota.rollout._plan import plan_from_dict

    plan = plan_from_dict(r.plan)
    return {
        "id": int(r.id),
        "model": r.model,
        "version": r.version,
        "baseline": r.baseline_version,
        "state": r.state,
        "reason": r.reason,
        "stage": r.stage,
        "stages": [
            {
                "index": i,
                "ring": st.ring,
                "percent": st.percent,
                "min_devices": st.min_devices,
                "soak_s": st.soak_s,
                "approval": st.approval,
            }
            for i, st in enumerate(plan.stages)
        ],
        "stage_started_at": r.stage_started_at,
        "approved_stage": r.approved_stage,
        "pending": r.pending,
        "request": r.request,
        "created_at": r.created_at,
        "created_by": r.created_by,
        "live": r.live_model is not None,
    }


@bp.get("/rollouts/<int:rid>")
def rollout(rid: int) -> Any:
    op = _operator("read")
    from ota.fleet._rollout_models import Rollout
    from ota.rollout._store import verdict_json

    with _read() as s:
        r = s.get(Rollout, rid)
        if r is None:
            abort(404, f"no rollout #{rid}")
        row = _rollout_row(r)
        verdicts, nxt = _queries.verdicts_page(s, rid, _arg_int("before"))
        vs: list[dict[str, Any]] = [
            verdict_json(v) | {"gates": v.gates if isinstance(v.gates, list) else []}
            for v in verdicts
        ]
        model, version, base = r.model, r.version, r.baseline_version
    outcomes, as_of = _agg("outcomes_by_ring", model, version)
    latency = _stage_latency(row)
    baseline = _agg("outcomes_by_ring", model, base)[0] if base else {}
    states = sorted({st for ring in outcomes.values() for st in ring})
    latest: list[Any] = vs[0]["gates"] if vs and _arg_int("before") is None else []
    latest = [gt for gt in latest if isinstance(gt, dict)]
    return _page(
        "rollout.html",
        r=row,
        verdicts=vs,
        next=nxt,
        latest=latest,
        outcomes=outcomes,
        baseline=baseline,
        states=states,
        actions=ACTIONS,
        can_act=op.allows("rollout"),
        as_of=as_of,
        versus=_svg.versus_chart(
            "Gate values: this release against the baseline",
            [
                (
                    f"{gt.get('gate', '')} {gt.get('tier') or ''}".strip(),
                    _float_or_none(gt.get("value")) or 0.0,
                    _float_or_none(gt.get("baseline")) or 0.0,
                    _float_or_none(gt.get("threshold")),
                )
                for gt in latest
                if _float_or_none(gt.get("value")) is not None
                and _float_or_none(gt.get("baseline")) is not None
            ][:20],
        ),
        latency=latency,
        stage_chart=_svg.bar_chart(
            "Confirmed devices by ring",
            [(ring, o.get("confirmed", 0)) for ring, o in sorted(outcomes.items())],
        ),
    )


def _stage_latency(row: dict[str, Any]) -> dict[str, Any] | None:
    """The current stage's latency distributions of the release and its baseline: the chart,
    and the same numbers for the table beside it (``None`` before the first stage). Summed
    over the ring's devices: a fleet-wide aggregate, cached as the others (:func:`_agg`)."""
    from ota.client._telemetry_format import LATENCY_EDGES
    from ota.rollout._health import p95

    if row["stage"] < 0 or row["stage"] >= len(row["stages"]):
        return None
    ring = row["stages"][row["stage"]]["ring"]
    since = float(row["stage_started_at"])
    got, as_of = _agg("stage_latency", row["model"], row["version"], row["baseline"], ring, since)
    names = [v for v in (row["version"], row["baseline"]) if v in got]
    series = {f"{v} ({'new' if v == row['version'] else 'baseline'})": got[v] for v in names}
    p95s = {k: p95(c) for k, c in series.items()}
    used = [i for c in series.values() for i, n in enumerate(c) if n]
    shown = (
        range(max(0, min(used) - 1), min(len(LATENCY_EDGES) + 1, max(used) + 2))
        if used
        else range(0)
    )
    totals = {k: sum(c) for k, c in series.items()}
    rows = [
        (
            _svg.latency_bucket_label(i, LATENCY_EDGES),
            [(c[i], f"{c[i] / totals[k] * 100:.1f}") for k, c in series.items()],
        )
        for i in shown
        if any(c[i] for c in series.values())
    ]
    title = f"Latency of {row['model']} {row['version']} against the baseline, ring {ring}"
    desc = (
        "Share of inferences per latency bucket (log scale) since the stage started; "
        + "; ".join(f"{k}: {totals[k]} inferences, p95 {p95s[k]:.4g} s" for k in series)
        if series
        else "No telemetry yet."
    )
    return {
        "ring": ring,
        "since": since,
        "as_of": as_of,
        "names": list(series),
        "totals": totals,
        "p95": {k: f"{v * 1000:.4g}" for k, v in p95s.items()},
        "rows": rows,
        "chart": _svg.latency_chart(title, desc, series, p95s, LATENCY_EDGES, shown),
    }


@bp.get("/rollouts/<int:rid>/<op_name>")
def rollout_confirm(rid: int, op_name: str) -> Any:
    op = _operator("rollout")
    if op_name not in ACTIONS:
        abort(404, "unknown action")
    from ota.fleet._rollout_models import Rollout

    with _read() as s:
        r = s.get(Rollout, rid)
        if r is None:
            abort(404, f"no rollout #{rid}")
        row = _rollout_row(r)
    return _page(
        "confirm.html",
        r=row,
        action=op_name,
        text=ACTIONS[op_name],
        needs_reason=op_name in NEEDS_REASON,
        csrf=op.csrf,
    )


@bp.post("/rollouts/<int:rid>/<op_name>")
def rollout_act(rid: int, op_name: str) -> Any:
    doc = _session_doc()
    _check_post(doc)
    op = _operator("rollout")
    if op_name not in ACTIONS:
        abort(404, "unknown action")
    reason = request.form.get("reason", "").strip()
    if op_name in NEEDS_REASON and not reason:
        abort(400, f"{op_name} needs a reason (it is recorded)")
    if len(reason) > 500:
        abort(400, "the reason is longer than 500 characters")
    from ota.fleet._rollout_models import Rollout
    from ota.rollout import _store as rstore
    from ota.rollout._controller import Controller, settle

    with _read() as s:
        r = s.get(Rollout, rid)
        if r is None:
            abort(404, f"no rollout #{rid}")
        model, live = r.model, r.live_model is not None
    if not live:
        abort(409, f"rollout #{rid} has ended")
    project, why = _supply.project()
    if project is None:
        abort(503, why)
    env = _env()
    try:
        if op_name == "approve":
            rstore.approve(env.engine, project, model, op.actor)
        else:
            rstore.request(env.engine, project, model, op_name, op.actor, reason)
        actions = settle(Controller(env.engine, project), rid)
    except ConflictError as e:
        abort(409, str(e))
    except InputError as e:
        abort(400, str(e))
    except OtaError as e:
        log.warning("rollout action failed: %s", e)
        abort(503, f"the action could not be carried out: {e}")
    note = "done" if actions or op_name == "approve" else "queued for the controller"
    return redirect(url_for("dashboard.rollout", rid=rid, done=f"{op_name} {note}"), 303)


@bp.post("/devices/<device_id>/revoke")
def device_revoke(device_id: str) -> Any:
    doc = _session_doc()
    _check_post(doc)
    op = _operator("admin")
    if len(device_id) > 128 or not DEVICE_ID_RE.match(device_id):
        abort(400, "not a device id")
    with _write() as s:
        _store.revoke_device(s, device_id, op.actor, time.time())
    return redirect(url_for("dashboard.device", device_id=device_id), 303)


@bp.get("/devices/<device_id>/revoke")
def device_revoke_confirm(device_id: str) -> Any:
    op = _operator("admin")
    if len(device_id) > 128 or not DEVICE_ID_RE.match(device_id):
        abort(400, "not a device id")
    return _page("confirm_revoke.html", device_id=device_id, csrf=op.csrf)


@bp.get("/releases/<model>/<version>")
def release(model: str, version: str) -> Any:
    _operator("read")
    _name(model, "the model")
    _name(version, "the version")
    after = request.args.get("after", "")
    if after and (len(after) > 128 or not DEVICE_ID_RE.match(after)):
        abort(400, "'after' is not a device id")
    fleet_side, as_of = _agg("release_fleet", model, version)
    with _read() as s:
        running, nxt = _queries.release_devices(s, model, version, after)
    project, why = _supply.project()
    supply = _supply.release(project, model, version) if project else {"errors": [why]}
    return _page(
        "release.html",
        model=model,
        version=version,
        f=fleet_side,
        as_of=as_of,
        running=running,
        next=nxt,
        x=supply,
    )


@bp.get("/releases")
def releases_index() -> Any:
    _operator("read")
    project, why = _supply.project()
    models: dict[str, list[dict[str, Any]]] = {}
    errors = [why] if why else []
    if project is not None:
        from ota.repository._ops import releases as live_releases

        try:
            for row in live_releases(project)[:1000]:
                models.setdefault(row.name, []).append(row.state.to_dict())
        except (OtaError, OSError) as e:
            errors.append(str(e))
    return _page("releases.html", models=models, errors=errors)


@bp.get("/audit")
def audit_log() -> Any:
    _operator("admin")
    project, why = _supply.project()
    page = _arg_int("page") or 0
    data = (
        _supply.audit_log(project, page)
        if project
        else {"ok": False, "problem": why, "entries": [], "pages": 0}
    )
    return _page("audit.html", a=data, page=page)
