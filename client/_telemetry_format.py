"""The ``edge-ota.telemetry/1`` format (ADR 0009): bounds, output specs and summaries, the
pure validators a fleet service imports, and the bounded output counter shared by devices and
the publisher's reference (so both count into the same bins the same way).

Invariants: nothing here does IO or reads a clock; every validator either returns a value whose
counts are consistent (latency total == inferences, errors <= inferences, output totals within
``n * MAX_SAMPLE``, sizes within the bounds) or raises :class:`TelemetryError`;
:class:`OutputCounter` holds a fixed number of counters whatever it is fed.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from typing import Any

from ota.bundle import validate_name_fmt, validate_version
from ota.errors import InputError

TELEMETRY_FORMAT = "edge-ota.telemetry/1"
EVENT_KIND = "telemetry"
# Latency buckets, seconds: 10 us .. 100 s, four per decade (edges rounded to 4 digits).
# Bucket 0 counts latencies below LATENCY_EDGES[0], bucket i (1..28) those in
# [LATENCY_EDGES[i-1], LATENCY_EDGES[i]), bucket 29 those >= LATENCY_EDGES[28].
LATENCY_EDGES: tuple[float, ...] = tuple(float(f"{1e-5 * 10 ** (k / 4):.4g}") for k in range(29))
LATENCY_BUCKETS = len(LATENCY_EDGES) + 1
MAX_OUTPUTS = 4
MAX_BINS = 64
MAX_CLASSES = 4096
TOP_K = 16
MAX_SAMPLE = 4096
MAX_COUNT = 2**53
MAX_SUMMARY_BYTES = 12 * 1024
MAX_INTERVAL_S = 86400.0
DEFAULT_INTERVAL_S = 300.0
_SMALL = 16  # outputs with at most this many values are counted without numpy temporaries


class TelemetryError(InputError):
    """Telemetry that cannot be accepted: malformed, oversized, inconsistent, or for a
    model version this device does not run."""


# -- the format: specs, summaries and their validation (pure) ---------------------------------


@dataclass(frozen=True)
class OutputSpec:
    """How one output is summarised: ``hist`` (``bins`` equal bins over ``[lo, hi]``, plus
    under, over and NaN counts) or ``classes`` (argmax over the last axis for float outputs,
    the values themselves for integer outputs; class ids >= ``MAX_CLASSES`` count as other)."""

    name: str
    kind: str = "hist"
    lo: float = 0.0
    hi: float = 1.0
    bins: int = 32

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "classes":
            return {"name": self.name, "kind": "classes"}
        # lo/hi as decimal strings: release facts are canonical JSON, which has no floats
        return {"name": self.name, "kind": "hist", "lo": repr(self.lo), "hi": repr(self.hi),
                "bins": self.bins}  # fmt: skip


@dataclass(frozen=True)
class OutputSummary:
    spec: OutputSpec
    n: int  # inferences that gave this output
    counts: tuple[int, ...] = ()  # hist: one per bin
    under: int = 0
    over: int = 0
    nan: int = 0
    top: tuple[tuple[int, int], ...] = ()  # classes: (class id, count), count descending
    other: int = 0

    def total(self) -> int:
        """Values counted (hist: elements, classes: rows)."""
        if self.spec.kind == "classes":
            return sum(c for _, c in self.top) + self.other
        return sum(self.counts) + self.under + self.over + self.nan

    def to_dict(self) -> dict[str, Any]:
        d = {**self.spec.to_dict(), "n": self.n}
        if self.spec.kind == "classes":
            d.update(top=[list(p) for p in self.top], other=self.other)
        else:
            d.update(counts=list(self.counts), under=self.under, over=self.over, nan=self.nan)
        return d


@dataclass(frozen=True)
class Summary:
    """One validated ``edge-ota.telemetry/1`` summary (or, with ``reference``, a release's
    reference distribution: outputs only)."""

    model: str
    version: str
    start: float
    end: float
    inferences: int
    errors: int
    crashes: int
    latency: tuple[int, ...]
    latency_sum_s: float
    outputs: tuple[OutputSummary, ...]

    def output(self, name: str) -> OutputSummary | None:
        return next((o for o in self.outputs if o.spec.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": TELEMETRY_FORMAT,
            "model": self.model,
            "version": self.version,
            "start": self.start,
            "end": self.end,
            "inferences": self.inferences,
            "errors": self.errors,
            "crashes": self.crashes,
            "latency": {"counts": list(self.latency), "sum_s": self.latency_sum_s},
            "outputs": [o.to_dict() for o in self.outputs],
        }


def _bad(msg: str) -> TelemetryError:
    return TelemetryError(f"bad telemetry summary: {msg}")


def _count(v: object, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_COUNT:
        raise _bad(f"{what} must be an integer in [0, 2**53]")
    return v


def _num(v: object, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise _bad(f"{what} must be a finite number")
    return float(v)


def _decimal(v: object, what: str) -> float:
    """A bin edge: a finite number written as a JSON string (at most 32 characters)."""
    if not isinstance(v, str) or not 1 <= len(v) <= 32:
        raise _bad(f"{what} must be a number in a string of at most 32 characters")
    try:
        x = float(v)
    except ValueError as e:
        raise _bad(f"{what} is not a number") from e
    if not math.isfinite(x):
        raise _bad(f"{what} must be finite")
    return x


def _keys(d: object, need: set[str], what: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise _bad(f"{what} is not an object")
    if set(d) != need:
        raise _bad(f"{what} has keys {sorted(map(str, d))[:12]}, expected {sorted(need)}")
    return d


def _spec(d: object) -> OutputSpec:
    if not isinstance(d, dict):
        raise _bad("an output is not an object")
    name = d.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= 128 or not name.isprintable():
        raise _bad("output name must be 1-128 printable characters")
    if d.get("kind") == "classes":
        return OutputSpec(name, "classes")
    if d.get("kind") != "hist":
        raise _bad(f"output kind must be hist or classes, not {d.get('kind')!r:.40}")
    lo, hi = _decimal(d.get("lo"), "lo"), _decimal(d.get("hi"), "hi")
    bins = d.get("bins")
    if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= MAX_BINS:
        raise _bad(f"bins must be an integer in [1, {MAX_BINS}]")
    if not lo < hi:
        raise _bad("lo must be below hi")
    return OutputSpec(name, "hist", lo, hi, bins)


def _output(d: object, inferences: int | None) -> OutputSummary:
    spec = _spec(d)
    assert isinstance(d, dict)
    base = {"name", "kind", "n"} | (
        {"top", "other"}
        if spec.kind == "classes"
        else {"lo", "hi", "bins", "counts", "under", "over", "nan"}
    )
    _keys(d, base, f"output {spec.name!r}")
    n = _count(d["n"], "n")
    if inferences is not None and n > inferences:
        raise _bad(f"output {spec.name!r} counts {n} inferences of {inferences}")
    if spec.kind == "classes":
        pairs = _top(d["top"])
        out = OutputSummary(spec, n, top=tuple(pairs), other=_count(d["other"], "other"))
    else:
        counts = d["counts"]
        if not isinstance(counts, list) or len(counts) != spec.bins:
            raise _bad(f"output {spec.name!r} needs exactly {spec.bins} counts")
        out = OutputSummary(
            spec,
            n,
            tuple(_count(c, "bin count") for c in counts),
            _count(d["under"], "under"),
            _count(d["over"], "over"),
            _count(d["nan"], "nan"),
        )
    if out.total() > MAX_COUNT:
        raise _bad("counts overflow")
    if n == 0 and out.total() != 0:
        raise _bad(f"output {spec.name!r} has values but no inference")
    if inferences is not None and out.total() > n * MAX_SAMPLE:
        raise _bad(f"output {spec.name!r} counts more than {MAX_SAMPLE} values per inference")
    return out


def _top(top: object) -> list[tuple[int, int]]:
    if not isinstance(top, list) or len(top) > TOP_K:
        raise _bad(f"top must be a list of at most {TOP_K} pairs")
    pairs: list[tuple[int, int]] = []
    for p in top:
        if not isinstance(p, list) or len(p) != 2:
            raise _bad("a top entry must be [class, count]")
        cls, c = _count(p[0], "class"), _count(p[1], "class count")
        if cls >= MAX_CLASSES or c == 0:
            raise _bad(f"class ids must be below {MAX_CLASSES} with a count above 0")
        pairs.append((cls, c))
    if len({c for c, _ in pairs}) != len(pairs):
        raise _bad("a class appears twice in top")
    if any(a[1] < b[1] for a, b in itertools.pairwise(pairs)):
        raise _bad("top must be sorted by count, highest first")
    return pairs


def _outputs(v: object, inferences: int | None) -> tuple[OutputSummary, ...]:
    if not isinstance(v, list) or len(v) > MAX_OUTPUTS:
        raise _bad(f"outputs must be a list of at most {MAX_OUTPUTS}")
    outs = tuple(_output(o, inferences) for o in v)
    if len({o.spec.name for o in outs}) != len(outs):
        raise _bad("an output name appears twice")
    return outs


def _size_ok(doc: object) -> None:
    try:
        size = len(json.dumps(doc, allow_nan=False))
    except (TypeError, ValueError, RecursionError) as e:
        raise _bad(f"not plain JSON: {e}") from e
    if size > MAX_SUMMARY_BYTES:
        raise _bad(f"{size} bytes, over the {MAX_SUMMARY_BYTES} bound")


def validate_summary(doc: object) -> Summary:
    """Validate one ``edge-ota.telemetry/1`` summary (as sent by a device) and return it.

    Checks, all of them: plain JSON within :data:`MAX_SUMMARY_BYTES`; exactly the documented
    keys; name and version well formed; ``0 <= start < end``, ``end - start <=
    MAX_INTERVAL_S``; every count an integer in ``[0, 2**53]``; ``errors <= inferences``;
    ``len(latency.counts) == LATENCY_BUCKETS`` and their total ``== inferences``;
    ``0 <= latency.sum_s`` and finite; per output: a known kind, a bounded spec, ``n <=
    inferences``, at most ``MAX_SAMPLE`` values per inference, ``top`` distinct and sorted.

    Raises:
        TelemetryError: on anything else. Pure: no IO, no clock.
    """
    _size_ok(doc)
    d = _keys(
        doc,
        {
            "format",
            "model",
            "version",
            "start",
            "end",
            "inferences",
            "errors",
            "crashes",
            "latency",
            "outputs",
        },
        "summary",
    )
    if d["format"] != TELEMETRY_FORMAT:
        raise _bad(f"unknown format {d['format']!r:.40}")
    model, version = d["model"], d["version"]
    try:
        validate_name_fmt(model)
        validate_version(version)
    except Exception as e:
        raise _bad(f"bad model name or version: {e}") from e
    start, end = _num(d["start"], "start"), _num(d["end"], "end")
    if not 0 <= start < end or end - start > MAX_INTERVAL_S:
        raise _bad(f"interval must satisfy 0 <= start < end <= start + {MAX_INTERVAL_S:g}")
    n = _count(d["inferences"], "inferences")
    errors, crashes = _count(d["errors"], "errors"), _count(d["crashes"], "crashes")
    if errors > n:
        raise _bad("more errors than inferences")
    lat = _keys(d["latency"], {"counts", "sum_s"}, "latency")
    counts = lat["counts"]
    if not isinstance(counts, list) or len(counts) != LATENCY_BUCKETS:
        raise _bad(f"latency needs exactly {LATENCY_BUCKETS} counts")
    hist = tuple(_count(c, "latency count") for c in counts)
    if sum(hist) != n:
        raise _bad(f"latency histogram holds {sum(hist)} inferences, not {n}")
    if n == 0 and crashes == 0:
        raise _bad("an empty summary")
    sum_s = _num(lat["sum_s"], "latency sum")
    if sum_s < 0:
        raise _bad("negative latency sum")
    return Summary(
        str(model),
        str(version),
        start,
        end,
        n,
        errors,
        crashes,
        hist,
        sum_s,
        _outputs(d["outputs"], n),
    )


def validate_reference(doc: object) -> tuple[OutputSummary, ...]:
    """Validate a release's reference output distribution (``Release.telemetry``):
    ``{"format": "edge-ota.telemetry/1", "outputs": [...]}``, outputs as in a summary.

    Raises:
        TelemetryError: malformed or oversized.
    """
    _size_ok(doc)
    d = _keys(doc, {"format", "outputs"}, "reference")
    if d["format"] != TELEMETRY_FORMAT:
        raise _bad(f"unknown format {d['format']!r:.40}")
    outs = _outputs(d["outputs"], None)
    if not outs:
        raise _bad("a reference needs at least one output")
    return outs


# -- aggregation (device side) ----------------------------------------------------------------


class OutputCounter:
    """Counters of one output over one interval (preallocated; never resized).

    numpy is imported by the methods, not by this module: the updater (``ota device update``)
    imports this package but never counts outputs, and numpy is a tenth of its start-up.
    """

    __slots__ = ("counts", "n", "nan", "over", "scale", "small", "spec", "under")

    def __init__(self, spec: OutputSpec) -> None:
        import numpy as np

        self.spec = spec
        self.n = 0
        size = MAX_CLASSES + 1 if spec.kind == "classes" else spec.bins
        self.counts = np.zeros(size, dtype=np.int64)  # classes: the last one is "other"
        self.small = [0] * size  # the few-values path (plain ints: no numpy per-call cost)
        self.under = self.over = self.nan = 0
        self.scale = spec.bins / (spec.hi - spec.lo) if spec.kind == "hist" else 0.0

    def add(self, value: Any) -> None:
        """Count one inference's output (bounded: at most MAX_SAMPLE values looked at).

        Raises:
            TypeError, ValueError: not an array of numbers (nothing is counted).
        """
        import numpy as np

        a = np.asarray(value)  # ValueError for a ragged list
        if a.dtype.kind not in "fiub":
            raise TypeError(f"output {self.spec.name!r} is not numeric ({a.dtype})")
        if self.spec.kind == "classes":
            self._add_classes(a)
            return
        x = a.reshape(-1)
        if x.size > MAX_SAMPLE:
            x = x[:: -(-x.size // MAX_SAMPLE)]
        self.n += 1
        if x.size <= _SMALL:  # a few values: plain Python is faster than numpy's per-call cost
            self._add_few(x.tolist())
            return
        bins = self.spec.bins
        t = (x.astype(np.float64) - self.spec.lo) * self.scale
        nan = int(np.count_nonzero(np.isnan(t)))
        under = int(np.count_nonzero(t < 0))
        over = int(np.count_nonzero(t > bins))
        inside = t[(t >= 0) & (t <= bins)].astype(np.intp)
        np.minimum(inside, bins - 1, out=inside)
        self.nan += nan
        self.under += under
        self.over += over
        self.counts += np.bincount(inside, minlength=bins)

    def _add_few(self, values: list[float]) -> None:
        lo, scale, counts, bins = self.spec.lo, self.scale, self.small, self.spec.bins
        for v in values:
            t = (float(v) - lo) * scale  # the same float64 arithmetic as the numpy path
            if math.isnan(t):
                self.nan += 1
            elif t < 0:
                self.under += 1
            elif t > bins:
                self.over += 1
            else:
                counts[min(int(t), bins - 1)] += 1

    def _add_classes(self, a: Any) -> None:
        import numpy as np

        if a.dtype.kind == "f":
            if a.ndim == 0 or a.shape[-1] == 0:
                return
            a = a.reshape(-1, a.shape[-1])
            if a.shape[0] > MAX_SAMPLE:
                a = a[:: -(-a.shape[0] // MAX_SAMPLE)]
            ids = a.argmax(axis=1)  # a NaN row gives the NaN's index: still one row
        else:
            ids = a.reshape(-1)
            if ids.size > MAX_SAMPLE:
                ids = ids[:: -(-ids.size // MAX_SAMPLE)]
        self.n += 1
        if ids.size <= _SMALL:
            for i in ids.tolist():
                self.small[i if 0 <= i < MAX_CLASSES else MAX_CLASSES] += 1
            return
        ids = np.where((ids < 0) | (ids >= MAX_CLASSES), MAX_CLASSES, ids)
        self.counts += np.bincount(ids, minlength=MAX_CLASSES + 1)

    def summary(self) -> OutputSummary:
        import numpy as np

        if self.spec.kind == "classes":
            tracked = (self.counts + np.asarray(self.small, dtype=np.int64))[:MAX_CLASSES]
            total = int(tracked.sum()) + int(self.counts[MAX_CLASSES]) + self.small[MAX_CLASSES]
            nz = np.flatnonzero(tracked)
            order = nz[np.lexsort((nz, -tracked[nz]))][:TOP_K]
            top = tuple((int(i), int(tracked[i])) for i in order)
            other = total - sum(c for _, c in top)
            return OutputSummary(self.spec, self.n, top=top, other=other)
        counts = tuple(int(c) + s for c, s in zip(self.counts, self.small, strict=True))
        return OutputSummary(self.spec, self.n, counts, self.under, self.over, self.nan)
