"""Attacks on the smoke sandbox's derived memory limit (review of issue 13, ADR 0008).

A tier budget is signed, but it is a claim about a class of devices, not about this one: a
budget of a terabyte (or 1e300, a finite number the bundle parser accepts) made RLIMIT_AS as
large, so the sandbox no longer bounded a model that allocates without end, or the child could
not even be started (setrlimit overflowed inside ``preexec_fn``: an uncaught
SubprocessError). The memory a run may use is capped by the machine's physical memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from ota.bundle import SMOKE_GOLDEN_FILE, SMOKE_INPUTS_FILE, Budget, SmokeSpec
from ota.client import _smoke_child as child
from ota.client._smoke import SmokeFailed, SmokeLimits, memory_limit_mb, run_smoke
from ota.repository._golden import npz_bytes
from tests import bad_models
from tests.onnx_models import save

_MB = 1024 * 1024


def _machine_mb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / _MB


def test_a_huge_budget_is_capped_by_the_machine() -> None:
    limits = SmokeLimits(threads=2)
    reserve = limits.base_mem_mb + limits.mem_margin_mb + 2 * limits.thread_mem_mb
    slack = 200  # model_as_factor 3: twice the 100 MB model
    for budget in (1e6 * _machine_mb(), 1e300):
        mb, source = memory_limit_mb(100 * _MB, 0, 0, limits=limits, budget_mb=budget)
        assert source == "budget"
        assert mb <= reserve + slack + _machine_mb() + 1, budget


def test_a_sky_high_budget_still_stops_a_runaway_model(tmp_path: Path) -> None:
    """A model that allocates more than the machine has (here 4x its RAM), under a budget of
    1e300 MB: the child must be stopped by its limit (memory), not run the device dry, and
    the smoke must fail with a SmokeError, never a traceback."""
    elements = int(4 * _machine_mb() * _MB / 4)
    model = save(bad_models.huge_alloc(elements), tmp_path / "model" / "model.onnx")
    for rel, arrays in (
        (SMOKE_INPUTS_FILE, {"x": np.ones(1, np.float32)}),
        (SMOKE_GOLDEN_FILE, {"y": np.array(float(elements), np.float32)}),
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(npz_bytes(arrays))
    spec = SmokeSpec(runs=1, budgets={"cam-v1": Budget(peak_mem_mb=1e300)})
    with pytest.raises(SmokeFailed) as failed:
        run_smoke(model, tmp_path, spec, tier="cam-v1", limits=SmokeLimits(threads=1))
    report = failed.value.report
    assert report["reason"] in (child.MEMORY, child.MEMORY_BUDGET), report
    assert report["mem_limit_mb"] < 2 * _machine_mb() + 2048
