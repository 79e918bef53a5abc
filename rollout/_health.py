"""Inference-health gates (issue 9, ADR 0015): the new release's on-device telemetry against a
concurrent baseline, per hardware tier and over the whole stage.

For one stage (``ctx``: model, version, baseline version, ring, stage start, now) two cohorts
are read from ``telemetry_agg``/``telemetry_bins`` (:func:`ota.fleet._telemetry.per_device`)
over the same window ``[stage start, now]``: the *new* cohort (devices of the ring that sent
telemetry of the new version) and the *baseline* (devices of the ring that still run the
baseline version, their telemetry of it; at a stage of 100 % of its ring, where none is left
on it, the ring's devices' own telemetry of the baseline version in the window). Each gate
compares them per tier (``tier`` set) and overall (``tier == ""``):

* ``health.latency_p95``: per-device p95 read from the latency buckets. *Paired* when at
  least ``min_devices`` new devices also sent telemetry of the baseline version (from
  ``paired_lookback_s`` before the stage): value the median of each device's p95 ratio
  new / its own before; fail test a one-sided t-test of the log ratios > 0, pass test a
  one-sided Wilcoxon signed-rank test of the log ratios < log ``max_p95_ratio``, each
  without the ``min_devices - 1`` devices most in its favour. Otherwise *unpaired*: value the
  ratio of the cohorts' median p95s; test Mann-Whitney U (one-sided) on the per-device p95s;
* ``health.error_rate``: the pooled error rate with every device's weight capped
  (``device_weight_cap`` inferences), test Fisher's exact (one-sided) on the 2x2 table, a
  pass's confidence from a one-sided binomial test against the allowed rate;
  ``health.crash_rate``: crashes per inference (normalised for exposure), test an exact
  conditional binomial comparison of the two cohorts' Poisson rates without the
  ``min_devices - 1`` new devices of highest rate;
* ``health.drift``: per output, the Jensen-Shannon distance (or PSI) between the cohorts'
  mixtures of per-device distributions (each device weighs the same); test Mann-Whitney U on
  each device's distance to the baseline mixture (a baseline device's own distance, leave one
  out, is the noise level); only when both cohorts use the same bins;
* ``health.drift_reference``: per output, the distance of the new cohort's mixture to the
  release's signed reference distribution; test a one-sided one-sample t-test of the
  per-device distances against the threshold.

Invariants (what makes a verdict hard to forge):

* counting is per distinct device: a device is in a sample once, whatever it reports, and
  only when it reported at least ``min_device_inferences`` (``min_device_values`` output
  values for drift); too few devices (``min_devices``, each cohort) or inferences
  (``min_inferences``) is ``HOLD`` with the reason, never ``PASS``;
* ``FAIL`` needs the effect beyond its threshold, the test's confidence at least
  ``confidence``, **and** at least ``min_devices`` new devices individually beyond the
  threshold; ``PASS`` needs the effect within the threshold (pooled figures: without the
  ``min_devices - 1`` most extreme new devices) **and** at least ``min_devices`` new devices
  individually within it. So fewer than ``min_devices`` forged devices can
  neither fail nor pass a gate by themselves; the statistics (medians, ranks, capped
  weights, equal-weight mixtures) bound how far a minority moves the figures;
* the gates only read; every figure in a result is finite and JSON.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np

from ota.client._telemetry_format import LATENCY_EDGES, OutputSpec, OutputSummary
from ota.errors import InputError
from ota.fleet._telemetry import DeviceTelemetry, per_device, spec_key, spec_of, summary_from_bins

from ._plan import DRIFT_METRICS
from ._verdict import GateResult, GateStatus

__all__ = [
    "GATES",
    "HealthContext",
    "HealthThresholds",
    "evaluate_health",
    "health_gate",
    "p95",
    "p95s",
    "reference_of",
]

MIX_WEIGHT = 100_000  # pseudo-counts per device in an equal-weight mixture


class HealthContext(Protocol):
    """What the health gates need of the controller's ``RolloutContext``."""

    @property
    def model(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def baseline_version(self) -> str | None: ...
    @property
    def ring(self) -> str: ...
    @property
    def stage_started_at(self) -> float: ...
    @property
    def now(self) -> float: ...


@dataclass(frozen=True)
class HealthThresholds:
    """The ``[gates.health]`` table of a rollout plan; every key optional (defaults here).

    ``enabled``: 0 turns the health gates off for a plan whose devices send no telemetry (an
    explicit choice: otherwise silence holds every stage). ``min_devices``: devices each
    cohort needs, and new devices that must agree before a gate
    fails or passes (the forged-device bound). ``min_inferences``: inferences each cohort needs.
    ``min_device_inferences``/``min_device_values``: what makes a device count in a sample.
    ``confidence``: how sure a test must be before a failure (Kayenta's 98 %);
    ``pass_confidence``: how sure the one-sided test "within the threshold" must be before a
    pass (0 turns it off).
    ``max_p95_ratio``: new/baseline median p95. ``max_error_rate_increase``: absolute
    increase of the pooled error rate. ``max_crash_rate_ratio`` and
    ``max_crash_rate_increase``: the allowed crash rate per inference is the baseline's times
    the ratio plus the increase (crashes normalised for exposure). ``drift_metric``: ``js``
    (Jensen-Shannon distance, base 2) or ``psi``.
    ``max_drift``: vs the baseline; ``max_reference_drift``: vs the release's reference
    (looser: a golden run is a small sample). ``device_weight_cap``: inferences of
    one device counted in pooled rates. ``paired_lookback_s``: how far before the stage's start
    a new device's own telemetry of the baseline version is read for the paired latency test.
    """

    enabled: int = 1
    min_devices: int = 5
    min_inferences: int = 1000
    min_device_inferences: int = 20
    min_device_values: int = 100
    confidence: float = 0.98
    pass_confidence: float = 0.9
    max_p95_ratio: float = 1.2
    max_error_rate_increase: float = 0.01
    max_crash_rate_ratio: float = 2.0
    max_crash_rate_increase: float = 0.0005
    drift_metric: str = "js"
    max_drift: float = 0.1
    max_reference_drift: float = 0.3
    device_weight_cap: int = 10_000
    paired_lookback_s: int = 3600

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise InputError(f"gates.health: {what}")

        need(self.enabled in (0, 1), "enabled must be 0 or 1")
        for name in (
            "min_devices",
            "min_inferences",
            "min_device_inferences",
            "min_device_values",
            "device_weight_cap",
            "paired_lookback_s",
        ):
            v = getattr(self, name)
            need(
                isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 10**9,
                f"{name} must be an integer in [1, 1e9]",
            )
        for name, lo, hi in (
            ("confidence", 0.5, 0.9999),
            ("pass_confidence", 0.0, 0.9999),
            ("max_p95_ratio", 1.0, 100.0),
            ("max_error_rate_increase", 0.0, 1.0),
            ("max_crash_rate_ratio", 1.0, 1000.0),
            ("max_crash_rate_increase", 0.0, 1.0),
            ("max_drift", 0.0, 10.0),
            ("max_reference_drift", 0.0, 10.0),
        ):
            v = getattr(self, name)
            need(
                isinstance(v, int | float)
                and not isinstance(v, bool)
                and math.isfinite(v)
                and lo <= v <= hi,
                f"{name} must be within [{lo}, {hi}]",
            )
        need(self.drift_metric in DRIFT_METRICS, "drift_metric must be js or psi")

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any] | None) -> HealthThresholds:
        """From a plan's ``[gates.health]`` table. Raises InputError on an unknown key or a
        value out of range."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        ints = {f.name for f in fields(cls) if f.type in ("int", int)}
        for k in ints & set(d):  # a plan's table holds floats: 5.0 is 5, 5.5 is refused
            v = d[k]
            if isinstance(v, float) and v.is_integer():
                d[k] = int(v)
        extra = sorted(set(d) - known)
        if extra:
            raise InputError(f"gates.health: unknown keys {extra[:8]}; known: {sorted(known)}")
        return cls(**d)

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def reference_of(telemetry: Mapping[str, Any] | None) -> tuple[OutputSummary, ...]:
    """The ``reference`` argument of :func:`evaluate_health` from a release's signed
    ``telemetry`` fact (``Release.telemetry``; ``()`` for a release without one).

    Raises:
        TelemetryError: a malformed reference (fail closed: the release is not judged
            against a reference it does not validly carry).
    """
    from ota.client._telemetry_format import validate_reference

    return validate_reference(telemetry) if telemetry else ()


def p95(counts: Sequence[int]) -> float:
    """The 95th percentile of a latency histogram over :data:`LATENCY_EDGES` (seconds).

    The buckets are a factor 1.78 wide, so reading the quantile inside one bucket by
    interpolation hides a 30 % shift. Instead the empirical CDF at the bucket edges is put on a
    probit scale (``norm.ppf``) against log latency, where a log-normal tail is a straight line,
    and a least-squares line through the edges with CDF in (1 %, 99 %) gives the quantile
    (grouped-data probit fit); the result is kept within the bucket that holds the 95th
    percentile. With fewer than two such edges (all mass in one or two buckets), the quantile
    is interpolated geometrically within its bucket. One histogram: :func:`p95s`."""
    return float(p95s([counts])[0])


_RATIO = LATENCY_EDGES[1] / LATENCY_EDGES[0]
_BOUNDS = np.array([LATENCY_EDGES[0] / _RATIO, *LATENCY_EDGES, LATENCY_EDGES[-1] * _RATIO])
_LOG_EDGES = np.log(np.asarray(LATENCY_EDGES, dtype=np.float64))
_Z95: list[float] = []  # norm.ppf(0.95), computed once (scipy is imported lazily)


def p95s(hists: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
    """:func:`p95` of each row of ``hists`` (histograms over :data:`LATENCY_EDGES`), in one
    pass over arrays: one ``ndtri`` call for every CDF point of every row, and the
    least-squares line of each row in closed form (centred sums) instead of ``np.polyfit``
    per row. Equal to the per-histogram computation it replaced to a few ulps (tested on
    random histograms: ``test_p95s_equals_the_per_device_computation``). Raises ValueError
    on an empty histogram or a row of the wrong width."""
    from scipy.special import ndtri  # type: ignore[import-untyped]  # = norm.ppf (scipy)

    c = np.asarray(hists, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != len(LATENCY_EDGES) + 1:
        raise ValueError(f"latency histograms must have {len(LATENCY_EDGES) + 1} buckets")
    if c.shape[0] == 0:
        return np.empty(0, dtype=np.float64)
    total = c.sum(axis=1)
    if not np.all(total > 0):
        raise ValueError("an empty histogram has no p95")
    if not _Z95:
        _Z95.append(float(ndtri(0.95)))
    rows = np.arange(c.shape[0])
    cum = np.cumsum(c, axis=1)
    target = 0.95 * total
    i = np.sum(cum < target[:, None], axis=1)  # searchsorted (left): the 95th's bucket
    lo, hi = _BOUNDS[i], _BOUNDS[i + 1]
    before = np.where(i > 0, cum[rows, np.maximum(i - 1, 0)], 0.0)
    out: np.ndarray = lo * (hi / lo) ** ((target - before) / c[rows, i])  # interpolated
    f = cum[:, :-1] / total[:, None]  # CDF at LATENCY_EDGES
    use = (f > 0.01) & (f < 0.99)
    fit = np.where(use, f, np.inf).min(axis=1) < np.where(use, f, -np.inf).max(axis=1)
    if not np.any(fit):
        return out
    u = use[fit]
    z = np.zeros(u.shape)
    z[u] = ndtri(f[fit][u])
    x = np.where(u, _LOG_EDGES, 0.0)
    m = u.sum(axis=1)
    zm, xm = z.sum(axis=1) / m, x.sum(axis=1) / m
    dz = np.where(u, z - zm[:, None], 0.0)
    dx = np.where(u, x - xm[:, None], 0.0)
    slope = (dz * dx).sum(axis=1) / (dz * dz).sum(axis=1)
    fitted = np.exp(xm + slope * (_Z95[0] - zm))  # the line at z95, from its centre
    out[fit] = np.minimum(np.maximum(fitted, lo[fit]), hi[fit])
    return out


def _p95_of(ds: Sequence[DeviceTelemetry]) -> np.ndarray:
    """Each device's p95 (:func:`p95s`), in one pass."""
    return p95s([d.latency for d in ds]) if ds else np.empty(0, dtype=np.float64)


# -- the gates ------------------------------------------------------------------------------------


def evaluate_health(
    session: Any,
    ctx: HealthContext,
    thresholds: HealthThresholds | Mapping[str, Any] | None = None,
    *,
    reference: Sequence[OutputSummary] | None = None,
    reference_source: str = "",
) -> list[GateResult]:
    """Every health gate for the stage ``ctx`` describes, per tier of the new cohort and over
    the whole stage (tier ``""``). ``reference``: the release's reference outputs
    (``validate_reference(release.telemetry)``), for ``health.drift_reference``;
    ``reference_source`` names it in that gate's evidence (the controller passes the release
    and the sha256 of its signed fact).

    Without a baseline version (a first release) the comparing gates hold ("no baseline"):
    only the reference drift can pass. Raises InputError on bad thresholds."""
    th = (
        thresholds
        if isinstance(thresholds, HealthThresholds)
        else (HealthThresholds.from_mapping(thresholds))
    )
    since, until = float(ctx.stage_started_at), float(ctx.now)
    new = per_device(session, ctx.model, ctx.version, ctx.ring, since, until)
    base: dict[int, DeviceTelemetry] = {}
    if ctx.baseline_version and ctx.baseline_version != ctx.version:
        # a stage that takes its whole ring leaves no device of the ring on the baseline
        # (the concurrent cohort empties as devices update, and the stage would hold until
        # its deadline paused a good release): its baseline is then the ring's own telemetry
        # of the baseline version over the window, whatever the devices run now
        whole_ring = float(getattr(ctx, "percent", None) or 0.0) >= 100.0
        base = per_device(
            session,
            ctx.model,
            ctx.baseline_version,
            ctx.ring,
            since,
            until,
            on_version=None if whole_ring else ctx.baseline_version,
        )
    before: dict[int, DeviceTelemetry] = {}
    if new and ctx.baseline_version and ctx.baseline_version != ctx.version:
        # the new devices' own telemetry of the baseline version (sent before they updated,
        # up to ``paired_lookback_s`` before the stage): the paired latency test
        own = per_device(
            session,
            ctx.model,
            str(ctx.baseline_version),
            ctx.ring,
            since - th.paired_lookback_s,
            until,
        )
        before = {pk: own[pk] for pk in new.keys() & own.keys()}
    tiers = sorted({d.tier for d in new.values()})
    percent = getattr(ctx, "percent", None)
    judged: dict[str, list[GateResult]] = {}
    for tier in ["", *tiers]:
        n = [d for d in new.values() if not tier or d.tier == tier]
        b = [d for d in base.values() if not tier or d.tier == tier]
        judged[tier] = _tier_gates(
            n, b, tier, th, reference, bool(ctx.baseline_version), reference_source, before
        )
    # only a tier's HOLD can be deferred: the population is read when some tier holds
    holding = [t for t in tiers if any(g.status is GateStatus.HOLD for g in judged[t])]
    population: dict[str, tuple[int, int]] = {}
    if percent is not None and holding:
        from ._gates import tier_population

        population = tier_population(session, ctx.model, ctx.version, ctx.ring, percent, holding)
    out: list[GateResult] = []
    for tier, got in judged.items():
        why = _too_small(tier, population.get(tier), float(percent or 0.0), th)
        out += [_deferred(g, why, population[tier][0]) for g in got] if why else got
    return out


def _too_small(
    tier: str, population: tuple[int, int] | None, percent: float, th: HealthThresholds
) -> str:
    """Why ``tier`` cannot be judged in this stage, or ``""``: the stage admits fewer of its
    devices than ``min_devices`` (its new cohort can never reach the sample), or, below 100 %,
    leaves fewer than ``min_devices`` of them outside (its concurrent baseline can never
    reach it). Counted from enrolment and the bucket rule, never from reports."""
    if not tier or population is None:
        return ""
    admitted, enrolled = population
    last = percent >= 100.0
    where = "judged by the whole-stage gate only" if last else "judged in the next stage"
    if admitted < th.min_devices:
        return (
            f"tier {tier}: {admitted} device(s) in this stage < min_devices {th.min_devices}: "
            f"{where}"
        )
    if not last and enrolled - admitted < th.min_devices:
        return (
            f"tier {tier}: {enrolled - admitted} device(s) outside this stage (its concurrent "
            f"baseline) < min_devices {th.min_devices}: {where}"
        )
    return ""


def _deferred(g: GateResult, why: str, admitted: int) -> GateResult:
    """A tier gate's HOLD when the tier cannot reach its sample in this stage
    (:func:`_too_small`: the percentage bucket drew too few of it, or left too few outside):
    it does not hold the stage; the tier is judged in the next stage, or, at 100 % of the
    ring, by the whole-stage gate only (which still needs its own sample: silence never
    promotes). A failure or a pass is kept as it is; devices that are admitted but silent are
    not this case (the tier then has enough admitted devices, and holds)."""
    if g.status is not GateStatus.HOLD:
        return g
    return g.deferred(why, admitted_devices=admitted)


def _tier_gates(
    new: list[DeviceTelemetry],
    base: list[DeviceTelemetry],
    tier: str,
    th: HealthThresholds,
    reference: Sequence[OutputSummary] | None,
    has_baseline: bool,
    reference_source: str = "",
    before: Mapping[int, DeviceTelemetry] | None = None,
) -> list[GateResult]:
    out = []
    for gate, fn in (
        ("health.latency_p95", _latency),
        ("health.error_rate", _errors),
        ("health.crash_rate", _crashes),
    ):
        if not has_baseline:
            out.append(
                GateResult(gate, GateStatus.HOLD, "no baseline release to compare with", tier=tier)
            )
            continue
        if fn is _latency:
            out.append(_latency(new, base, tier, th, before))
        else:
            out.append(fn(new, base, tier, th))
    if has_baseline:
        out += _drift(new, base, tier, th)
    if reference:
        judged = (_drift_reference(new, r, tier, th, reference_source) for r in reference)
        out += [g for g in judged if g is not None]
    return out


def _sample(
    gate: str,
    tier: str,
    th: HealthThresholds,
    new: Sequence[Any],
    base: Sequence[Any] | None,
    n_inf: int,
    b_inf: int,
    what: str = "inferences",
) -> GateResult | None:
    """HOLD when a cohort is too small, else None."""
    lacks = []
    if len(new) < th.min_devices:
        lacks.append(f"{len(new)} new devices with enough {what}, need {th.min_devices}")
    if base is not None and len(base) < th.min_devices:
        lacks.append(f"{len(base)} baseline devices with enough {what}, need {th.min_devices}")
    if n_inf < th.min_inferences:
        lacks.append(f"{n_inf} new {what}, need {th.min_inferences}")
    if base is not None and b_inf < th.min_inferences:
        lacks.append(f"{b_inf} baseline {what}, need {th.min_inferences}")
    if not lacks:
        return None
    return GateResult(
        gate,
        GateStatus.HOLD,
        "too little data: " + "; ".join(lacks),
        tier=tier,
        evidence={
            "new_devices": len(new),
            "baseline_devices": len(base) if base is not None else None,
            "new_count": n_inf,
            "baseline_count": b_inf,
        },
    )


def _decide(
    gate: str,
    tier: str,
    th: HealthThresholds,
    *,
    value: float,
    threshold: float,
    baseline: float | None,
    worse: bool,
    trimmed: float,
    p_fail: float,
    p_pass: float,
    bad: int,
    ok: int,
    evidence: dict[str, Any],
    what: str,
    sure_to_pass: bool = True,
) -> GateResult:
    """The common rule: FAIL = effect beyond the threshold + the test's confidence + at least
    ``min_devices`` devices beyond; PASS = ``trimmed`` (the effect without the ``min_devices -
    1`` most extreme new devices, for pooled figures; the effect itself for medians) within
    the threshold + at least ``min_devices`` devices within; else HOLD."""
    ev = {
        **evidence,
        "value_without_most_extreme": _fin(trimmed),
        "devices_beyond": bad,
        "devices_within": ok,
        "p_value_regression": _fin(p_fail),
        "p_value_within": _fin(p_pass),
    }
    conf_fail, conf_pass = _conf(p_fail), _conf(p_pass)
    if worse and conf_fail >= th.confidence and bad >= th.min_devices:
        return GateResult(
            gate,
            GateStatus.FAIL,
            f"{what} {value:.4g} beyond {threshold:.4g} on {bad} devices "
            f"(confidence {conf_fail:.3f})",
            _fin(value),
            _fin(threshold),
            _fin(baseline),
            conf_fail,
            tier,
            ev,
        )
    sure = conf_pass >= th.pass_confidence or not sure_to_pass
    if not trimmed > threshold and ok >= th.min_devices and sure:
        aside = "" if not worse else f" without its {_trim(th, ok + bad)} most extreme devices"
        return GateResult(
            gate,
            GateStatus.PASS,
            f"{what} {trimmed if worse else value:.4g} within {threshold:.4g}{aside}",
            _fin(value),
            _fin(threshold),
            _fin(baseline),
            conf_pass,
            tier,
            ev,
        )
    if worse:
        why = (
            f"{what} {value:.4g} beyond {threshold:.4g} but not yet sure (confidence "
            f"{conf_fail:.3f} < {th.confidence}, {bad} devices beyond, need "
            f"{th.min_devices})"
        )
    elif ok < th.min_devices:
        why = f"{what} within threshold on {ok} devices, need {th.min_devices} to agree"
    else:
        why = (
            f"{what} {trimmed:.4g} within {threshold:.4g} but not yet sure (confidence "
            f"{conf_pass:.3f} < {th.pass_confidence})"
        )
    return GateResult(
        gate,
        GateStatus.HOLD,
        why,
        _fin(value),
        _fin(threshold),
        _fin(baseline),
        conf_fail,
        tier,
        ev,
    )


def _fin(x: float | None) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return float(x)


def _trim(th: HealthThresholds, n: int) -> int:
    """How many of the most extreme new devices a pass sets aside: ``min_devices - 1`` (so
    that fewer than ``min_devices`` devices cannot hold a healthy release), as long as
    ``min_devices`` remain."""
    return max(0, min(th.min_devices - 1, n - th.min_devices))


def _conf(p: float) -> float:
    return 0.0 if not math.isfinite(p) else float(min(1.0, max(0.0, 1.0 - p)))


def _latency(
    new: list[DeviceTelemetry],
    base: list[DeviceTelemetry],
    tier: str,
    th: HealthThresholds,
    before: Mapping[int, DeviceTelemetry] | None = None,
) -> GateResult:
    """Paired when at least ``min_devices`` new devices also reported the baseline version
    (``before``: their own telemetry of it, before they updated), else unpaired against the
    concurrent baseline (:func:`_latency_unpaired`)."""
    n = [d for d in new if d.inferences >= th.min_device_inferences]
    pairs = [
        (d, before[d.device_pk])
        for d in n
        if before is not None
        and d.device_pk in before
        and before[d.device_pk].inferences >= th.min_device_inferences
    ]
    if len(pairs) >= th.min_devices:
        paired = _latency_paired(pairs, n, tier, th)
        if paired is not None:
            return paired
    return _latency_unpaired(new, base, tier, th)


def _latency_paired(
    pairs: list[tuple[DeviceTelemetry, DeviceTelemetry]],
    n: list[DeviceTelemetry],
    tier: str,
    th: HealthThresholds,
) -> GateResult | None:
    """Each device against itself: ``r = log(p95 on the new release / p95 on the baseline
    release)``. Device-to-device spread (hardware unit, thermal state, the application's input
    mix) cancels; what remains is each p95's sampling error. Value: the median device's ratio
    ``exp(median r)``. Fail: one-sided one-sample t-test that the ``r`` exceed 0 (a
    regression), without the ``_trim`` highest ``r`` (so a few extreme slow reports cannot
    make it sure). Pass: without the ``_trim`` lowest ``r`` (so a few extreme fast reports
    can neither pull the median in nor count), the median ratio within ``max_p95_ratio``
    and a one-sided Wilcoxon signed-rank test that those ``r`` lie below
    ``log(max_p95_ratio)`` (ranks: one honest outlier costs one rank, not the test). So fewer than
    ``min_devices`` devices, whatever they report, can neither fail nor pass the gate; they
    can hold it (a delay: a stage holding past its deadline pauses). ``None`` when too few
    inferences (the unpaired gate then says so)."""
    from scipy.stats import ttest_1samp, wilcoxon  # type: ignore[import-untyped]

    gate = "health.latency_p95"
    n_inf = sum(d.inferences for d, _ in pairs)
    b_inf = sum(b.inferences for _, b in pairs)
    if n_inf < th.min_inferences or b_inf < th.min_inferences:
        return None
    r = np.log(_p95_of([d for d, _ in pairs]) / _p95_of([b for _, b in pairs]))
    limit = math.log(th.max_p95_ratio)
    ratio = math.exp(float(np.median(r)))
    bad = int(np.sum(r > limit))
    ok = len(r) - bad
    k = _trim(th, len(r))
    ordered = np.sort(r)
    low, high = ordered[: len(r) - k], ordered[k:]  # without the highest / the lowest k
    if np.all(low == low[0]):
        p_fail = 0.0 if low[0] > 0 else 1.0
    else:
        p_fail = float(ttest_1samp(low, 0.0, alternative="greater").pvalue)
    d = high - limit
    if np.all(d == d[0]):
        p_pass = 0.0 if d[0] < 0 else 1.0
    else:
        p_pass = float(wilcoxon(d, alternative="less").pvalue)
    return _decide(
        gate,
        tier,
        th,
        value=ratio,
        threshold=th.max_p95_ratio,
        baseline=1.0,
        worse=ratio > th.max_p95_ratio,
        trimmed=math.exp(float(np.median(high))),
        p_fail=p_fail,
        p_pass=p_pass,
        bad=bad,
        ok=ok,
        evidence={
            "paired_devices": len(pairs),
            "set_aside": k,
            "new_devices": len(n),
            "new_count": n_inf,
            "before_count": b_inf,
            "median_log_ratio": float(np.median(r)),
            "log_ratio_sd": float(np.std(r, ddof=1)) if len(r) > 1 else 0.0,
            "test": "paired: t-test (regression), wilcoxon signed-rank (within) on log p95 ratios",
        },
        what="p95 ratio (paired, each device vs its own before)",
    )


def _latency_unpaired(
    new: list[DeviceTelemetry], base: list[DeviceTelemetry], tier: str, th: HealthThresholds
) -> GateResult:
    from scipy.stats import mannwhitneyu

    gate = "health.latency_p95"
    n = [d for d in new if d.inferences >= th.min_device_inferences]
    b = [d for d in base if d.inferences >= th.min_device_inferences]
    hold = _sample(gate, tier, th, n, b, sum(d.inferences for d in n), sum(d.inferences for d in b))
    if hold:
        return hold
    pn = _p95_of(n)
    pb = _p95_of(b)
    unit = "_s"
    if not tier:  # the whole stage: each device's p95 relative to its tier's baseline median
        pn, pb, unit = *_tier_relative(n, pn, b, pb), "_rel"
        if len(pn) < th.min_devices:
            why = f"too little data: {len(pn)} new devices of tiers with a baseline"
            return GateResult(gate, GateStatus.HOLD, f"{why}, need {th.min_devices}", tier=tier)
    mb = float(np.median(pb))
    ratio = float(np.median(pn)) / mb
    limit = th.max_p95_ratio * mb
    p_fail = float(mannwhitneyu(pn, pb, alternative="greater").pvalue)
    p_pass = float(mannwhitneyu(pn, pb * th.max_p95_ratio, alternative="less").pvalue)
    return _decide(
        gate,
        tier,
        th,
        value=ratio,
        threshold=th.max_p95_ratio,
        baseline=1.0,
        worse=ratio > th.max_p95_ratio,
        trimmed=ratio,  # a median needs no trimming: k devices move it by at most k ranks
        p_fail=p_fail,
        p_pass=p_pass,
        bad=int(np.sum(pn > limit)),
        ok=int(np.sum(pn <= limit)),
        evidence={
            f"new_median_p95{unit}": float(np.median(pn)),
            f"baseline_median_p95{unit}": mb,
            "new_devices": len(n),
            "baseline_devices": len(b),
            "paired_devices": 0,
            "test": "mann-whitney-u",
        },
        what="p95 ratio",
    )


def _tier_relative(
    n: list[DeviceTelemetry], pn: np.ndarray, b: list[DeviceTelemetry], pb: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The per-device p95s of both cohorts, each divided by the median p95 of its own tier's
    baseline devices. Tiers are different hardware and differ in speed: pooled raw p95s
    compare the cohorts' tier mixes (which the percentage buckets draw by chance) rather
    than the releases, and the fleet simulation saw a good release's stage judged 1.6x slower
    because its new cohort held more devices of the slow tier. New devices of a tier without
    baseline devices are left out (that tier's own gate holds)."""
    med = {
        t: max(float(np.median(pb[[d.tier == t for d in b]])), 1e-9) for t in {d.tier for d in b}
    }
    keep = [i for i, d in enumerate(n) if d.tier in med]
    rel_n = np.array([pn[i] / med[n[i].tier] for i in keep], dtype=np.float64)
    rel_b = np.array([p / med[d.tier] for d, p in zip(b, pb, strict=True)], dtype=np.float64)
    return rel_n, rel_b


def _rate_gate(
    gate: str,
    new: list[DeviceTelemetry],
    base: list[DeviceTelemetry],
    tier: str,
    th: HealthThresholds,
    hits: Callable[[DeviceTelemetry], int],
    trials: Callable[[DeviceTelemetry], int],
    qualifies: Callable[[DeviceTelemetry], bool],
    delta: float,
    what: str,
    volume: Callable[[DeviceTelemetry], int] | None = None,
    sure_to_pass: bool = True,
) -> GateResult:
    from scipy.stats import binomtest, fisher_exact

    n = [d for d in new if qualifies(d)]
    b = [d for d in base if qualifies(d)]
    vol = volume or trials
    hold = _sample(gate, tier, th, n, b, sum(vol(d) for d in n), sum(vol(d) for d in b))
    if hold:
        return hold

    def pooled(ds: list[DeviceTelemetry]) -> tuple[int, int]:
        hit = tot = 0
        for d in ds:
            t = trials(d)
            w = min(t, th.device_weight_cap)
            hit += round(hits(d) * w / t) if t else 0
            tot += w
        return hit, tot

    hn, tn = pooled(n)
    hb, tb = pooled(b)
    rn, rb = hn / tn, hb / tb
    allowed = rb + delta

    def rate(d: DeviceTelemetry) -> float:
        return hits(d) / trials(d) if trials(d) else 0.0

    kept = sorted(n, key=rate)
    p_fail = float(fisher_exact([[hn, tn - hn], [hb, tb - hb]], alternative="greater").pvalue)
    ht, tt = pooled(kept[: len(kept) - _trim(th, len(kept))])
    p_pass = float(binomtest(ht, tt, allowed, alternative="less").pvalue) if allowed < 1 else 0.0
    rates = [rate(d) for d in n]
    return _decide(
        gate,
        tier,
        th,
        value=rn,
        threshold=allowed,
        baseline=rb,
        worse=rn > allowed,
        trimmed=ht / tt,
        p_fail=p_fail,
        p_pass=p_pass,
        bad=sum(r > allowed for r in rates),
        ok=sum(r <= allowed for r in rates),
        evidence={
            "new_devices": len(n),
            "baseline_devices": len(b),
            "new_hits": hn,
            "new_trials": tn,
            "baseline_hits": hb,
            "baseline_trials": tb,
            "max_increase": delta,
            "test": "fisher-exact",
        },
        what=what,
        sure_to_pass=sure_to_pass,
    )


def _errors(
    new: list[DeviceTelemetry], base: list[DeviceTelemetry], tier: str, th: HealthThresholds
) -> GateResult:
    return _rate_gate(
        "health.error_rate",
        new,
        base,
        tier,
        th,
        lambda d: d.errors,
        lambda d: d.inferences,
        lambda d: d.inferences >= th.min_device_inferences,
        th.max_error_rate_increase,
        "error rate",
    )


def _crashes(
    new: list[DeviceTelemetry], base: list[DeviceTelemetry], tier: str, th: HealthThresholds
) -> GateResult:
    """Crashes per unit of exposure (inferences + crashes: a crash ends a run that counts too),
    so a cohort that ran longer or more is not judged worse for it. The crashed-device fraction
    used before grew with the window and the inference count: at 2 % crashes per interval on
    both releases, a new cohort with three times the exposure failed or held it.

    Value: the pooled rate of the new cohort (each device's exposure capped at
    ``device_weight_cap``); allowed: ``max_crash_rate_ratio`` x the baseline's pooled rate +
    ``max_crash_rate_increase``. A device is beyond when its own rate exceeds the allowed rate.
    Fail: the rate beyond the allowed one, ``min_devices`` devices beyond, and an exact
    conditional (binomial) comparison of two Poisson rates, new > baseline, at ``confidence``,
    computed without the ``min_devices - 1`` new devices of highest rate. Pass: without the
    ``min_devices - 1`` of highest rate, the pooled rate within the allowed one, and
    ``min_devices`` devices within (no confidence asked: "rarer than one crash in 2,000
    inferences" cannot be shown on a small canary's exposure). So fewer than ``min_devices``
    forged devices can neither fail nor pass it, nor hold it once the cohort has
    ``2 min_devices - 1`` devices. A device that crashed counts even with few inferences."""
    from scipy.stats import binomtest, poisson

    gate = "health.crash_rate"

    def qualifies(d: DeviceTelemetry) -> bool:
        return d.crashes > 0 or d.inferences >= th.min_device_inferences

    n = [d for d in new if qualifies(d)]
    b = [d for d in base if qualifies(d)]
    vol = [sum(d.inferences + d.crashes for d in ds) for ds in (n, b)]
    hold = _sample(gate, tier, th, n, b, vol[0], vol[1])
    if hold:
        return hold

    def exposure(d: DeviceTelemetry) -> int:
        return max(1, d.inferences + d.crashes)

    def rate(d: DeviceTelemetry) -> float:
        return d.crashes / exposure(d)

    def pooled(ds: Sequence[DeviceTelemetry]) -> tuple[int, int]:
        hit = tot = 0
        for d in ds:
            e = exposure(d)
            w = min(e, th.device_weight_cap)
            hit += round(d.crashes * w / e)
            tot += w
        return hit, tot

    cn, en = pooled(n)
    cb, eb = pooled(b)
    rn, rb = cn / en, cb / eb
    allowed = min(1.0, rb * th.max_crash_rate_ratio + th.max_crash_rate_increase)
    kept = sorted(n, key=rate)
    k = _trim(th, len(kept))
    ck, ek = pooled(kept[: len(kept) - k])  # without the k highest rates
    # exact comparison of two Poisson rates: given ck + cb crashes, the new cohort's share
    # is binomial with p = ek / (ek + eb) when the rates are equal
    p_fail = (
        float(binomtest(ck, ck + cb, ek / (ek + eb), alternative="greater").pvalue)
        if ck + cb
        else 1.0
    )
    # how sure "within the allowed rate" is (reported; a pass does not wait for it)
    p_pass = float(poisson.cdf(ck, allowed * ek)) if allowed > 0 else 1.0
    rates = [rate(d) for d in n]
    return _decide(
        gate,
        tier,
        th,
        value=rn,
        threshold=allowed,
        baseline=rb,
        worse=rn > allowed,
        trimmed=ck / ek,
        p_fail=p_fail,
        p_pass=p_pass,
        bad=sum(r > allowed for r in rates),
        ok=sum(r <= allowed for r in rates),
        evidence={
            "new_devices": len(n),
            "baseline_devices": len(b),
            "new_crashes": cn,
            "new_exposure": en,
            "baseline_crashes": cb,
            "baseline_exposure": eb,
            "set_aside": k,
            "max_ratio": th.max_crash_rate_ratio,
            "max_increase": th.max_crash_rate_increase,
            "unit": "crashes per inference (inferences + crashes)",
            "test": "exact conditional binomial (two Poisson rates), without the highest",
        },
        what="crash rate per inference",
        sure_to_pass=False,
    )


# -- drift ----------------------------------------------------------------------------------------


def _distance(th: HealthThresholds) -> Callable[[OutputSummary, OutputSummary], float]:
    from ota.repository._drift import jensen_shannon, psi

    return jensen_shannon if th.drift_metric == "js" else psi


def _norm(spec: OutputSpec, bins: Mapping[int, int]) -> dict[int, float]:
    tot = sum(bins.values())
    return {k: v / tot for k, v in bins.items()} if tot else {}


def _dense(groups: Sequence[Sequence[Mapping[int, float]]]) -> tuple[list[int], Any, Any]:
    """The distributions of two groups as rows over one list of bin keys."""
    keys = sorted({k for g in groups for p in g for k in p})
    idx = {k: i for i, k in enumerate(keys)}
    mats = []
    for g in groups:
        m = np.zeros((len(g), len(keys)))
        for r, p in enumerate(g):
            for k, v in p.items():
                m[r, idx[k]] = v
        mats.append(m)
    return keys, mats[0], mats[1]


def _summ(spec: OutputSpec, keys: Sequence[int], row: Any) -> OutputSummary:
    """A (sum of) distribution row(s) as integer pseudo-counts, each device weighing
    ``MIX_WEIGHT``: an equal-weight mixture."""
    return summary_from_bins(
        spec, {k: round(float(v) * MIX_WEIGHT) for k, v in zip(keys, row, strict=True)}
    )


def _aligned_rows(spec: OutputSpec, keys: Sequence[int], rows: Any) -> np.ndarray:
    """Histogram rows of mixture values over ``keys`` as the count vectors
    :func:`ota.repository._drift.aligned` makes of their :func:`_summ` summaries: the
    pseudo-counts rounded as ``round`` does (half to even), bins ``0..bins-1`` then under,
    over and NaN; keys outside those are dropped as ``summary_from_bins`` drops them."""
    from ota.fleet._telemetry import NAN, OVER, UNDER

    m = np.atleast_2d(np.asarray(rows, dtype=np.float64))
    counts = np.rint(m * MIX_WEIGHT)
    where = {k: i for i, k in enumerate(keys)}
    out = np.zeros((m.shape[0], spec.bins + 3))
    for j, k in enumerate([*range(spec.bins), UNDER, OVER, NAN]):
        if k in where:
            out[:, j] = counts[:, where[k]]
    return out


def _row_distances(th: HealthThresholds, a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """``dist(a[i], b[i])`` (:func:`_distance`) for aligned count rows, in one pass: the
    same arithmetic as :func:`ota.repository._drift.jensen_shannon` / ``psi`` row by row
    (scipy's ``jensenshannon`` along ``axis=1``). ``None`` when a row is empty (the
    per-pair function then raises its ``DriftError``)."""
    from ota.repository._drift import EPS

    a, b = np.broadcast_arrays(a, b)
    sa, sb = a.sum(axis=1, keepdims=True), b.sum(axis=1, keepdims=True)
    if not (np.all(sa > 0) and np.all(sb > 0)):
        return None
    if th.drift_metric == "js":
        from scipy.spatial.distance import jensenshannon  # type: ignore[import-untyped]

        d = np.asarray(jensenshannon(a / sa, b / sb, base=2, axis=1), dtype=np.float64)
        return np.where(np.isnan(d), 0.0, d)
    pe, pa = a / sa + EPS, b / sb + EPS
    e, x = pe / pe.sum(axis=1, keepdims=True), pa / pa.sum(axis=1, keepdims=True)
    out: np.ndarray = np.sum((x - e) * np.log(x / e), axis=1)
    return out


def _distances(
    th: HealthThresholds,
    spec: OutputSpec,
    keys: Sequence[int],
    left: Any,
    right: Any,
    ref: OutputSummary | None = None,
) -> np.ndarray:
    """``[dist(L_i, _summ(right[i]))]`` where ``L_i`` is ``ref`` when given, else
    ``_summ(left[i])`` (``left`` may be one row for all): histogram outputs in one pass over
    arrays (:func:`_row_distances`), class outputs (whose categories are each pair's union)
    pair by pair."""
    rows = np.atleast_2d(np.asarray(right, dtype=np.float64))
    if spec.kind != "classes":
        b = _aligned_rows(spec, keys, rows)
        if ref is not None:
            a = np.array([[*ref.counts, ref.under, ref.over, ref.nan]], dtype=np.float64)
        else:
            a = _aligned_rows(spec, keys, left)
        got = _row_distances(th, a, b)
        if got is not None:
            return got
    dist = _distance(th)
    lefts = (
        [ref] * len(rows)
        if ref is not None
        else [_summ(spec, keys, r) for r in np.broadcast_to(left, rows.shape)]
    )
    return np.array(
        [dist(x, _summ(spec, keys, r)) for x, r in zip(lefts, rows, strict=True)],
        dtype=np.float64,
    )


def _by_output(
    ds: Sequence[DeviceTelemetry], th: HealthThresholds
) -> dict[tuple[str, str], list[dict[int, float]]]:
    out: dict[tuple[str, str], list[dict[int, float]]] = {}
    for d in ds:
        for key, bins in d.outputs.items():
            if sum(bins.values()) >= th.min_device_values:
                out.setdefault(key, []).append(_norm(spec_of(key[1], key[0]), bins))
    return out


def _drift(
    new: list[DeviceTelemetry], base: list[DeviceTelemetry], tier: str, th: HealthThresholds
) -> list[GateResult]:
    """Per output whose bins both cohorts share; outputs with different bins are not
    comparable (the reference gate judges them)."""
    from scipy.stats import mannwhitneyu

    gate = "health.drift"
    dist = _distance(th)
    nb, bb = _by_output(new, th), _by_output(base, th)
    results = []
    for key in sorted(set(nb) & set(bb)):
        spec = spec_of(key[1], key[0])
        n, b = nb[key], bb[key]
        hold = _sample(gate, tier, th, n, b, th.min_inferences, th.min_inferences, "output values")
        if hold is not None:
            results.append(_named(hold, key[0]))
            continue
        keys, vn, vb = _dense([n, b])
        sb = vb.sum(axis=0)
        mix_b = _summ(spec, keys, sb)
        value = dist(mix_b, _summ(spec, keys, vn.sum(axis=0)))
        dn = _distances(th, spec, keys, sb, vn)
        db = _distances(th, spec, keys, sb - vb, vb)
        noise = float(np.median(db))
        limit = noise + th.max_drift
        p_fail = float(mannwhitneyu(dn, db, alternative="greater").pvalue)
        calm = np.sort(dn)[: len(dn) - _trim(th, len(dn))]
        p_pass = float(mannwhitneyu(calm, db + th.max_drift, alternative="less").pvalue)
        results.append(
            _decide(
                gate,
                tier,
                th,
                value=value,
                threshold=th.max_drift,
                baseline=noise,
                worse=value > th.max_drift,
                trimmed=dist(mix_b, _summ(spec, keys, _kept(vn, dn, th).sum(axis=0))),
                p_fail=p_fail,
                p_pass=p_pass,
                bad=int(np.sum(dn > limit)),
                ok=int(np.sum(dn <= limit)),
                evidence={
                    "output": key[0],
                    "metric": th.drift_metric,
                    "new_devices": len(n),
                    "baseline_devices": len(b),
                    "device_noise": noise,
                    "test": "mann-whitney-u",
                },
                what=f"output {key[0]!r} drift",
            )
        )
    return results


def _kept(rows: Any, score: Any, th: HealthThresholds) -> Any:
    """``rows`` without the ``_trim`` ones of highest ``score``."""
    order = np.argsort(score, kind="stable")
    return rows[order[: len(order) - _trim(th, len(order))]]


def _named(r: GateResult, output: str) -> GateResult:
    return GateResult(
        r.gate,
        r.status,
        f"output {output!r}: {r.reason}",
        r.value,
        r.threshold,
        r.baseline,
        r.confidence,
        r.tier,
        {**r.evidence, "output": output},
    )


def _drift_reference(
    new: list[DeviceTelemetry],
    ref: OutputSummary,
    tier: str,
    th: HealthThresholds,
    source: str = "",
) -> GateResult | None:
    """``None`` (not judged, as the baseline drift gate with unequal bins) when the
    application summarises this output over bins of its own: no new device reports it over
    the reference's bins and at least ``min_devices`` report it over others. So fewer than
    ``min_devices`` devices (forged or not) cannot take the gate away from the devices that
    use the reference's bins, and a stage with no telemetry yet still holds."""
    from scipy.stats import ttest_1samp

    gate = "health.drift_reference"
    key = (ref.spec.name, spec_key(ref.spec))
    other_bins = sum(1 for d in new if any(k[0] == ref.spec.name and k != key for k in d.outputs))
    if other_bins >= th.min_devices and not any(key in d.outputs for d in new):
        return None
    counted = [
        d.outputs[key] for d in new if sum(d.outputs.get(key, {}).values()) >= th.min_device_values
    ]
    ps = [_norm(ref.spec, bins) for bins in counted]
    sizes = {
        "reference": source or "given",
        "reference_values": ref.total(),
        "new_values": sum(sum(b.values()) for b in counted),
    }
    hold = _sample(gate, tier, th, ps, None, th.min_inferences, 0, "output values")
    if hold is not None:
        return _named(
            GateResult(
                gate,
                GateStatus.HOLD,
                hold.reason,
                tier=tier,
                evidence={
                    "metric": th.drift_metric,
                    "new_devices": len(ps),
                    "devices_with_other_bins": other_bins,
                    **sizes,
                },
            ),
            ref.spec.name,
        )
    dist = _distance(th)
    keys, vn, _ = _dense([ps, []])
    value = dist(ref, _summ(ref.spec, keys, vn.sum(axis=0)))
    d = _distances(th, ref.spec, keys, None, vn, ref=ref) - th.max_reference_drift
    if np.all(d == 0):
        p_fail = p_pass = 1.0
    else:
        p_fail = float(ttest_1samp(d, 0.0, alternative="greater").pvalue)
        calm = np.sort(d)[: len(d) - _trim(th, len(d))]
        p_pass = float(ttest_1samp(calm, 0.0, alternative="less").pvalue)
    return _decide(
        gate,
        tier,
        th,
        value=value,
        threshold=th.max_reference_drift,
        baseline=None,
        worse=value > th.max_reference_drift,
        trimmed=dist(ref, _summ(ref.spec, keys, _kept(vn, d, th).sum(axis=0))),
        p_fail=p_fail,
        p_pass=p_pass,
        bad=int(np.sum(d > 0)),
        ok=int(np.sum(d <= 0)),
        evidence={
            "output": ref.spec.name,
            "metric": th.drift_metric,
            "new_devices": len(ps),
            "devices_with_other_bins": other_bins,
            "test": "one-sample-t",
            **sizes,
        },
        what=f"output {ref.spec.name!r} drift from the reference",
    )


def health_gate(session: Any, ctx: HealthContext) -> list[GateResult]:
    """The controller's plug-in (``GATES``): :func:`evaluate_health` with the thresholds of
    ``ctx.health`` (the plan's ``[gates.health]``) and, when the context carries one,
    ``ctx.reference`` (the release's validated reference outputs, :func:`reference_of`).

    Raises:
        InputError: the plan's thresholds are out of range (the controller holds, naming it).
    """
    th = HealthThresholds.from_mapping(getattr(ctx, "health", None) or {})
    if not th.enabled:
        return []
    reference = getattr(ctx, "reference", None)
    source = str(getattr(ctx, "reference_source", "") or "")
    return evaluate_health(session, ctx, th, reference=reference, reference_source=source)


GATES = (health_gate,)
"""What ``ota.rollout._plugins.extra_gates`` loads: ``(session, ctx) -> list[GateResult]``."""
