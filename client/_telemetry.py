"""On-device inference telemetry: bounded summaries per model version and interval.

An application wraps each inference::

    rec = Telemetry.open(state_dir)
    with rec.inference("det", "1.0.0") as t:
        out = session.run(None, feeds)
        t.outputs(out)
    ...
    rec.close()          # flushes what is left

or calls ``rec.record(model, version, latency_s, ok=True, outputs=...)`` after the fact.
Every ``interval_s`` (default 300 s) each ``(model, version)`` seen becomes one summary
(format ``edge-ota.telemetry/1``, :mod:`ota.client._telemetry_format`, ADR 0009) appended as a
``telemetry`` event to the device's store-and-forward queue (:mod:`ota.client._events`), which
``ota device report`` forwards with ``edge-ota.report/1``.

Invariants:

* no input and no raw output leaves the device: a summary holds counts only (a latency
  histogram over the fixed buckets :data:`LATENCY_EDGES`, counts of inferences, errors and
  crashes, and per output a histogram over bins fixed by the release, or the top classes);
* everything is bounded whatever the app does: at most :data:`MAX_KEYS` model versions per
  recorder, :data:`MAX_OUTPUTS` outputs, :data:`MAX_BINS` bins, :data:`MAX_CLASSES` tracked
  classes (:data:`TOP_K` reported), :data:`MAX_SAMPLE` elements looked at per output and call,
  :data:`MAX_PENDING` summaries waiting for the queue lock, :data:`MAX_SUMMARY_BYTES` per
  summary, validated with :func:`validate_summary` before it is written;
* a summary is written only for a version this device runs (the confirmed version in
  ``state.json`` or the release in the slot ``current`` points at, i.e. on trial); others are
  refused when first used (:class:`TelemetryError`) and dropped at flush (``rejected``);
* the hot path (:meth:`Telemetry.inference`, :meth:`Telemetry.record` without outputs) does no
  IO and keeps no new objects: it updates preallocated counters under a thread lock and one
  byte of a memory-mapped session file (the in-flight count), so a process that dies
  mid-inference is counted as a crash by the next :meth:`Telemetry.open` on the state dir;
* the queue is appended under the state directory's file lock (the updater's), so several
  processes may record and flush at once; a busy lock keeps the summary for the next flush.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import json
import mmap
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import filelock

from ota.bundle import Release, validate_name_fmt, validate_version
from ota.errors import LocalError, OtaError

from . import _slots
from ._events import MAX_EVENT_DATA_BYTES, EventQueue
from ._state import StateDir
from ._telemetry_format import (
    DEFAULT_INTERVAL_S,
    EVENT_KIND,
    LATENCY_BUCKETS,
    LATENCY_EDGES,
    MAX_INTERVAL_S,
    MAX_OUTPUTS,
    TELEMETRY_FORMAT,
    OutputCounter,
    OutputSpec,
    TelemetryError,
    validate_reference,
    validate_summary,
)

MAX_KEYS = 16  # (model, version) pairs one recorder tracks
MAX_PENDING = 32  # summaries waiting for the queue lock
_SESSION_SIZE = 64 + MAX_KEYS * 256
_SESSION_MAGIC = b"EOTEL1\n\0"
_LOCK_WAIT_S = 2.0


class _Agg:
    """Counters of one (model, version) over one interval."""

    __slots__ = (
        "by_name",
        "crashes",
        "errors",
        "inflight",
        "lat",
        "lat_sum",
        "model",
        "n",
        "outs",
        "slot",
        "version",
    )

    def __init__(self, model: str, version: str, slot: int, specs: Sequence[OutputSpec]) -> None:
        self.model, self.version, self.slot = model, version, slot
        self.inflight = 0
        self.outs = [OutputCounter(s) for s in specs[:MAX_OUTPUTS]]
        self.by_name = {o.spec.name: o for o in self.outs}
        self.reset()

    def reset(self) -> None:
        self.n = self.errors = self.crashes = 0
        self.lat = [0] * LATENCY_BUCKETS
        self.lat_sum = 0.0
        self.outs = [OutputCounter(o.spec) for o in self.outs]
        self.by_name = {o.spec.name: o for o in self.outs}

    def empty(self) -> bool:
        return self.n == 0 and self.crashes == 0

    def doc(self, start: float, end: float) -> dict[str, Any]:
        return {
            "format": TELEMETRY_FORMAT,
            "model": self.model,
            "version": self.version,
            "start": start,
            "end": end,
            "inferences": self.n,
            "errors": self.errors,
            "crashes": self.crashes,
            "latency": {"counts": list(self.lat), "sum_s": self.lat_sum},
            "outputs": [o.summary().to_dict() for o in self.outs],
        }


class Inference:
    """One inference being timed (``with rec.inference(...) as t``). An exception leaving
    the block counts as an error; it is never swallowed."""

    __slots__ = ("_agg", "_out", "_rec", "_t0")

    def __init__(self, rec: Telemetry, agg: _Agg) -> None:
        self._rec, self._agg, self._t0 = rec, agg, 0.0
        self._out: Any = None

    def outputs(self, value: Any) -> None:
        """The inference's outputs: an array (one output), a sequence of arrays in the
        model's output order (as ``InferenceSession.run`` returns them) or a mapping by
        output name. Only counted into the release's fixed bins; never stored."""
        self._out = value

    def __enter__(self) -> Inference:
        self._rec._begin(self._agg)
        self._t0 = self._rec._timer()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._rec._end(self._agg, self._rec._timer() - self._t0, et is None, self._out)


class Telemetry:
    """Inference telemetry of one device state directory, for one process. Thread-safe."""

    def __init__(
        self,
        state_dir: Path | str,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] = time.time,
        auto_flush: bool = True,
        specs: Mapping[str, Sequence[OutputSpec]] | None = None,
        lock_wait_s: float = _LOCK_WAIT_S,
    ) -> None:
        if not 1.0 <= interval_s <= MAX_INTERVAL_S:
            raise TelemetryError(f"interval must be within [1, {MAX_INTERVAL_S:g}] s")
        self.sd = StateDir(state_dir)
        self.sd.load_config()  # ConfigError when the state dir is not a device
        self.interval_s = interval_s
        self._clock = clock
        self._timer = time.perf_counter
        self._specs = dict(specs or {})
        self._lock_wait = lock_wait_s
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._keys: dict[tuple[str, str], _Agg] = {}
        self._pending: list[dict[str, Any]] = []
        self._start = clock()
        self.rejected = 0  # summaries dropped: version not run here, or invalid
        self.dropped = 0  # summaries dropped: MAX_PENDING waiting for the queue lock
        self.output_errors = 0  # outputs that could not be read as numbers (skipped)
        self.crashes_found: dict[tuple[str, str], int] = {}
        self._dir = self.sd.root / "telemetry"
        try:
            self._dir.mkdir(exist_ok=True)
            self._session_path, self._fd, self._mm = self._new_session()
        except OSError as e:
            raise LocalError(f"cannot start telemetry in {self._dir}: {e}") from e
        self._collect_crashes()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if auto_flush:
            self._thread = threading.Thread(target=self._run, name="ota-telemetry", daemon=True)
            self._thread.start()

    @classmethod
    def open(cls, state_dir: Path | str, **kw: Any) -> Telemetry:
        """Open the recorder of ``state_dir`` (an initialised device) for this process and
        count crashes left by processes that died mid-inference.

        Raises:
            ConfigError: not an initialised device.
            TelemetryError: a bad interval.
            LocalError: the session file cannot be created in ``<state_dir>/telemetry``.
        """
        return cls(state_dir, **kw)

    # -- hot path ---------------------------------------------------------------------------

    def inference(self, model: str, version: str) -> Inference:
        """A context manager timing one inference of ``model`` at ``version``.

        Raises:
            TelemetryError: the device does not run this version, or too many versions.
        """
        agg = self._keys.get((model, version))
        if agg is None:
            agg = self._register(model, version)
        return Inference(self, agg)

    def record(
        self, model: str, version: str, latency_s: float, *, ok: bool = True, outputs: Any = None
    ) -> None:
        """Count one finished inference (same checks as :meth:`inference`)."""
        agg = self._keys.get((model, version))
        if agg is None:
            agg = self._register(model, version)
        self._begin(agg)
        self._end(agg, latency_s, ok, outputs)

    def _begin(self, agg: _Agg) -> None:
        with self._lock:
            agg.inflight += 1
            self._mm[64 + agg.slot * 256] = min(agg.inflight, 255)

    def _end(self, agg: _Agg, latency_s: float, ok: bool, outputs: Any) -> None:
        """Count a finished inference. Never raises for what the app passed: a latency that
        is not a number >= 0 counts as 0, outputs numpy cannot read are skipped (and counted
        in ``output_errors``), so the in-flight count always goes down again."""
        try:
            lat = float(latency_s)
        except (TypeError, ValueError):
            lat = 0.0
        if not lat >= 0.0:  # NaN or negative: a broken clock
            lat = 0.0
        i = bisect.bisect_right(LATENCY_EDGES, lat)
        if outputs is not None and ok and agg.outs:
            try:
                self._add_outputs(agg, outputs)
            except Exception:  # a ragged list, an object the app made up: not telemetry's to raise
                self.output_errors += 1
        with self._lock:
            agg.inflight -= 1
            self._mm[64 + agg.slot * 256] = min(agg.inflight, 255)
            agg.n += 1
            if not ok:
                agg.errors += 1
            agg.lat[i] += 1
            agg.lat_sum += min(lat, MAX_INTERVAL_S)

    def _add_outputs(self, agg: _Agg, outputs: Any) -> None:
        with self._lock:  # numpy counters are not atomic; summaries are small and bounded
            if isinstance(outputs, Mapping):  # looked up by the spec's names: bounded
                pairs = [(o, outputs.get(o.spec.name)) for o in agg.outs]
            elif isinstance(outputs, list | tuple):
                pairs = list(zip(agg.outs, outputs[:MAX_OUTPUTS], strict=False))
            else:
                pairs = [(agg.outs[0], outputs)]
            for o, v in pairs:
                if v is not None:
                    o.add(v)

    # -- registration and version check ---------------------------------------------------

    def runs(self, model: str) -> set[str]:
        """Versions of ``model`` this device runs: confirmed, and on trial in ``current``."""
        out: set[str] = set()
        m = self.sd.load_state().models.get(model)
        if m is not None:
            out.add(m.version)
        rel = self._current_release(model)
        if rel is not None:
            out.add(rel.version)
        return out

    def _current_release(self, model: str) -> Release | None:
        mdir = _slots.model_dir(self.sd.root, model)
        try:
            slot = _slots.current_slot(mdir)
        except OtaError:  # not a slot link: nothing is run
            return None
        return _slots.read_release(mdir, slot) if slot else None

    def _register(self, model: str, version: str) -> _Agg:
        try:
            validate_name_fmt(model)
            validate_version(version)
        except Exception as e:
            raise TelemetryError(f"bad model name or version: {e}") from e
        if version not in self.runs(model):
            raise TelemetryError(
                f"this device does not run {model} {version}",
                remedy="record the version `ota device status` shows",
            )
        specs = self._specs.get(model)
        if specs is None:
            rel = self._current_release(model)
            ref = rel.telemetry if rel is not None and rel.version == version else None
            specs = [o.spec for o in validate_reference(ref)] if ref else []
        with self._lock:
            agg = self._keys.get((model, version))
            if agg is not None:
                return agg
            if len(self._keys) >= MAX_KEYS:
                raise TelemetryError(f"more than {MAX_KEYS} model versions in one process")
            agg = _Agg(model, version, len(self._keys), specs)
            name = f"{model}\n{version}".encode()[:250]
            off = 64 + agg.slot * 256
            self._mm[off + 1] = len(name)
            self._mm[off + 2 : off + 2 + len(name)] = name
            self._keys = {**self._keys, (model, version): agg}  # readers never see a resize
            return agg

    # -- crash detection ------------------------------------------------------------------

    def _new_session(self) -> tuple[Path, int, mmap.mmap]:
        path = self._dir / f"session-{os.getpid()}-{secrets.token_hex(4)}.live"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, _SESSION_SIZE)
        mm = mmap.mmap(fd, _SESSION_SIZE)
        mm[0:8] = _SESSION_MAGIC
        return path, fd, mm

    def _collect_crashes(self) -> None:
        """Count in-flight inferences of sessions whose process is gone (its flock is free),
        once: the file is zeroed and removed while its lock is held."""
        for path in sorted(self._dir.glob("session-*.live"))[:256]:
            if path == self._session_path:
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # alive
                try:
                    if os.stat(path).st_ino != os.fstat(fd).st_ino:
                        continue  # another process collected it meanwhile
                except FileNotFoundError:
                    continue
                data = os.pread(fd, _SESSION_SIZE, 0)
                if data[:8] == _SESSION_MAGIC and len(data) == _SESSION_SIZE:
                    for slot in range(MAX_KEYS):
                        off = 64 + slot * 256
                        n, ln = data[off], data[off + 1]
                        if n and ln:
                            model, _, version = (
                                data[off + 2 : off + 2 + ln]
                                .decode(errors="replace")
                                .partition("\n")
                            )
                            key = (model, version)
                            self.crashes_found[key] = self.crashes_found.get(key, 0) + n
                os.pwrite(fd, bytes(_SESSION_SIZE), 0)
                path.unlink(missing_ok=True)
            finally:
                os.close(fd)
        for (model, version), n in self.crashes_found.items():
            try:
                agg = self._register(model, version)
            except TelemetryError:
                self.rejected += 1  # the crashed version is no longer run here
                continue
            with self._lock:
                agg.crashes += n

    # -- flushing ---------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(max(0.0, self._start + self.interval_s - self._clock())):
            with contextlib.suppress(Exception):  # a flush failure never stops recording
                self.flush()

    def flush(self) -> int:
        """End the current interval: every non-empty ``(model, version)`` becomes a summary,
        validated, checked against the versions the device runs, and appended to the event
        queue under the state-dir lock (kept for the next flush when the lock is busy).
        Returns how many summaries were queued."""
        with self._flush_lock:
            end = max(self._clock(), self._start + 1e-3)
            with self._lock:
                start, self._start = self._start, end
                # a flush late by more than the bound (or a clock jump) keeps its counts: the
                # summary says they were made in the last MAX_INTERVAL_S
                start = max(start, end - MAX_INTERVAL_S)
                docs = [a.doc(start, end) for a in self._keys.values() if not a.empty()]
                for a in self._keys.values():
                    a.reset()
            for doc in docs:
                try:
                    validate_summary(doc)
                except TelemetryError:
                    self.rejected += 1
                    continue
                self._pending.append(doc)
            if len(self._pending) > MAX_PENDING:
                self.dropped += len(self._pending) - MAX_PENDING
                del self._pending[:-MAX_PENDING]
            return self._write_pending()

    def _write_pending(self) -> int:
        if not self._pending:
            return 0
        lock = filelock.FileLock(str(self.sd.lock_path), timeout=self._lock_wait)
        try:
            lock.acquire()
        except filelock.Timeout:
            return 0
        written = 0
        try:
            queue = EventQueue(self.sd.events_path, clock=self._clock)
            runs: dict[str, set[str]] = {}
            while self._pending:
                doc = self._pending[0]
                model = doc["model"]
                if model not in runs:
                    runs[model] = self.runs(model)
                if doc["version"] in runs[model]:
                    data = {"summary": doc}
                    assert len(json.dumps(data)) < MAX_EVENT_DATA_BYTES
                    queue.append(EVENT_KIND, model, doc["version"], **data)
                    written += 1
                else:
                    self.rejected += 1
                self._pending.pop(0)
        finally:
            lock.release()
        return written

    def close(self) -> int:
        """Flush what is left, stop the flusher and end this process's session (no crash is
        counted for it). Returns how many summaries were queued by the last flush."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        n = self.flush()
        with contextlib.suppress(OSError):
            self._mm.close()
            self._session_path.unlink(missing_ok=True)
            os.close(self._fd)
        return n

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
