"""Helpers shared by the benchmarks: wall-clock timing, peak memory, phase timing, output.

Every figure a benchmark reports is a ratio against a baseline measured in the same run (these
machines are noisy), next to the absolute numbers it was computed from. Nothing here asserts a
time: the benchmarks report, the reader judges.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def best_of(
    n: int, fn: Callable[[], T], *, setup: Callable[[], None] | None = None
) -> tuple[float, T]:
    """Run ``fn`` ``n`` times (each after an untimed ``setup``); return the best wall time in
    seconds and the result of the best run."""
    best: tuple[float, T] | None = None
    for _ in range(max(1, n)):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - t0
        if best is None or elapsed < best[0]:
            best = (elapsed, result)
    assert best is not None
    return best


def time_ms(fn: Any, repeat: int) -> dict[str, float]:
    """Call ``fn`` ``repeat`` times; best, median and max wall time in milliseconds."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return {
        "best_ms": round(min(times), 2),
        "median_ms": round(statistics.median(times), 2),
        "max_ms": round(max(times), 2),
    }


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """Wall time of one call of ``fn`` in seconds, and its result."""
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS watermark of this process (Linux >= 4.0); False if not."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB since the last :func:`reset_peak_rss`
    (``VmHWM``), or since start (``ru_maxrss``) where ``/proc`` is not available."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def drop_dirty_pages() -> None:
    """Flush dirty pages (untimed), so that one run's writes are not paid by the next."""
    os.sync()


@dataclass
class PhaseTimer:
    """Wall time spent inside named functions. Nesting is tracked per thread: a timed call
    inside another timed call *of the same thread* is not counted twice, while timed calls on
    other threads (publish computes golden outputs and the model card on a side pool while its
    chunks stream out) count for their own phase. Install with :meth:`wrap` (monkeypatching
    from outside; the code under test is not modified) and undo with :meth:`restore`.

    Phases on different threads may overlap in time, so their sum can exceed the wall time:
    :meth:`breakdown` reports ``other`` as the wall time outside every timed interval and, when
    asked, ``overlap`` as the time counted in more than one phase at once."""

    totals: dict[str, float] = field(default_factory=dict)
    _local: threading.local = field(default_factory=threading.local)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _spans: list[tuple[float, float]] = field(default_factory=list)
    _undo: list[tuple[object, str, object]] = field(default_factory=list)

    def wrap(self, owner: object, attr: str, phase: str) -> None:
        original = getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if getattr(self._local, "depth", 0):
                return original(*args, **kwargs)
            self._local.depth = 1
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                t1 = time.perf_counter()
                self._local.depth = 0
                with self._lock:
                    self.totals[phase] = self.totals.get(phase, 0.0) + t1 - t0
                    self._spans.append((t0, t1))

        self._undo.append((owner, attr, original))
        setattr(owner, attr, timed)

    def reset(self) -> None:
        with self._lock:
            self.totals = {}
            self._spans = []

    def restore(self) -> None:
        while self._undo:
            owner, attr, original = self._undo.pop()
            setattr(owner, attr, original)

    def covered(self) -> float:
        """Seconds during which at least one timed call ran (the union of the intervals)."""
        with self._lock:
            spans = sorted(self._spans)
        total, end = 0.0, float("-inf")
        for t0, t1 in spans:
            if t1 <= end:
                continue
            total += t1 - max(t0, end)
            end = t1
        return total

    def breakdown(
        self, total: float, order: Sequence[str], *, overlap: bool = False
    ) -> dict[str, float]:
        """Seconds per phase in ``order``, plus ``other`` (``total`` outside every timed call)
        and, with ``overlap``, the time counted in two phases at once (different threads)."""
        with self._lock:
            totals = dict(self.totals)
        out = {p: round(totals.get(p, 0.0), 4) for p in order}
        covered = self.covered()
        out["other"] = round(max(0.0, total - covered), 4)
        if overlap:
            out["overlap"] = round(max(0.0, sum(totals.values()) - covered), 4)
        return out


@contextlib.contextmanager
def publish_phases() -> Iterator[PhaseTimer]:
    """Time the phases of ``ota.repository.publish`` by wrapping the functions it calls.

    Phases: ``checks`` (static model checks), ``chunk_upload`` (chunking, hashing and uploading
    every file, and waiting for the uploads), ``smoke_golden`` (reference run through
    onnxruntime), ``sbom``, ``provenance``, ``sign`` (model-signing signature), ``commit`` (the
    manifest target and the metadata transaction). Phases on publish's side threads (golden
    outputs) are timed in full beside the main thread's; see :class:`PhaseTimer`.
    """
    import ota.repository._chunker as chunker
    import ota.repository._golden as golden
    import ota.repository._model_checks as checks
    import ota.repository._publish as pub
    import ota.signing as signing

    timer = PhaseTimer()
    timer.wrap(checks, "check_model", "checks")
    timer.wrap(pub, "chunk_file", "chunk_upload")
    timer.wrap(pub, "_chunk_in_child", "chunk_upload")  # the model file's, in a child process
    timer.wrap(chunker.Uploader, "flush", "chunk_upload")
    timer.wrap(golden, "make_smoke_files", "smoke_golden")
    timer.wrap(pub, "_sbom", "sbom")
    timer.wrap(pub, "_provenance", "provenance")
    timer.wrap(signing, "sign_digests", "sign")
    timer.wrap(pub, "put_target_file", "commit")
    timer.wrap(pub, "run", "commit")
    try:
        yield timer
    finally:
        timer.restore()


def warm_up(workdir: Path) -> None:
    """Publish a tiny model once into a throwaway repository, untimed, so that the one-off
    imports of the publish pipeline (onnxruntime, model signing, the SBOM schema validator,
    about 1-3 s) are paid before anything is measured. Each measured figure is then the cost
    of a publish in a warm process; the cold-process cost is reported by :func:`import_cost`."""
    import shutil

    from ota.repository import Project, PublishRequest, init_project, publish
    from tests.onnx_models import write_mlp

    base = workdir / "warm-up"
    shutil.rmtree(base, ignore_errors=True)
    init_project(base / "proj", str(base / "repo"), bins=2)
    model = write_mlp(base / "model.onnx")
    publish(Project.open(base / "proj"), PublishRequest(model, "warm-up", "1.0.0"))
    shutil.rmtree(base, ignore_errors=True)


def import_cost() -> float:
    """Seconds a fresh interpreter spends importing what a publish imports (measured in a child
    process, minus the interpreter's own start-up)."""
    import subprocess

    def child(code: str) -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        return time.perf_counter() - t0

    mods = (
        "import ota.repository, ota.repository._golden, ota.repository._model_checks, "
        "ota.signing, ota.sbom._mlbom, onnxruntime; "
        "from ota.sbom._schema import _strict_validator; _strict_validator()"
    )  # the SBOM validator as publish builds it (its IRI grammar deferred: sbom/_lazy_iri.py)
    return round(max(0.0, child(mods) - child("pass")), 3)


PUBLISH_PHASES = (
    "checks",
    "chunk_upload",
    "smoke_golden",
    "sbom",
    "provenance",
    "sign",
    "commit",
)


def ratio(value: float, baseline: float) -> float:
    return round(value / baseline, 3) if baseline > 0 else float("nan")


def mb(n: float) -> float:
    return round(n / (1024 * 1024), 2)


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with right-aligned columns."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    cells = [[cell(v) for v in header]] + [[cell(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [title, "-" * len(title)]
    for i, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", action="store_true", help="print one JSON document only")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
    return parser


def emit(doc: dict[str, Any], human: str, as_json: bool) -> None:
    """Print the JSON document (``--json``) or the human tables."""
    if as_json:
        json.dump(doc, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print(human)
    sys.stdout.flush()


@contextlib.contextmanager
def scratch_dir(given: str | None) -> Iterator[Path]:
    """``given`` (created if needed, kept afterwards) or a temporary folder (removed)."""
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        yield path
    else:
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            yield Path(tmp)


def quiet_http_logs() -> None:
    """No log line per request from the in-process HTTP servers (werkzeug)."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)


def log(msg: str) -> None:
    """Progress to stderr (stdout carries only the result)."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def environment() -> dict[str, Any]:
    import platform

    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


class WireCounter:
    """A TCP relay on 127.0.0.1 in front of ``upstream`` (``host:port``) that counts the bytes
    each way, headers included, as they cross the wire (TCP payload; IP/TCP framing is not
    counted), and keeps the first ``keep`` bytes of responses so their headers can be shown.

    Use as a context manager; ``url`` is the relay's base URL; :meth:`reset` starts a new
    count (connections opened before keep counting into the new figures)."""

    def __init__(self, upstream: str, keep: int = 16384) -> None:
        import socket
        import threading

        host, _, port = upstream.rpartition(":")
        self._upstream = (host.removeprefix("http://"), int(port))
        self._keep = keep
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.sent = 0  # client -> server (requests)
        self.received = 0  # server -> client (responses)
        self.responses = b""
        self._threads: list[threading.Thread] = []
        self._open: list[socket.socket] = []
        self._stop = False

    def __enter__(self) -> WireCounter:
        import threading

        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        import socket

        self._stop = True
        # close() alone does not wake a thread blocked in accept() on Linux (its join then
        # waited out the 10 s timeout); shutdown() of the listening socket does
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with self._lock:
            socks = list(self._open)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(2)  # SHUT_RDWR: the pumps return
        for t in self._threads:
            t.join(timeout=10)

    def reset(self) -> None:
        with self._lock:
            self.sent = self.received = 0
            self.responses = b""

    def _accept(self) -> None:
        import socket
        import threading

        while not self._stop:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            server = socket.create_connection(self._upstream)
            with self._lock:
                self._open += [client, server]
            t = threading.Thread(target=self._relay, args=(client, server), daemon=True)
            t.start()
            self._threads.append(t)

    def _relay(self, client: Any, server: Any) -> None:
        import threading

        up = threading.Thread(target=self._pump, args=(client, server, True), daemon=True)
        up.start()
        self._pump(server, client, False)
        up.join()
        for sock in (client, server):
            sock.close()
            with self._lock:
                self._open.remove(sock)

    def _pump(self, src: Any, dst: Any, up: bool) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    if up:
                        self.sent += len(data)
                    else:
                        self.received += len(data)
                        room = self._keep - len(self.responses)
                        if room > 0:
                            self.responses += data[:room]
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(1)  # SHUT_WR: pass the end of stream on
