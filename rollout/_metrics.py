"""Prometheus gauges of the live rollouts, computed from the database at each scrape.

Like the fleet gauges (``fleet/_metrics.py``), they are read from the one truth (the
``rollouts`` rows and each rollout's latest verdict), never kept per process, so any instance
answers the same. Names: prefix ``edge_ota_rollout_``; labels model, version, gate, tier,
state — bounded by what is published and by the fleet's tiers (capped at ``MAX_SERIES``).

* ``edge_ota_rollout_stage{model,version}``: the stage index (0-based; -1 before the first);
* ``edge_ota_rollout_percent{model,version,ring}``: the stage's percentage;
* ``edge_ota_rollout_state{model,version,state}``: 1 for the rollout's state;
* ``edge_ota_rollout_gate_status{model,version,gate,tier}``: 0 pass, 1 hold, 2 fail;
* ``edge_ota_rollout_gate_value`` / ``_gate_threshold`` (same labels): the latest figures;
* ``edge_ota_rollout_series_truncated``, ``_scrape_query_seconds``: the caps hit, the cost.

Served by ``ota fleet serve`` on its own ``GET /metrics`` (``fleet/_metrics.py`` registers the
collector) and by ``ota rollout controller --metrics-bind``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from ota.fleet._rollout_models import LIVE_STATES, Rollout, RolloutVerdict

PREFIX = "edge_ota_rollout_"
MAX_SERIES = 2000
MAX_ROLLOUTS = 1000  # live rollouts are one per model; more than this is cut (and said so)
_STATUS = {"pass": 0.0, "hold": 1.0, "fail": 2.0}


def _stage_of(plan: Any, stage: int) -> tuple[str, float] | None:
    """The stage's ring and percentage from the stored plan (validated when the rollout was
    started; read without re-validating the whole plan at every scrape, types checked)."""
    stages = plan.get("stages") if isinstance(plan, dict) else None
    if not isinstance(stages, list) or not 0 <= stage < len(stages):
        return None
    st = stages[stage]
    if not isinstance(st, dict):
        return None
    ring, pct = st.get("ring"), st.get("percent")
    if not isinstance(ring, str) or isinstance(pct, bool) or not isinstance(pct, int | float):
        return None
    return ring[:16], float(pct)


def _figure(v: Any) -> float | None:
    """A stored gate figure as a float, or None: not a number, or an integer beyond a float's
    range (JSON keeps it exact; ``float`` would raise and fail the whole scrape)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    try:
        return float(v)
    except OverflowError:
        return None


class RolloutCollector:
    """A prometheus-client collector; register it on a ``CollectorRegistry``.

    A scrape is one bounded statement, whatever the history: the live rollouts (found through
    the unique ``live_model`` index: non-null exactly while running or paused), at most
    ``MAX_ROLLOUTS``, each with its latest verdict's id (a correlated ``max(id)`` over the
    ``rollout_id`` index) in a derived table, then joined to that verdict by primary key for
    its gates; at most ``MAX_SERIES`` gate series. Ended rollouts' rows and older verdicts'
    gates are never read. The exposition's text, not the read, is most of a scrape's cost
    (about 0.03 ms per sample; ``bench/rollout_scrape.py``): ``MAX_SERIES`` bounds it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def rows(self) -> list[Any]:
        """The one statement: (model, version, stage, state, plan, latest gates) per live
        rollout, at most ``MAX_ROLLOUTS + 1`` rows."""
        live = (
            select(
                Rollout.id, Rollout.model, Rollout.version, Rollout.stage, Rollout.state,
                Rollout.plan,
                select(func.max(RolloutVerdict.id))
                .where(RolloutVerdict.rollout_id == Rollout.id)
                .correlate(Rollout)
                .scalar_subquery()
                .label("verdict_id"),
            )
            .where(Rollout.live_model.is_not(None), Rollout.state.in_(LIVE_STATES))
            .order_by(Rollout.id)
            .limit(MAX_ROLLOUTS + 1)
            .subquery()
        )  # fmt: skip
        q = (
            select(live.c.model, live.c.version, live.c.stage, live.c.state, live.c.plan,
                   RolloutVerdict.gates)
            .select_from(live)
            .outerjoin(RolloutVerdict, RolloutVerdict.id == live.c.verdict_id)
            .order_by(live.c.id)
        )  # fmt: skip
        with Session(self.engine) as s, s.begin():
            return list(s.execute(q).all())

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        t0 = time.perf_counter()
        stage = GaugeMetricFamily(
            f"{PREFIX}stage", "Stage index of the rollout", labels=["model", "version"]
        )
        percent = GaugeMetricFamily(
            f"{PREFIX}percent",
            "Percentage of the stage's ring",
            labels=["model", "version", "ring"],
        )
        state = GaugeMetricFamily(
            f"{PREFIX}state", "1 for the rollout's state", labels=["model", "version", "state"]
        )
        labels = ["model", "version", "gate", "tier"]
        status = GaugeMetricFamily(f"{PREFIX}gate_status", "0 pass, 1 hold, 2 fail", labels=labels)
        value = GaugeMetricFamily(f"{PREFIX}gate_value", "The gate's latest figure", labels=labels)
        threshold = GaugeMetricFamily(f"{PREFIX}gate_threshold", "The gate's limit", labels=labels)
        series = 0
        rows = self.rows()
        query_s = time.perf_counter() - t0
        for model, version, st_index, st_name, plan, gates in rows[:MAX_ROLLOUTS]:
            stage.add_metric([model, version], float(st_index))
            where = _stage_of(plan, int(st_index))
            if where is not None:
                percent.add_metric([model, version, where[0]], where[1])
            state.add_metric([model, version, st_name], 1.0)
            for g in gates if isinstance(gates, list) else []:
                if series >= MAX_SERIES or not isinstance(g, dict):
                    break
                series += 1
                lv = [model, version, str(g.get("gate", ""))[:64], str(g.get("tier", ""))[:64]]
                status.add_metric(lv, _STATUS.get(str(g.get("status")), 1.0))
                if (v := _figure(g.get("value"))) is not None:
                    value.add_metric(lv, v)
                if (t := _figure(g.get("threshold"))) is not None:
                    threshold.add_metric(lv, t)
        yield from (stage, percent, state, status, value, threshold)
        yield GaugeMetricFamily(
            f"{PREFIX}series_truncated",
            f"1 when more than {MAX_ROLLOUTS} live rollouts or {MAX_SERIES} gate series exist",
            value=float(len(rows) > MAX_ROLLOUTS or series >= MAX_SERIES),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}scrape_query_seconds",
            "Time the rollout gauges' database read took",
            value=query_s,
        )


def registry(engine: Engine) -> Any:
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry()
    reg.register(RolloutCollector(engine))
    return reg
