"""Inference telemetry at ingest (issue 9): ``telemetry`` events checked and folded into
per-device aggregates the rollout health gates query with SQL (``ota.rollout._health``).

A device sends ``edge-ota.telemetry/1`` summaries (ADR 0009) as ``telemetry`` events
(``data = {"summary": <doc>}``). :func:`absorb` runs inside the report's transaction, after the
events are stored and the device's derived state is written, on the *fresh* events only (above
the queue's high-water mark: a late or replayed event moves no derived state, as in ADR 0007).

Invariants:

* a summary is folded only when :func:`ota.client.telemetry.validate_summary` accepts it, the
  event names the same model and version, its ``end`` is at most ``MAX_SKEW_S`` after the
  receipt time, the device runs that version (this report's ``device.models``) or ran it
  (a ``committed``, ``confirmed`` or ``reverted`` state of that release on this device), and
  the device has sent fewer than ``MAX_PER_BUCKET`` summaries of that release in this time
  bucket (and at most ``MAX_PER_REPORT`` in this report). Anything else is refused: counted in
  ``telemetry_rejections`` by reason with the last message, logged, never a 4xx/5xx, and the
  rest of the report is stored as usual;
* folding only adds counts (``col = col + excluded.col``): rows are keyed by
  ``(device, model, version, bucket)`` where ``bucket`` is the start of the ``BUCKET_S``
  window of the *service's* receipt time (a device's clock cannot place data in another
  window); output bins are keyed by the output's binning too, so counts made with different
  bins are never added up;
* a report without ``telemetry`` events costs nothing here (no statement).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from sqlalchemy import Table, and_, bindparam, func, select, tuple_
from sqlalchemy.orm import Session

from ota.client._telemetry_format import (
    EVENT_KIND,
    LATENCY_BUCKETS,
    OutputSpec,
    OutputSummary,
    Summary,
    TelemetryError,
    validate_summary,
)

from ._models import (
    LATENCY_COLUMNS,
    Device,
    DeviceModel,
    ReleaseState,
    TelemetryAgg,
    TelemetryBin,
    TelemetryRejection,
)

BUCKET_S = 900.0  # aggregation window (service time)
MAX_SKEW_S = 600.0  # a summary may end at most this long after its receipt (clock skew)
MAX_PER_REPORT = 32  # telemetry events folded from one report
MAX_PER_BUCKET = 120  # summaries of one release per device and bucket (several processes)
RAN_STATES = ("committed", "confirmed", "reverted")
UNDER, OVER, NAN, OTHER = -1, -2, -3, -1

log = logging.getLogger("ota.fleet")

_AGG = cast(Table, TelemetryAgg.__table__)
_BIN = cast(Table, TelemetryBin.__table__)
_REJ = cast(Table, TelemetryRejection.__table__)
_BUCKET_ROWS = select(_AGG.c.model, _AGG.c.version, _AGG.c.summaries).where(
    _AGG.c.device_pk == bindparam("pk"), _AGG.c.bucket == bindparam("bucket")
)


@dataclass
class Absorbed:
    """What :func:`absorb` did with one report's telemetry events."""

    folded: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


def bucket_of(t: float) -> float:
    return math.floor(t / BUCKET_S) * BUCKET_S


def spec_key(spec: OutputSpec) -> str:
    """The binning of an output as a short string (part of the bins' key)."""
    if spec.kind == "classes":
        return "classes"
    return f"hist:{spec.lo!r}:{spec.hi!r}:{spec.bins}"


def spec_of(key: str, name: str) -> OutputSpec:
    """The inverse of :func:`spec_key`."""
    if key == "classes":
        return OutputSpec(name, "classes")
    _, lo, hi, bins = key.split(":")
    return OutputSpec(name, "hist", float(lo), float(hi), int(bins))


def bins_of(o: OutputSummary) -> dict[int, int]:
    """The non-zero bins of one output summary (the keys of ``telemetry_bins.bin``)."""
    if o.spec.kind == "classes":
        out = dict(o.top)
        if o.other:
            out[OTHER] = o.other
        return out
    out = {i: c for i, c in enumerate(o.counts) if c}
    for k, v in ((UNDER, o.under), (OVER, o.over), (NAN, o.nan)):
        if v:
            out[k] = v
    return out


def summary_from_bins(spec: OutputSpec, bins: Mapping[int, int], n: int = 0) -> OutputSummary:
    """An :class:`OutputSummary` holding ``bins`` (for the drift metrics of
    :mod:`ota.repository._drift`); ``top`` lists every class, not only the top ones."""
    if spec.kind == "classes":
        top = sorted(((c, v) for c, v in bins.items() if c >= 0 and v), key=lambda p: -p[1])
        return OutputSummary(spec, n, top=tuple(top), other=int(bins.get(OTHER, 0)))
    counts = tuple(int(bins.get(i, 0)) for i in range(spec.bins))
    return OutputSummary(
        spec, n, counts, int(bins.get(UNDER, 0)), int(bins.get(OVER, 0)), int(bins.get(NAN, 0))
    )


class _Refused(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _check(e: Any, now: float) -> Summary:
    data = e.data
    if not isinstance(data, dict) or set(data) != {"summary"}:
        raise _Refused("malformed", "telemetry event data must be {'summary': ...}")
    try:
        s = validate_summary(data["summary"])
    except TelemetryError as err:
        raise _Refused("malformed", str(err)) from err
    if (s.model, s.version) != (e.model, e.version):
        raise _Refused("mismatch", "the event and its summary name different releases")
    if s.end > now + MAX_SKEW_S:
        raise _Refused("future", f"the summary ends {s.end - now:.0f} s after its receipt")
    return s


class DeviceRef(Protocol):
    """The reporting device as ingestion holds it (``ota.fleet._ingest.Reporter``, a locked
    row): its primary key and its id."""

    @property
    def pk(self) -> int: ...

    @property
    def device_id(self) -> str: ...


@dataclass(frozen=True)
class DeviceKey:
    """A :class:`DeviceRef` built from an ORM ``Device`` (tests, benchmarks)."""

    pk: int
    device_id: str


def absorb(
    s: Session, dev: DeviceRef, models: Mapping[str, tuple[str, int]], events: Sequence[Any],
    now: float,
) -> Absorbed:  # fmt: skip
    """Check and fold the ``telemetry`` events among ``events`` (fresh events of one report of
    the locked ``dev``; ``models`` is the report's ``device.models``). Never raises for what
    the device sent: refused summaries are counted in ``telemetry_rejections``."""
    tel = [e for e in events if e.kind == EVENT_KIND]
    out = Absorbed()
    if not tel:
        return out
    refused: list[tuple[str, str]] = []
    good: list[Summary] = []
    for i, e in enumerate(tel):
        if i >= MAX_PER_REPORT:
            refused.append(("too_many", f"more than {MAX_PER_REPORT} summaries in one report"))
            continue
        try:
            good.append(_check(e, now))
        except _Refused as r:
            refused.append((r.reason, str(r)))
    good = _runs_or_ran(s, dev, models, good, refused)
    good = _within_rate(s, dev, good, bucket_of(now), refused)
    if good:
        _fold(s, dev, good, now)
    out.folded = len(good)
    for reason, message in refused:
        out.rejected[reason] = out.rejected.get(reason, 0) + 1
        last = message
    if refused:
        _count_refusals(s, dev, out.rejected, last, now)
        log.info("telemetry of %s refused: %s (last: %s)", dev.device_id, out.rejected, last[:200])
    return out


def _runs_or_ran(
    s: Session, dev: DeviceRef, models: Mapping[str, tuple[str, int]], good: list[Summary],
    refused: list[tuple[str, str]],
) -> list[Summary]:  # fmt: skip
    unknown = {(x.model, x.version) for x in good if models.get(x.model, ("",))[0] != x.version}
    ran: set[tuple[str, str]] = set()
    if unknown:
        rows = s.execute(
            select(ReleaseState.model, ReleaseState.version).where(
                ReleaseState.device_pk == dev.pk,
                tuple_(ReleaseState.model, ReleaseState.version).in_(sorted(unknown)),
                ReleaseState.state.in_(RAN_STATES),
            )
        )
        ran = {(m, v) for m, v in rows}
    keep = []
    for x in good:
        if (x.model, x.version) in unknown and (x.model, x.version) not in ran:
            refused.append(("wrong_version", f"this device does not run {x.model} {x.version}"))
        else:
            keep.append(x)
    return keep


def _within_rate(
    s: Session, dev: DeviceRef, good: list[Summary], bucket: float, refused: list[tuple[str, str]]
) -> list[Summary]:
    if not good:
        return good
    # the device's rows of this bucket (one per release it reports: few); a fixed statement,
    # so SQLAlchemy's compiled cache serves it
    have = {(m, v): int(n) for m, v, n in s.execute(_BUCKET_ROWS, {"pk": dev.pk, "bucket": bucket})}
    keep = []
    for x in good:
        k = (x.model, x.version)
        if have.get(k, 0) >= MAX_PER_BUCKET:
            refused.append(("too_many", f"more than {MAX_PER_BUCKET} summaries of {k} per bucket"))
            continue
        have[k] = have.get(k, 0) + 1
        keep.append(x)
    return keep


def _fold(s: Session, dev: DeviceRef, good: list[Summary], now: float) -> None:
    bucket = bucket_of(now)
    aggs: dict[tuple[str, str], dict[str, Any]] = {}
    bins: dict[tuple[str, str, str, str, int], int] = {}
    for x in good:
        a = aggs.get((x.model, x.version))
        if a is None:
            a = aggs[(x.model, x.version)] = {
                "device_pk": dev.pk, "model": x.model, "version": x.version, "bucket": bucket,
                "summaries": 0, "inferences": 0, "errors": 0, "crashes": 0,
                "latency_sum_s": 0.0, "updated_at": now, **dict.fromkeys(LATENCY_COLUMNS, 0),
            }  # fmt: skip
        a["summaries"] += 1
        a["inferences"] += x.inferences
        a["errors"] += x.errors
        a["crashes"] += x.crashes
        a["latency_sum_s"] += x.latency_sum_s
        for col, c in zip(LATENCY_COLUMNS, x.latency, strict=True):
            a[col] += c
        for o in x.outputs:
            sk = spec_key(o.spec)
            for b, c in bins_of(o).items():
                k = (x.model, x.version, o.spec.name, sk, b)
                bins[k] = bins.get(k, 0) + c
    conn = s.connection()
    conn.execute(_upsert(s, _AGG), list(aggs.values()))
    if bins:
        conn.execute(
            _upsert(s, _BIN),
            [
                {"device_pk": dev.pk, "model": m, "version": v, "bucket": bucket, "output": o,
                 "spec": sk, "bin": b, "count": c}
                for (m, v, o, sk, b), c in bins.items()
            ],
        )  # fmt: skip


def _count_refusals(
    s: Session, dev: DeviceRef, counts: Mapping[str, int], last: str, now: float
) -> None:
    rows = [
        {"device_pk": dev.pk, "reason": r, "count": n, "last_at": now, "last_message": last[:300]}
        for r, n in counts.items()
    ]
    s.connection().execute(_upsert(s, _REJ, replace=("last_at", "last_message")), rows)


_UPSERTS: dict[tuple[str, str], Any] = {}


def _upsert(s: Session, table: Table, replace: Iterable[str] = ("updated_at",)) -> Any:
    """``INSERT … ON CONFLICT DO UPDATE`` adding every count column (both dialects), built
    once per dialect and table."""
    from sqlalchemy.dialects import postgresql, sqlite

    name = s.get_bind().dialect.name
    stmt = _UPSERTS.get((name, table.name))
    if stmt is None:
        ins = (postgresql.insert if name == "postgresql" else sqlite.insert)(table)
        keys = [c.name for c in table.primary_key.columns]
        repl = set(replace)
        set_: dict[str, Any] = {}
        for c in table.columns:
            if c.name in keys:
                continue
            if c.name in repl:
                set_[c.name] = ins.excluded[c.name]
            else:  # a count: added up
                set_[c.name] = table.c[c.name] + ins.excluded[c.name]
        stmt = _UPSERTS[(name, table.name)] = ins.on_conflict_do_update(
            index_elements=keys, set_=set_
        )
    return stmt


# -- queries for the rollout gates --------------------------------------------------------------


@dataclass
class DeviceTelemetry:
    """One device's telemetry of one release over a window (summed buckets)."""

    device_pk: int
    tier: str
    inferences: int = 0
    errors: int = 0
    crashes: int = 0
    latency: tuple[int, ...] = (0,) * LATENCY_BUCKETS
    latency_sum_s: float = 0.0
    outputs: dict[tuple[str, str], dict[int, int]] = field(default_factory=dict)


_SUMS = ("inferences", "errors", "crashes", "latency_sum_s")


def _per_device_statements(on_version: bool) -> tuple[Any, Any]:
    """The two statements of :func:`per_device` (with or without the ``on_version`` join),
    built once with bound parameters: building them per call (a ``func.sum`` per latency
    column, the coercions of every condition) cost more than running them, and a fixed
    statement is served from SQLAlchemy's compiled cache. The device keys of the bins query
    are an expanding parameter (the same ``IN`` list the per-call statement had)."""
    cond = [
        _AGG.c.model == bindparam("model"),
        _AGG.c.version == bindparam("version"),
        _AGG.c.bucket >= bindparam("since"),
        _AGG.c.bucket <= bindparam("until"),
        Device.ring == bindparam("ring"),
        Device.revoked_at.is_(None),
    ]
    join = _AGG.join(Device.__table__, Device.id == _AGG.c.device_pk)
    if on_version:
        join = join.join(
            DeviceModel.__table__,
            and_(
                DeviceModel.device_pk == _AGG.c.device_pk, DeviceModel.model == bindparam("model")
            ),
        )
        cond.append(DeviceModel.version == bindparam("on_version"))
    sums = [func.sum(_AGG.c[c]) for c in _SUMS]
    lat = [func.sum(_AGG.c[c]) for c in LATENCY_COLUMNS]
    q = (
        select(_AGG.c.device_pk, Device.tier, *sums, *lat)
        .select_from(join)
        .where(*cond)
        .group_by(_AGG.c.device_pk, Device.tier)
    )
    bq = (
        select(_BIN.c.device_pk, _BIN.c.output, _BIN.c.spec, _BIN.c.bin, func.sum(_BIN.c.count))
        .where(
            _BIN.c.model == bindparam("model"),
            _BIN.c.version == bindparam("version"),
            _BIN.c.bucket >= bindparam("since"),
            _BIN.c.bucket <= bindparam("until"),
            _BIN.c.device_pk.in_(bindparam("pks", expanding=True)),
        )
        .group_by(_BIN.c.device_pk, _BIN.c.output, _BIN.c.spec, _BIN.c.bin)
    )
    return q, bq


_PER_DEVICE = (_per_device_statements(False), _per_device_statements(True))


def per_device(
    s: Session, model: str, version: str, ring: str, since: float, until: float,
    *, on_version: str | None = None,
) -> dict[int, DeviceTelemetry]:  # fmt: skip
    """Telemetry of ``model`` ``version`` per enrolled, unrevoked device of ``ring`` over the
    buckets that overlap ``[since, until]``. With ``on_version``, only devices that run that
    version now (``device_models``): the concurrent baseline.

    Both statements are fixed (:func:`_per_device_statements`); rows are decoded once each,
    and a device's output bins are filled through one dict lookup per ``(device, output)``
    run (the rows come grouped). Equal to the per-call statements it replaced
    (``tests/test_health_equivalence.py``)."""
    q, bq = _PER_DEVICE[on_version is not None]
    params: dict[str, Any] = {
        "model": model, "version": version, "since": bucket_of(since), "until": until,
        "ring": ring,
    }  # fmt: skip
    if on_version is not None:
        params["on_version"] = on_version
    out: dict[int, DeviceTelemetry] = {}
    for pk, tier, n, e, c, ls, *h in s.execute(q, params):
        ipk = int(pk)
        out[ipk] = DeviceTelemetry(
            ipk, str(tier), int(n or 0), int(e or 0), int(c or 0),
            tuple([int(v or 0) for v in h]), float(ls or 0.0),
        )  # fmt: skip
    if not out:
        return out
    params.pop("ring")
    params.pop("on_version", None)
    params["pks"] = sorted(out)
    last: tuple[Any, Any, Any] | None = None
    bins: dict[int, int] = {}
    for pk, o, sk, b, c in s.execute(bq, params):
        if (pk, o, sk) != last:
            last = (pk, o, sk)
            bins = out[int(pk)].outputs.setdefault((str(o), str(sk)), {})
        bins[int(b)] = int(c or 0)
    return out


def rejections(s: Session, device_pk: int | None = None) -> dict[str, int]:
    """Refused summaries by reason (of one device, or of all)."""
    q = select(_REJ.c.reason, func.sum(_REJ.c.count)).group_by(_REJ.c.reason)
    if device_pk is not None:
        q = q.where(_REJ.c.device_pk == device_pk)
    return {str(r): int(n or 0) for r, n in s.execute(q)}
