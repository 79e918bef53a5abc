"""Output drift between two ``edge-ota.telemetry/1`` output summaries (issue 9), for the
rollout controller: Population Stability Index and Jensen-Shannon distance.

Both summaries must describe the same output with the same spec (a release's bins are fixed by
its reference; comparing a release with the previous one needs the same bins, else
:class:`DriftError`). Histograms are compared bin by bin with the under, over and NaN counts as
three more bins; class summaries over the union of their top classes plus "other".
Probabilities are smoothed with ``EPS`` so that an empty bin gives a finite PSI.
Needs scipy (the server extra).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from ota.client._telemetry_format import OutputSummary
from ota.errors import InputError

EPS = 1e-4


class DriftError(InputError):
    """The two summaries cannot be compared (different specs, or no values)."""


def aligned(a: OutputSummary, b: OutputSummary) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The two summaries as count vectors over the same categories."""
    if a.spec != b.spec:
        raise DriftError(f"output {a.spec.name!r}: different bins {a.spec} vs {b.spec}")
    if a.spec.kind == "classes":
        classes = sorted({c for c, _ in a.top} | {c for c, _ in b.top})
        da, db = dict(a.top), dict(b.top)
        va = [da.get(c, 0) for c in classes] + [a.other]
        vb = [db.get(c, 0) for c in classes] + [b.other]
    else:
        va = [*a.counts, a.under, a.over, a.nan]
        vb = [*b.counts, b.under, b.over, b.nan]
    pa, pb = np.asarray(va, dtype=np.float64), np.asarray(vb, dtype=np.float64)
    if pa.sum() <= 0 or pb.sum() <= 0:
        raise DriftError(f"output {a.spec.name!r}: no values to compare")
    return pa, pb


def _probs(v: NDArray[np.float64]) -> NDArray[np.float64]:
    p: NDArray[np.float64] = v / v.sum() + EPS
    out: NDArray[np.float64] = p / p.sum()
    return out


def psi(expected: OutputSummary, actual: OutputSummary) -> float:
    """Population Stability Index of ``actual`` against ``expected`` (>= 0; rules of thumb:
    < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 major shift)."""
    e, a = (_probs(v) for v in aligned(expected, actual))
    return float(np.sum((a - e) * np.log(a / e)))


def jensen_shannon(a: OutputSummary, b: OutputSummary) -> float:
    """Jensen-Shannon distance (base 2, so within [0, 1]; symmetric; 0 for equal
    distributions), by ``scipy.spatial.distance.jensenshannon``."""
    from scipy.spatial.distance import jensenshannon  # type: ignore[import-untyped]

    pa, pb = aligned(a, b)
    d = float(jensenshannon(pa / pa.sum(), pb / pb.sum(), base=2))
    return 0.0 if math.isnan(d) else d
