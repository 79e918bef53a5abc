"""Rollout plans: ordered stages and gate thresholds, read from TOML and validated whole.

A plan is pure data (no IO but :func:`load_plan` reading one bounded file). Invariants, each
enforced by :func:`parse_plan` before anything is written:

* stages go forward: rings never go back (``canary < pilot < ga``) and, within one ring, the
  percentage strictly increases; every percentage is in ``(0, 100]``;
* every duration is finite, in ``[0, 366 days]``; a stage's deadline is at least its soak;
* thresholds are in range (a failure rate in ``[0, 1)``); ``[gates.health]`` is a flat table
  of finite numbers whose keys the health gates define and validate (opaque here), except the
  one text key ``drift_metric``, which must name a metric the drift gates know
  (:data:`DRIFT_METRICS`: ``"js"`` or ``"psi"``);
* unknown keys anywhere are refused (a typo never silently becomes a default).

A malformed plan raises :class:`PlanError` (an :class:`~ota.errors.InputError`: exit 3) naming
the offending key; nothing is started.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ota.bundle import RINGS
from ota.errors import InputError

from ._verdict import Action

PLAN_FORMAT = "edge-ota.rollout-plan/1"
MAX_PLAN_BYTES = 64 * 1024
MAX_STAGES = 32
MAX_DURATION_S = 366 * 86400
MAX_MIN_DEVICES = 10_000_000
MAX_HEALTH_KEYS = 64
DRIFT_METRICS = ("js", "psi")  # Jensen-Shannon distance (base 2), Population Stability Index
_HEALTH_TEXT = {"drift_metric": DRIFT_METRICS}  # the [gates.health] keys that take a word
_KEY_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}\Z")
_DURATION_RE = re.compile(r"^(\d{1,9})\s*(s|m|h|d)?\Z")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}

DEFAULT_PLAN_TOML = """\
# The default rollout plan (docs/runbooks/rollout.md). A 5-device-minimum canary, then pilot
# and general availability in growing steps a day or so apart (as Mender and Memfault publish).
format = "edge-ota.rollout-plan/1"
on_failure = "pause"          # or "rollback": yank, devices on the release revert by themselves
device_timeout = "6h"         # started, no outcome after this long since its last step: a
                              # failure (keep it above the devices' health window)
stage_deadline = "3d"         # a stage still holding after this pauses and says why

[[stages]]
ring = "canary"
percent = 100
min_devices = 5
soak = "2h"

[[stages]]
ring = "pilot"
percent = 10
min_devices = 10
soak = "12h"

[[stages]]
ring = "pilot"
percent = 100
min_devices = 20
soak = "24h"

[[stages]]
ring = "ga"
percent = 5
min_devices = 50
soak = "24h"
approval = true               # a person runs `ota rollout approve` before general availability

[[stages]]
ring = "ga"
percent = 25
min_devices = 100
soak = "24h"

[[stages]]
ring = "ga"
percent = 100
min_devices = 100
soak = "24h"

[gates.install]
max_failure_rate = 0.05       # failed + smoke-failed + reverted + timed out, over executed devices
min_devices = 5               # executed, and failed, devices of a tier before it may halt
security_min_devices = 2      # devices refusing it for a security reason: halt at once

[gates.health]                # passed as it is to the inference-health gates (rollout/_health.py)
drift_metric = "js"           # output drift as "js" (Jensen-Shannon distance, 0..1) or "psi"
"""


class PlanError(InputError):
    """A rollout plan that is malformed, out of range or contradictory: exit 3."""


@dataclass(frozen=True)
class Stage:
    """One step: the release is offered to ``ring`` at ``percent`` (earlier rings at 100 %).

    ``min_devices``: confirmed devices of ``ring`` needed before the stage may promote (counted
    over the ring, so a later stage of the same ring includes the earlier one's devices).
    ``soak``: seconds the stage runs at least. ``deadline``: seconds after which a stage still
    holding pauses. ``approval``: entering this stage waits for ``ota rollout approve``.
    """

    ring: str
    percent: float
    min_devices: int
    soak_s: float
    deadline_s: float
    approval: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "ring": self.ring,
            "percent": self.percent,
            "min_devices": self.min_devices,
            "soak": self.soak_s,
            "deadline": self.deadline_s,
            "approval": self.approval,
        }


@dataclass(frozen=True)
class InstallGates:
    """``max_failure_rate`` over a tier's executed devices, judged from ``min_devices``
    executed devices on; ``security_min_devices`` distinct devices refusing the release for a
    security reason halt the stage at once (fewer hold it: one forged or confused device
    cannot halt every rollout, nor let one promote past its claim)."""

    max_failure_rate: float = 0.05
    min_devices: int = 5
    security_min_devices: int = 2


@dataclass(frozen=True)
class Plan:
    stages: tuple[Stage, ...]
    on_failure: Action = Action.PAUSE
    device_timeout_s: float = 6 * 3600.0
    install: InstallGates = InstallGates()
    health: Mapping[str, float | str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The plan as stored with a rollout (durations in seconds); parses back identically
        through :func:`plan_from_dict`."""
        return {
            "format": PLAN_FORMAT,
            "on_failure": self.on_failure.value,
            "device_timeout": self.device_timeout_s,
            "stages": [s.to_dict() for s in self.stages],
            "gates": {
                "install": {
                    "max_failure_rate": self.install.max_failure_rate,
                    "min_devices": self.install.min_devices,
                    "security_min_devices": self.install.security_min_devices,
                },
                "health": dict(self.health),
            },
        }

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def earliest_timeline(self) -> list[float]:
        """Seconds from the start at which each stage can be entered at the earliest (the soak
        of every stage before it; approvals and data not counted)."""
        out, t = [], 0.0
        for s in self.stages:
            out.append(t)
            t += s.soak_s
        return out

    def earliest_done_s(self) -> float:
        return sum(s.soak_s for s in self.stages)


def parse_duration(value: Any, where: str) -> float:
    """``90`` (seconds), ``"45m"``, ``"12h"``, ``"3d"`` -> seconds in ``[0, 366 d]``."""
    if isinstance(value, bool):
        raise PlanError(f"{where}: a duration, not a boolean")
    if isinstance(value, int):
        secs = _float(value, where)
    elif isinstance(value, float):
        secs = value
    elif isinstance(value, str):
        m = _DURATION_RE.match(value.strip())
        if not m:
            raise PlanError(f"{where}: not a duration: {value[:40]!r} (e.g. 90, 45m, 12h, 3d)")
        secs = float(int(m.group(1)) * _UNIT[m.group(2)])
    else:
        raise PlanError(f"{where}: a duration (seconds or '12h'), not {type(value).__name__}")
    if not math.isfinite(secs) or not 0 <= secs <= MAX_DURATION_S:
        raise PlanError(f"{where}: {secs:g} s is outside 0 s .. 366 d")
    return secs


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PlanError(f"{where}: a number, not {type(value).__name__}")
    f = _float(value, where)
    if not math.isfinite(f):
        raise PlanError(f"{where}: must be finite")
    return f


def _float(value: int | float, where: str) -> float:
    """``float(value)``; an integer too large for a float (TOML and JSON integers are unbounded
    in Python) is a PlanError, not an OverflowError."""
    try:
        return float(value)
    except OverflowError:
        raise PlanError(f"{where}: must be finite (an integer too large)") from None


def _int(value: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(f"{where}: an integer, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise PlanError(f"{where}: {value} is outside {lo} .. {hi}")
    return value


def _table(value: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PlanError(f"{where}: a table, not {type(value).__name__}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise PlanError(
            f"{where}: unknown key(s) {', '.join(repr(k[:40]) for k in unknown[:5])}",
            remedy=f"allowed: {', '.join(sorted(allowed))}",
        )
    return value


def _stage(doc: Any, i: int, default_deadline: float) -> Stage:
    where = f"stages[{i}]"
    d = _table(doc, where, {"ring", "percent", "min_devices", "soak", "deadline", "approval"})
    for k in ("ring", "percent", "min_devices", "soak"):
        if k not in d:
            raise PlanError(f"{where}: missing {k!r}")
    ring = d["ring"]
    if not isinstance(ring, str) or ring not in RINGS:
        raise PlanError(f"{where}.ring: {str(ring)[:40]!r} is not one of {', '.join(RINGS)}")
    percent = _number(d["percent"], f"{where}.percent")
    if not 0.0 < percent <= 100.0:
        raise PlanError(f"{where}.percent: {percent:g} is outside (0, 100]")
    soak = parse_duration(d["soak"], f"{where}.soak")
    deadline = parse_duration(d.get("deadline", max(default_deadline, soak)), f"{where}.deadline")
    if deadline < soak:
        raise PlanError(f"{where}: deadline ({deadline:g} s) is shorter than soak ({soak:g} s)")
    approval = d.get("approval", False)
    if not isinstance(approval, bool):
        raise PlanError(f"{where}.approval: true or false")
    return Stage(
        ring=ring,
        percent=percent,
        min_devices=_int(d["min_devices"], f"{where}.min_devices", 1, MAX_MIN_DEVICES),
        soak_s=soak,
        deadline_s=deadline,
        approval=approval,
    )


def _health(doc: Any) -> dict[str, float | str]:
    d = _table(doc, "gates.health", set(doc) if isinstance(doc, dict) else set())
    if len(d) > MAX_HEALTH_KEYS:
        raise PlanError(f"gates.health: more than {MAX_HEALTH_KEYS} keys")
    out: dict[str, float | str] = {}
    for k, v in d.items():
        if not _KEY_RE.match(k):
            raise PlanError(f"gates.health: key {k[:40]!r} is not lower_snake_case")
        choices = _HEALTH_TEXT.get(k)
        if choices is None:
            out[k] = _number(v, f"gates.health.{k}")
        elif isinstance(v, str) and v in choices:
            out[k] = v
        else:
            raise PlanError(
                f"gates.health.{k}: {str(v)[:40]!r} is not one of "
                + ", ".join(repr(c) for c in choices)
            )
    return out


def parse_plan(doc: Any) -> Plan:
    """Validate a plan document (TOML parsed, or :meth:`Plan.to_dict`) whole.

    Raises:
        PlanError: the first problem found, naming its key.
    """
    d = _table(
        doc,
        "plan",
        {"format", "on_failure", "device_timeout", "stage_deadline", "stages", "gates"},
    )
    fmt = d.get("format", PLAN_FORMAT)
    if fmt != PLAN_FORMAT:
        raise PlanError(f"format: {str(fmt)[:40]!r} is not {PLAN_FORMAT}")
    on_failure = d.get("on_failure", "pause")
    if on_failure not in ("pause", "rollback"):
        raise PlanError(f"on_failure: {str(on_failure)[:40]!r} is not 'pause' or 'rollback'")
    timeout = parse_duration(d.get("device_timeout", 6 * 3600), "device_timeout")
    if timeout <= 0:
        raise PlanError("device_timeout: must be above 0")
    default_deadline = parse_duration(d.get("stage_deadline", 3 * 86400), "stage_deadline")
    stages_doc = d.get("stages")
    if not isinstance(stages_doc, list) or not stages_doc:
        raise PlanError("stages: at least one [[stages]] table is required")
    if len(stages_doc) > MAX_STAGES:
        raise PlanError(f"stages: more than {MAX_STAGES}")
    stages = tuple(_stage(s, i, default_deadline) for i, s in enumerate(stages_doc))
    for i in range(1, len(stages)):
        a, b = stages[i - 1], stages[i]
        ra, rb = RINGS.index(a.ring), RINGS.index(b.ring)
        if rb < ra:
            raise PlanError(
                f"stages[{i}]: ring {b.ring} comes after {a.ring}: rings go canary < pilot < ga"
            )
        if ra == rb and b.percent <= a.percent:
            raise PlanError(
                f"stages[{i}]: {b.ring} at {b.percent:g}% does not increase on the stage before "
                f"({a.percent:g}%)"
            )
    gates = _table(d.get("gates", {}), "gates", {"install", "health"})
    inst = _table(
        gates.get("install", {}),
        "gates.install",
        {"max_failure_rate", "min_devices", "security_min_devices"},
    )
    rate = _number(inst.get("max_failure_rate", 0.05), "gates.install.max_failure_rate")
    if not 0.0 <= rate < 1.0:
        raise PlanError(f"gates.install.max_failure_rate: {rate:g} is outside [0, 1)")
    min_dev = _int(inst.get("min_devices", 5), "gates.install.min_devices", 1, MAX_MIN_DEVICES)
    min_sec = _int(
        inst.get("security_min_devices", 2), "gates.install.security_min_devices", 1, 1000
    )
    return Plan(
        stages=stages,
        on_failure=Action(on_failure),
        device_timeout_s=timeout,
        install=InstallGates(rate, min_dev, min_sec),
        health=_health(gates.get("health", {})),
    )


def plan_from_toml(text: str | bytes) -> Plan:
    """Parse and validate a TOML plan.

    Raises:
        PlanError: not UTF-8 TOML, too large, or invalid (see :func:`parse_plan`).
    """
    raw = text.encode() if isinstance(text, str) else text
    if len(raw) > MAX_PLAN_BYTES:
        raise PlanError(f"plan larger than {MAX_PLAN_BYTES} bytes")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise PlanError("plan is not UTF-8") from e
    except tomllib.TOMLDecodeError as e:
        raise PlanError(f"plan is not valid TOML: {e}") from e
    return parse_plan(doc)


def plan_from_dict(doc: Mapping[str, Any]) -> Plan:
    """A plan stored with a rollout (:meth:`Plan.to_dict`), validated again."""
    return parse_plan(dict(doc))


def default_plan() -> Plan:
    return plan_from_toml(DEFAULT_PLAN_TOML)


def load_plan(path: Path | None) -> Plan:
    """The plan in ``path`` (the default plan when ``None``).

    Raises:
        PlanError: unreadable, too large or invalid.
    """
    if path is None:
        return default_plan()
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_PLAN_BYTES + 1)
    except OSError as e:
        raise PlanError(f"cannot read plan {path}: {e.strerror or e}") from e
    return plan_from_toml(raw)
