"""A release's reference output distribution (issue 9, ADR 0009), publisher side.

:func:`reference_for` turns the golden outputs of the publish run (``smoke/golden.npz`` and
any further reference sets), or an operator's ``--reference-data`` npz of recorded outputs,
into the ``telemetry`` field of the signed release facts: per model output (at most
``MAX_OUTPUTS``, in the golden file's order, which is the model's) the fixed bins devices
summarise into, and the reference counts in those bins.

Invariants: the bins are chosen once per release, here, from the reference data (float
outputs: ``BINS`` equal bins over the data's range widened by ``MARGIN`` of its span on each
side, or by 1.0 when the span is 0; integer outputs: class counts, top ``TOP_K``); the result
passes :func:`ota.client._telemetry.validate_reference` (so a device, and the fleet service,
accept it); the same data give the same bytes. Pure except for reading the npz files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ota.client._telemetry_format import (
    MAX_OUTPUTS,
    TELEMETRY_FORMAT,
    OutputCounter,
    OutputSpec,
    validate_reference,
)
from ota.errors import InputError

BINS = 32
MARGIN = 0.1

__all__ = ["BINS", "reference_from_outputs", "reference_for"]


def _spec(name: str, values: NDArray[Any]) -> OutputSpec | None:
    if values.dtype.kind in "iub":
        return OutputSpec(name, "classes")
    if values.dtype.kind != "f":
        return None
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    lo, hi = float(finite.min()), float(finite.max())
    pad = (hi - lo) * MARGIN if hi > lo else 1.0
    lo, hi = float(f"{lo - pad:.6g}"), float(f"{hi + pad:.6g}")
    if not lo < hi:  # rounding collapsed a tiny span
        hi = lo + max(abs(lo), 1.0) * 1e-5
    return OutputSpec(name, "hist", lo, hi, BINS)


def reference_from_outputs(sets: Sequence[Mapping[str, NDArray[Any]]]) -> dict[str, Any] | None:
    """The reference document for a model's outputs over one or more reference sets (each a
    mapping output name -> array, first axis the batch). None when no output can be summarised.

    Raises:
        InputError: the document would not validate (should not happen; fail closed).
    """
    if not sets:
        return None
    names = [n for n in sets[0] if all(n in s for s in sets)][:MAX_OUTPUTS]
    outputs = []
    for name in names:
        arrays = [np.asarray(s[name]) for s in sets]
        spec = _spec(name, np.concatenate([a.reshape(-1) for a in arrays]))
        if spec is None:
            continue
        agg = OutputCounter(spec)
        for a in arrays:
            rows = a if a.ndim >= 1 and a.shape[0] > 0 else a.reshape(1, *a.shape)
            for row in rows:  # one "inference" per batch row, as a device with batch 1 sees it
                agg.add(row)
        outputs.append(agg.summary().to_dict())
    if not outputs:
        return None
    doc = {"format": TELEMETRY_FORMAT, "outputs": outputs}
    try:
        validate_reference(doc)
    except InputError as e:
        raise InputError(f"cannot record the reference output distribution: {e}") from e
    return doc


def reference_for(
    golden_files: Sequence[Path], reference_data: Path | None
) -> dict[str, Any] | None:
    """The reference of a release: from ``reference_data`` (an npz of recorded outputs, output
    name -> array) when given, else from the golden outputs of the publish run.

    Raises:
        GoldenError: an npz file is missing, unreadable, or too large.
        InputError: ``reference_data`` gives nothing that can be summarised.
    """
    from ota.repository._golden import read_npz

    if reference_data is not None:
        doc = reference_from_outputs([read_npz(reference_data)])
        if doc is None:
            raise InputError(
                f"{reference_data.name} holds no numeric output to summarise",
                remedy="give an npz of model outputs, output name -> array",
            )
        return doc
    return reference_from_outputs([read_npz(p) for p in golden_files])
