"""What a gate is told about the stage it judges (the contract with the extra gates).

An extra gate (the inference-health gates of ``rollout/_health.py``) is a function
``gate(session, ctx) -> list[GateResult]`` called by the controller at each evaluation inside a
read transaction on the fleet database; it must only read, be bounded in time and memory, and
say ``HOLD`` (never ``PASS``) when it has too little data.

Its results are **reused** while its inputs are unchanged (``Controller._judge``, ADR 0011):
a gate is judged again when the release's or its baseline's ``telemetry_agg`` rows change
(rows, summaries or newest ``updated_at`` from the bucket before the stage's start), when
``device_models`` of the model change, when a device enrols or is revoked, at a new stage, at
a telemetry bucket boundary of the clock, after the controller's ``refresh_s`` (60 s by
default), and always after it raised. So a gate must depend only on those rows and on the
context's fields other than ``now`` within one telemetry bucket (the health gates do: ``now``
only closes their window, and rows are stamped with the service's clock). A gate that reads
anything else is still judged at least every ``refresh_s``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from ._verdict import GateResult

if TYPE_CHECKING:
    from ota.client._telemetry_format import OutputSummary


@dataclass(frozen=True)
class RolloutContext:
    """One stage of one rollout at one evaluation.

    ``baseline_version`` is the release the devices ran before (the newest live, not yanked
    release of the model below this one when the rollout started; ``""`` when none): the
    concurrent baseline is the devices of the same ring and tier still on it. ``ring`` and
    ``percent`` are the stage's (earlier rings are at 100 %). ``stage_started_at`` and ``now``
    are UNIX seconds of the service's clock. ``health`` is the plan's ``[gates.health]`` table
    (finite numbers, and the word ``drift_metric``; keys defined and validated by the health
    gates). ``reference`` is the release's own reference output distribution from its signed
    release facts (validated :class:`~ota.client._telemetry_format.OutputSummary` items; ``()``
    for a release published without one; ``None`` when not loaded), and ``reference_source``
    names it for the evidence (release and sha256 of the signed fact).
    """

    rollout_id: int
    model: str
    version: str
    baseline_version: str
    stage_index: int
    ring: str
    percent: float
    stage_started_at: float
    now: float
    health: Mapping[str, float | str] = field(default_factory=dict)
    reference: tuple[OutputSummary, ...] | None = None
    reference_source: str = ""


GateFn = Callable[[Session, RolloutContext], list[GateResult]]
