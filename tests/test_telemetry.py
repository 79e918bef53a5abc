"""Inference telemetry (issue 9): bounded summaries on a real device state dir, through the
real event queue and reporter to a fleet peer over HTTP; crash detection with a real process
that dies mid-inference; the reference distribution of a real publish; drift metrics; and the
``edge-ota.telemetry/1`` validator under random input."""

from __future__ import annotations

import copy
import itertools
import json
import math
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ota.bundle import FormatError, Release
from ota.client import init_device, report_events, update_once
from ota.client._events import MAX_EVENT_DATA_BYTES, EventQueue
from ota.client._slots import current_slot, model_dir, read_release
from ota.client.telemetry import (
    LATENCY_BUCKETS,
    LATENCY_EDGES,
    MAX_CLASSES,
    MAX_KEYS,
    MAX_SAMPLE,
    MAX_SUMMARY_BYTES,
    TOP_K,
    OutputSpec,
    Summary,
    Telemetry,
    TelemetryError,
    validate_reference,
    validate_summary,
)
from ota.repository import Project
from ota.repository._drift import DriftError, jensen_shannon, psi
from ota.repository._reference import BINS, reference_from_outputs
from tests.fleet_peer import fleet_peer
from tests.repo_helpers import make_project, publish_mlp, serve_dir
from tests.updater_world import FAST

MODEL = "det"


@dataclass
class Base:
    root: Path
    url: str
    project: Project

    @property
    def device(self) -> Path:
        return self.root / "device"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Base]:
    """det 1.0.0 published (reference from its golden run) and committed on a device, then
    det 1.1.0 published (not yet installed): tests copy the device and may update it."""
    root = tmp_path_factory.mktemp("tel")
    project = make_project(root)
    publish_mlp(project, MODEL, "1.0.0", seed=1)
    with serve_dir(root / "repo") as url:
        trusted = (root / "repo" / "metadata" / "1.root.json").read_bytes()
        init_device(root / "device", url, trusted, "dev-1", [MODEL], ring="canary",
                    health_timeout_s=0)  # fmt: skip
        res = update_once(root / "device", fetch_config=FAST, report=False)
        assert res.status == "updated", res.to_dict()
        publish_mlp(project, MODEL, "1.1.0", seed=2)
        yield Base(root, url, project)


@pytest.fixture
def device(base: Base, tmp_path: Path) -> Path:
    dev = tmp_path / "device"
    shutil.copytree(base.device, dev, symlinks=True)
    return dev


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _open(device: Path, clock: Clock | None = None, **kw: Any) -> Telemetry:
    return Telemetry.open(device, auto_flush=False, clock=clock or Clock(), **kw)


def _summaries(device: Path) -> list[dict[str, Any]]:
    return [e.data["summary"] for e in EventQueue(device / "events.json").pending()
            if e.kind == "telemetry"]  # fmt: skip


def _release(device: Path) -> Release:
    mdir = model_dir(device, MODEL)
    slot = current_slot(mdir)
    assert slot is not None
    rel = read_release(mdir, slot)
    assert rel is not None
    return rel


# -- latency buckets and aggregation ----------------------------------------------------------


def test_latency_edges_are_fixed_log_spaced_four_per_decade() -> None:
    assert len(LATENCY_EDGES) == 29 and LATENCY_BUCKETS == 30
    assert LATENCY_EDGES[0] == 1e-5 and LATENCY_EDGES[-1] == 100.0
    assert LATENCY_EDGES[::4] == (1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)
    ratios = [b / a for a, b in itertools.pairwise(LATENCY_EDGES)]
    assert all(abs(r - 10**0.25) < 1e-3 for r in ratios)


def test_counts_latencies_errors_and_outputs_into_fixed_bins(device: Path) -> None:
    clock = Clock()
    rec = _open(device, clock)
    ref = _release(device).telemetry
    assert ref is not None
    [spec] = [o.spec for o in validate_reference(ref)]
    assert spec.kind == "hist" and spec.bins == BINS
    mid = spec.lo + (spec.bins // 2 + 0.5) * (spec.hi - spec.lo) / spec.bins  # a bin's centre
    for lat in (5e-6, 1e-5, 2e-4, 0.0031, 150.0):
        rec.record(MODEL, "1.0.0", lat, outputs=np.full((1, 8), mid, dtype=np.float32))

    def failing() -> None:
        with rec.inference(MODEL, "1.0.0") as t:
            t.outputs(np.zeros((1, 8), dtype=np.float32))
            raise RuntimeError("the model failed")

    with pytest.raises(RuntimeError):  # the app's exception is never swallowed
        failing()
    with rec.inference(MODEL, "1.0.0") as t:
        t.outputs([np.array([[spec.lo - 1, spec.hi + 1, np.nan, np.inf, spec.lo, spec.hi]])])
    clock.t += 300
    assert rec.flush() == 1
    [doc] = _summaries(device)
    s = validate_summary(doc)
    assert (s.inferences, s.errors, s.crashes) == (7, 1, 0)
    assert (s.start, s.end) == (1_000_000.0, 1_000_300.0)
    expected = [0] * LATENCY_BUCKETS
    # 5us < 10us; 10us opens bucket 1; 200us in [177.8us, 316.2us); 3.1ms in [1.778, 3.162)
    # ms; 150s >= 100s
    for i in (0, 1, 6, 10, 29):
        expected[i] += 1
    assert sum(s.latency) == 7 and all(s.latency[i] >= expected[i] for i in range(30))
    out = s.output(spec.name)
    assert out is not None
    assert out.n == 6  # the failed inference's outputs are not counted
    assert out.counts[spec.bins // 2] == 5 * 8 and out.nan == 1
    assert out.under == 1 and out.over == 2  # below lo; above hi and +inf
    assert out.counts[0] == 1 and out.counts[-1] == 1  # lo and hi are inside the range
    json.dumps(doc, allow_nan=False)  # plain JSON: no NaN slipped through
    for o in doc["outputs"]:  # counts and the bin spec only, never an output value
        for v in o.values():
            assert isinstance(v, int | str) or all(isinstance(c, int) for c in v)


def test_thread_safety_every_inference_counted_once(device: Path) -> None:
    rec = _open(device)

    def work() -> None:
        for _ in range(2000):
            with rec.inference(MODEL, "1.0.0"):
                pass

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    rec.flush()
    [doc] = _summaries(device)
    assert doc["inferences"] == 8000 and sum(doc["latency"]["counts"]) == 8000


# -- bounds -----------------------------------------------------------------------------------


def test_unknown_versions_are_refused_so_versions_stay_bounded(device: Path) -> None:
    rec = _open(device)
    for v in ("1.1.0", "9.9.9", "2.0.0"):
        with pytest.raises(TelemetryError, match="does not run"):
            rec.inference(MODEL, v)
    with pytest.raises(TelemetryError):
        rec.record("other-model", "1.0.0", 0.01)
    with pytest.raises(TelemetryError, match="name or version"):
        rec.record("../x", "1.0.0", 0.01)
    rec.flush()
    assert _summaries(device) == []


def test_a_forged_session_file_cannot_add_versions_or_crashes(device: Path) -> None:
    """A dead session naming MAX_KEYS versions the device never ran: every one is refused
    (versions stay bounded by what the device runs), and the file is consumed once."""
    from ota.client import _telemetry as tm

    data = bytearray(tm._SESSION_SIZE)
    data[:8] = tm._SESSION_MAGIC
    for slot in range(MAX_KEYS):
        off = 64 + slot * 256
        name = f"{MODEL}\n9.{slot}.0".encode()
        data[off], data[off + 1] = 255, len(name)
        data[off + 2 : off + 2 + len(name)] = name
    (device / "telemetry").mkdir(exist_ok=True)
    (device / "telemetry" / "session-1-forged.live").write_bytes(bytes(data))
    (device / "telemetry" / "session-2-junk.live").write_bytes(b"not a session")
    rec = _open(device)
    assert len(rec.crashes_found) == MAX_KEYS and rec.rejected == MAX_KEYS
    rec.record(MODEL, "1.0.0", 0.001)
    rec.flush()
    [doc] = _summaries(device)
    assert doc["crashes"] == 0 and doc["inferences"] == 1
    assert sorted(p.name for p in (device / "telemetry").iterdir()) == sorted(
        [rec._session_path.name]
    )


def test_a_late_flush_keeps_its_counts_within_the_interval_bound(device: Path) -> None:
    clock = Clock()
    rec = _open(device, clock)
    rec.record(MODEL, "1.0.0", 0.001)
    clock.t += 3 * 86400  # the app flushed three days late (or the clock jumped)
    assert rec.flush() == 1
    s = validate_summary(_summaries(device)[0])
    assert s.inferences == 1 and s.end - s.start == 86400


def test_many_classes_huge_and_nan_outputs_stay_bounded(device: Path) -> None:
    specs = {MODEL: [OutputSpec("labels", "classes"), OutputSpec("scores", "hist", 0.0, 1.0, 64),
                     OutputSpec("logits", "classes")]}  # fmt: skip
    rec = _open(device, specs=specs)
    rng = np.random.default_rng(0)
    for i in range(3000):
        labels = np.array([i * 7919 % (MAX_CLASSES * 3)], dtype=np.int64)  # many classes
        rec.record(MODEL, "1.0.0", 0.001, outputs={"labels": labels})
    huge = rng.random(10_000_000, dtype=np.float32)
    huge[::7] = np.nan  # the sample stride (2442) is not a multiple of 7
    rec.record(MODEL, "1.0.0", 0.001, outputs={"scores": huge})
    logits = rng.random((50_000, 10))
    logits[:, 3] += 1.0  # class 3 wins every row
    rec.record(MODEL, "1.0.0", 0.001, outputs={"logits": logits, "unknown": np.zeros(5)})
    rec.flush()
    [doc] = _summaries(device)
    assert len(json.dumps(doc)) <= MAX_SUMMARY_BYTES
    s = validate_summary(doc)
    labels_s, scores, logits_s = (s.output(n) for n in ("labels", "scores", "logits"))
    assert labels_s is not None and scores is not None and logits_s is not None
    assert len(labels_s.top) == TOP_K and labels_s.total() == 3000
    assert all(c < MAX_CLASSES for c, _ in labels_s.top)
    assert scores.total() == MAX_SAMPLE and 0 < scores.nan < MAX_SAMPLE
    assert logits_s.top[0][0] == 3 and logits_s.total() <= MAX_SAMPLE
    assert {o["name"] for o in doc["outputs"]} == {"labels", "scores", "logits"}


def test_summaries_waiting_for_a_busy_queue_lock_are_kept_then_written(device: Path) -> None:
    import filelock

    clock = Clock()
    rec = _open(device, clock, lock_wait_s=0.0)
    with filelock.FileLock(str(device / ".lock")):
        rec.record(MODEL, "1.0.0", 0.002)
        clock.t += 300
        assert rec.flush() == 0  # the updater holds the lock: kept, not lost
    rec.record(MODEL, "1.0.0", 0.002)
    clock.t += 300
    assert rec.flush() == 2
    assert [d["inferences"] for d in _summaries(device)] == [1, 1]


# -- version check at flush, crash detection ------------------------------------------------


def test_a_summary_of_a_version_no_longer_run_is_rejected_at_flush(device: Path) -> None:
    rec = _open(device)
    rec.record(MODEL, "1.0.0", 0.002)
    res = update_once(device, fetch_config=FAST, report=False)
    assert res.status == "updated" and _release(device).version == "1.1.0"
    assert rec.flush() == 0 and rec.rejected == 1
    assert _summaries(device) == []
    rec.record(MODEL, "1.1.0", 0.002)  # the new version, with its own release's bins
    assert rec.flush() == 1 and _summaries(device)[0]["version"] == "1.1.0"


_CHILD = """
import os, sys
from ota.client.telemetry import Telemetry
rec = Telemetry.open(sys.argv[1], auto_flush=False)
rec.record("det", "1.0.0", 0.001)
with rec.inference("det", "1.0.0"):
    with rec.inference("det", "1.0.0"):
        os._exit(3)  # killed mid-inference: no flush, no cleanup
"""


def test_a_process_that_dies_mid_inference_is_counted_as_crashes(device: Path) -> None:
    live = _open(device)  # another live process's session must not count
    with live.inference(MODEL, "1.0.0"):
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(device)], check=False)
        assert proc.returncode == 3
        rec = _open(device)
    assert rec.crashes_found == {(MODEL, "1.0.0"): 2}
    again = _open(device)
    assert again.crashes_found == {}  # counted once
    rec.flush()
    [doc] = _summaries(device)
    s = validate_summary(doc)
    assert (s.inferences, s.crashes) == (0, 2)  # the dead process's counts died with it
    live.close()
    assert _open(device).crashes_found == {}  # a clean close leaves no crash


# -- end to end: queue, reporter, fleet peer --------------------------------------------------


def test_summaries_travel_through_the_queue_and_reporter_to_the_fleet_service(
    device: Path, base: Base
) -> None:
    with fleet_peer() as peer:
        trusted = (base.root / "repo" / "metadata" / "1.root.json").read_bytes()
        init_device(device, base.url, trusted, "dev-1", [MODEL], ring="canary",
                    health_timeout_s=0, report_url=peer.url)  # fmt: skip
        clock = Clock()
        with _open(device, clock) as rec:
            for i in range(100):
                rec.record(MODEL, "1.0.0", 0.001 * (i + 1), ok=i % 10 != 0,
                           outputs=np.full((1, 8), 0.1 * (i % 5), np.float32))  # fmt: skip
            clock.t += 300
        out = report_events(device, fetch_config=FAST)
        assert out.status == "sent", out.to_dict()
        [ev] = [e for e in peer.events.values() if e["kind"] == "telemetry"]
        assert (ev["model"], ev["version"]) == (MODEL, "1.0.0")
        assert len(json.dumps(ev["data"])) < MAX_EVENT_DATA_BYTES
        s = validate_summary(ev["data"]["summary"])
        assert (s.inferences, s.errors) == (100, 10)
        assert math.isclose(s.latency_sum_s, sum(0.001 * (i + 1) for i in range(100)))
        assert s.to_dict() == ev["data"]["summary"]


# -- the release's reference ------------------------------------------------------------------


def test_a_published_release_carries_its_reference_and_plain_releases_keep_their_bytes(
    base: Base, tmp_path: Path
) -> None:
    rel = _release(base.device)
    assert rel.telemetry is not None
    [out] = validate_reference(rel.telemetry)
    assert out.n > 0 and out.total() > 0 and out.under == out.over == 0
    assert Release.from_bytes(rel.to_bytes()) == rel
    plain = Release(name=MODEL, version="1.0.0", counter=1)
    assert "telemetry" not in plain.to_dict()
    bad = {**rel.to_dict(), "telemetry": {"format": "edge-ota.telemetry/1", "outputs": []}}
    with pytest.raises(FormatError, match="telemetry"):
        Release.from_dict(bad)


def test_reference_data_given_at_publish_sets_the_bins_and_counts(base: Base) -> None:
    data = base.root / "ref.npz"
    values = np.linspace(-2.0, 2.0, 400, dtype=np.float32).reshape(50, 8)
    np.savez(data, y=values, label=np.arange(50, dtype=np.int64) % 3)
    publish_mlp(base.project, MODEL, "1.2.0", seed=3, reference_data=data)
    from ota.repository._index import read_facts
    from ota.repository._txn import Transaction

    project = base.project
    facts = read_facts(Transaction.begin(project.storage, project.signers, project.expiry()),
                       MODEL, "1.2.0")  # fmt: skip
    assert facts is not None and facts.release.telemetry is not None
    ref = facts.release.telemetry
    y, label = validate_reference(ref)
    assert y.spec.kind == "hist" and y.spec.lo < -2.0 and y.spec.hi > 2.0
    assert y.total() == 400 and y.n == 50 and sum(y.counts) == 400
    assert label.spec.kind == "classes" and dict(label.top) == {0: 17, 1: 17, 2: 16}


def test_reference_from_outputs_is_deterministic_and_valid() -> None:
    sets: list[dict[str, Any]] = [
        {"y": np.array([[0.0, 1.0], [2.0, 3.0]], np.float32)},
        {"y": np.ones((1, 2))},
    ]
    a, b = reference_from_outputs(sets), reference_from_outputs(copy.deepcopy(sets))
    assert a == b and a is not None
    [y] = validate_reference(a)
    assert y.total() == 6 and y.n == 3
    assert reference_from_outputs([{"s": np.array(["x"])}]) is None


# -- drift ------------------------------------------------------------------------------------


def _hist(counts: list[int]) -> Any:
    from ota.client._telemetry_format import OutputSummary

    return OutputSummary(OutputSpec("y", "hist", 0.0, 1.0, len(counts)), sum(counts) or 1,
                         tuple(counts))  # fmt: skip


def test_drift_metrics_on_known_distributions() -> None:
    same = _hist([50, 50])
    assert psi(same, _hist([5, 5])) == pytest.approx(0.0, abs=1e-12)
    assert jensen_shannon(same, _hist([5, 5])) == pytest.approx(0.0, abs=1e-7)
    # JS distance (base 2) of [.5, .5] vs [1, 0]: sqrt(H([.75, .25]) - 1/2)
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert jensen_shannon(same, _hist([10, 0])) == pytest.approx(math.sqrt(h - 0.5), abs=1e-6)
    assert jensen_shannon(_hist([10, 0]), _hist([0, 10])) == pytest.approx(1.0, abs=1e-6)
    expected = 0.4 * math.log(0.9 / 0.5) + (-0.4) * math.log(0.1 / 0.5)
    assert psi(same, _hist([90, 10])) == pytest.approx(expected, rel=1e-2)
    with pytest.raises(DriftError):
        psi(_hist([1, 1]), _hist([1, 1, 1]))
    with pytest.raises(DriftError):
        jensen_shannon(_hist([0, 0]), _hist([1, 1]))


def test_drift_between_class_summaries_aligns_on_the_union_of_classes() -> None:
    from ota.client._telemetry_format import OutputSummary

    spec = OutputSpec("label", "classes")
    a = OutputSummary(spec, 100, top=((1, 60), (2, 40)))
    b = OutputSummary(spec, 100, top=((3, 60), (1, 40)))
    assert jensen_shannon(a, a) == pytest.approx(0.0, abs=1e-7)
    assert 0.3 < jensen_shannon(a, b) < 1.0 and psi(a, b) > 0.25


# -- the validator --------------------------------------------------------------------------


def _valid(n: int = 3) -> dict[str, Any]:
    lat = [0] * LATENCY_BUCKETS
    lat[10] = n
    return {
        "format": "edge-ota.telemetry/1", "model": "det", "version": "1.0.0",
        "start": 10.0, "end": 310.0, "inferences": n, "errors": 1, "crashes": 0,
        "latency": {"counts": lat, "sum_s": 0.01 * n},
        "outputs": [
            {"name": "y", "kind": "hist", "lo": "0.0", "hi": "1.0", "bins": 2, "n": n,
             "counts": [2, 1], "under": 0, "over": 0, "nan": 0},
            {"name": "c", "kind": "classes", "n": n, "top": [[4, 2], [1, 1]], "other": 0},
        ],
    }  # fmt: skip


@pytest.mark.parametrize(
    ("path", "value", "why"),
    [
        (("inferences",), 4, "latency histogram"),
        (("errors",), 9, "more errors"),
        (("end",), 5.0, "interval"),
        (("end",), 10.0 + 86401, "interval"),
        (("latency", "counts"), [1] * 3, "exactly"),
        (("outputs", 0, "n"), 9, "counts 9 inferences"),
        (("outputs", 0, "counts"), [1, 2, 3], "exactly 2"),
        (("outputs", 0, "bins"), 65, "bins"),
        (("outputs", 0, "lo"), "2.0", "lo must be below"),
        (("outputs", 0, "lo"), 0.0, "string"),
        (("outputs", 0, "hi"), "inf", "finite"),
        (("outputs", 1, "top"), [[1, 1], [4, 2]], "sorted"),
        (("outputs", 1, "top"), [[1, 1], [1, 1]], "twice"),
        (("outputs", 1, "top"), [[MAX_CLASSES, 1]], "below"),
        (("outputs", 0, "under"), True, "integer"),
        (("outputs", 0, "under"), -1, "integer"),
        (("version",), "../1", "version"),
        (("format",), "edge-ota.telemetry/2", "format"),
        (("latency", "sum_s"), float("inf"), "JSON"),
    ],
)
def test_the_validator_refuses_inconsistent_summaries(
    path: tuple[Any, ...], value: Any, why: str
) -> None:
    doc = _valid()
    assert isinstance(validate_summary(doc), Summary)
    target: Any = doc
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    with pytest.raises(TelemetryError, match=why):
        validate_summary(doc)


def test_the_validator_refuses_oversized_and_extra_keys() -> None:
    doc = _valid()
    doc["outputs"][1]["pad"] = "x" * (MAX_SUMMARY_BYTES + 1)
    with pytest.raises(TelemetryError, match="bound"):
        validate_summary(doc)
    doc = _valid()
    doc["raw"] = [1, 2]
    with pytest.raises(TelemetryError, match="keys"):
        validate_summary(doc)


SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=20,
)  # fmt: skip


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


PATHS = _paths(_valid())


@SETTINGS
@given(JSON)
def test_random_json_is_a_summary_or_a_telemetry_error(doc: Any) -> None:
    try:
        s = validate_summary(doc)
    except TelemetryError:
        return
    assert validate_summary(s.to_dict()) == s


@SETTINGS
@given(st.sampled_from(PATHS), JSON)
def test_a_mutated_summary_is_valid_and_consistent_or_refused(
    path: tuple[Any, ...], value: Any
) -> None:
    doc = _valid()
    target: Any = doc
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    try:
        s = validate_summary(doc)
    except TelemetryError:
        return
    assert sum(s.latency) == s.inferences and s.errors <= s.inferences
    assert all(o.n <= s.inferences for o in s.outputs)
    assert validate_summary(s.to_dict()) == s


@SETTINGS
@given(JSON)
def test_random_json_is_a_reference_or_refused_and_a_release_says_format_error(doc: Any) -> None:
    try:
        outs = validate_reference(doc)
    except TelemetryError:
        outs = None
    rel = Release(name=MODEL, version="1.0.0", counter=1).to_dict()
    try:
        parsed = Release.from_dict({**rel, "telemetry": doc})
    except FormatError:
        assert outs is None
        return
    assert outs is not None and parsed.telemetry == doc


@SETTINGS
@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=LATENCY_BUCKETS))
def test_any_consistent_latency_histogram_round_trips(counts: list[int]) -> None:
    doc = _valid()
    lat = counts + [0] * (LATENCY_BUCKETS - len(counts))
    n = sum(lat)
    doc.update(inferences=n, errors=min(1, n), latency={"counts": lat, "sum_s": 1.0})
    doc["outputs"] = []
    if n == 0:
        with pytest.raises(TelemetryError, match="empty"):
            validate_summary(doc)
        return
    s = validate_summary(doc)
    assert s.to_dict() == doc


def test_the_few_values_path_counts_as_the_numpy_path() -> None:
    from ota.client._telemetry_format import OutputCounter

    rng = np.random.default_rng(1)
    values = rng.normal(0.0, 1.0, 1024)
    values[::17] = np.nan
    for spec, data in (
        (OutputSpec("y", "hist", -1.5, 1.5, 7), values),
        (OutputSpec("c", "classes"), rng.integers(-5, MAX_CLASSES + 5, 1024)),
    ):
        few, bulk = OutputCounter(spec), OutputCounter(spec)
        for chunk in np.split(data, 128):  # 8 values: the few-values path
            few.add(chunk)
        for chunk in np.split(data, 4):  # 256 values: numpy
            bulk.add(chunk)
        a, b = few.summary(), bulk.summary()
        assert (a.counts, a.under, a.over, a.nan) == (b.counts, b.under, b.over, b.nan)
        assert (a.top, a.other, a.total()) == (b.top, b.other, b.total()) and a.total() == 1024


def test_the_cli_takes_reference_data_and_refuses_a_file_without_outputs(tmp_path: Path) -> None:
    from ota.errors import ExitCode
    from tests.onnx_models import write_mlp
    from tests.test_publish import _cli, _snapshot_of

    code, out = _cli(["init", str(tmp_path / "repo"), "--project", str(tmp_path / "proj")])
    assert code == 0, out
    model = write_mlp(tmp_path / "m.onnx")
    np.savez(tmp_path / "text.npz", y=np.array(["a", "b"]))
    before = _snapshot_of(tmp_path / "repo")
    args = ["publish", str(model), "--project", str(tmp_path / "proj"), "--name", "m"]
    code, out = _cli([*args, "--version", "1.0.0", "--reference-data", str(tmp_path / "text.npz")])
    assert code == ExitCode.INPUT and "holds no numeric output" in out, out
    assert _snapshot_of(tmp_path / "repo") == before
    np.savez(tmp_path / "ref.npz", y=np.full((4, 8), 0.25, np.float32))
    code, out = _cli([*args, "--version", "1.0.0", "--reference-data", str(tmp_path / "ref.npz")])
    assert code == 0, out
    from ota.repository._index import read_facts
    from ota.repository._txn import Transaction

    project = Project.open(tmp_path / "proj")
    txn = Transaction.begin(project.storage, project.signers, project.expiry())
    facts = read_facts(txn, "m", "1.0.0")
    assert facts is not None and facts.release.telemetry is not None
    [y] = validate_reference(facts.release.telemetry)
    assert y.n == 4 and y.total() == 32 and y.spec.lo < 0.25 < y.spec.hi


def test_what_the_app_passes_never_raises_nor_leaves_an_inference_in_flight(device: Path) -> None:
    rec = _open(device)
    ragged = [[1.0, 2.0], [3.0]]  # not an array numpy can build
    rec.record(MODEL, "1.0.0", float("nan"), outputs={"y": ragged})
    rec.record(MODEL, "1.0.0", -1.0, outputs={"y": object()})
    rec.record(MODEL, "1.0.0", "slow", outputs=np.array(["text"]))  # type: ignore[arg-type]
    with rec.inference(MODEL, "1.0.0") as t:
        t.outputs({"y": np.zeros((1, 8)), **{f"extra{i}": i for i in range(10_000)}})
    assert rec.output_errors == 3
    rec.close()
    assert _open(device).crashes_found == {}  # every inference left the in-flight count
    [doc] = _summaries(device)
    assert doc["inferences"] == 4 and doc["latency"]["counts"][0] == 3
    [y] = doc["outputs"]
    assert y["n"] == 1 and sum(y["counts"]) + y["under"] + y["over"] == 8


_WRITER = """
import sys
from ota.client.telemetry import Telemetry
t = [1_000_000.0]
rec = Telemetry.open(sys.argv[1], auto_flush=False, clock=lambda: t[0], lock_wait_s=60.0)
for i in range(int(sys.argv[2])):
    rec.record("det", "1.0.0", 0.001 * (i + 1))
    t[0] += 300
    assert rec.flush() == 1
rec.close()
"""


def test_several_processes_append_to_the_queue_without_losing_a_summary(device: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(device), "15"]) for _ in range(3)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    docs = _summaries(device)
    assert len(docs) == 45 and all(validate_summary(d).inferences == 1 for d in docs)
    seqs = [e.seq for e in EventQueue(device / "events.json").pending()]
    assert seqs == sorted(set(seqs))


@SETTINGS
@given(
    st.lists(st.integers(0, 1000), min_size=2, max_size=8).filter(any),
    st.lists(st.integers(0, 1000), min_size=2, max_size=8).filter(any),
)
def test_drift_metrics_are_bounded_and_js_is_symmetric(a: list[int], b: list[int]) -> None:
    n = min(len(a), len(b))
    ha, hb = _hist(a[:n]), _hist(b[:n])
    if not any(a[:n]) or not any(b[:n]):
        with pytest.raises(DriftError):
            psi(ha, hb)
        return
    assert psi(ha, hb) >= 0.0 and psi(ha, ha) == pytest.approx(0.0, abs=1e-12)
    js = jensen_shannon(ha, hb)
    assert 0.0 <= js <= 1.0 and js == pytest.approx(jensen_shannon(hb, ha), abs=1e-9)
