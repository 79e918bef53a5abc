"""Prometheus gauges of the live rollouts, computed from the database at each scrape.

Like the fleet gauges (``fleet/_metrics.py``), they are read from the one truth (the
``rollouts`` rows and each rollout's latest verdict), never kept per process, so any instance
answers the same. Names: prefix ``edge_ota_rollout_``; labels model, version, gate, tier,
state — bounded by what is published and by the fleet's tiers (capped at ``MAX_SERIES``).

* ``edge_ota_rollout_stage{model,version}``: the stage index (0-based; -1 before the first);
* ``edge_ota_rollout_percent{model,version,ring}``: the stage's percentage;
* ``edge_ota_rollout_state{model,version,state}``: 1 for the rollout's state;
* ``edge_ota_rollout_gate_status{model,version,gate,tier}``: 0 pass, 1 hold, 2 fail;
* ``edge_ota_rollout_gate_value`` / ``_gate_threshold`` (same labels): the latest figures.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from ota.fleet._rollout_models import LIVE_STATES, Rollout, RolloutVerdict

from ._plan import plan_from_dict

PREFIX = "edge_ota_rollout_"
MAX_SERIES = 2000
_STATUS = {"pass": 0.0, "hold": 1.0, "fail": 2.0}


class RolloutCollector:
    """A prometheus-client collector; register it on a ``CollectorRegistry``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

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
        with Session(self.engine) as s, s.begin():
            rows = s.execute(select(Rollout).where(Rollout.state.in_(LIVE_STATES))).scalars()
            for r in rows:
                plan = plan_from_dict(r.plan)
                stage.add_metric([r.model, r.version], float(r.stage))
                if 0 <= r.stage < len(plan.stages):
                    st = plan.stages[r.stage]
                    percent.add_metric([r.model, r.version, st.ring], st.percent)
                state.add_metric([r.model, r.version, r.state], 1.0)
                v = s.execute(
                    select(RolloutVerdict.gates)
                    .where(RolloutVerdict.rollout_id == r.id)
                    .order_by(RolloutVerdict.id.desc())
                    .limit(1)
                ).scalar_one_or_none()
                for g in v or []:
                    if series >= MAX_SERIES:
                        break
                    series += 1
                    lv = [
                        r.model,
                        r.version,
                        str(g.get("gate", ""))[:64],
                        str(g.get("tier", ""))[:64],
                    ]
                    status.add_metric(lv, _STATUS.get(str(g.get("status")), 1.0))
                    if isinstance(g.get("value"), int | float):
                        value.add_metric(lv, float(g["value"]))
                    if isinstance(g.get("threshold"), int | float):
                        threshold.add_metric(lv, float(g["threshold"]))
        yield from (stage, percent, state, status, value, threshold)


def registry(engine: Engine) -> Any:
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry()
    reg.register(RolloutCollector(engine))
    return reg
