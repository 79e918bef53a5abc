"""Device update speed: fetch + verify + stage of a large model, against the strongest honest
baselines, in the same run.

A model of ``--size-mb`` (``tests.onnx_models.big_mlp``) is published as 1.0.0 into a local
repository and served over loopback HTTP (nginx in its own process by default, see
``--server``). Each of ``--repeat`` rounds runs three paths, each in a **fresh process** and in
a rotating order (each path goes first in turn), dirty pages flushed (untimed) before each:

* **ours**: ``python -m bench.device_update --child ours``: ``ota device``'s preparation, then
  :func:`ota.client.update_once` from a freshly initialised device: TUF refresh, manifest and
  signer list through TUF, runs of missing chunks fetched as ``Range`` requests of the file
  blob (ADR 0014: a full install streams each file as one range straight into its staging
  file), files assembled, hashed once and fsynced, the model signature verified, the
  slot installed and switched; the number of HTTP requests it made is reported. The smoke step is a
  no-op seam (``no_smoke``); the real sandboxed smoke run is timed apart, once (and
  ``bench.device_large`` runs it end to end through the CLI);
* **stock**: stock python-tuf in a fresh process against a minimal TUF repository holding the
  raw model as its only target: ``refresh`` + ``get_targetinfo`` +
  ``download_target(info, filepath=FINAL)`` (python-tuf writes the final file itself: no copy,
  no fsync);
* **curl**: ``curl -o FINAL`` + ``openssl dgst -sha256`` (SHA-NI, as fast as Python's hashlib;
  coreutils ``sha256sum`` is 7-10x slower here and is not used) + ``sync FINAL DIR``.

Figures: per round, ours / stock and ours / curl (goals <= 1.0 and <= 1.25), reported as the
median over rounds with min and max; wall seconds from spawn to exit, the seconds after imports
(``work_s``, ours and stock; the project's bytecode is written first, as a wheel install
does: :func:`compile_project`), CPU seconds of each path (user + system, of the process tree), and
the load average of each round, and the peak RSS (``VmHWM``) of the ours and stock children.
One more in-process update, not compared, splits ours into
phases by wrapping client functions from outside.

Run: ``python -m bench.device_update [--json] [--size-mb 256] [--repeat 5]``.

This module also holds the helpers the other device benchmarks share (counting server, a
published repository, device init, the no-op smoke seam).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench._common import (
    PhaseTimer,
    base_parser,
    drop_dirty_pages,
    emit,
    environment,
    log,
    mb,
    peak_rss_mb,
    quiet_http_logs,
    ratio,
    scratch_dir,
    table,
    timed,
)
from bench.publish_speed import sha256_file

GOAL_STOCK = 1.0
GOAL_CURL = 1.25
MODEL = "bench-model"
_BLOCK = 1 << 20


# -- shared helpers ------------------------------------------------------------------------


@dataclass
class Hit:
    method: str
    path: str
    status: int
    body_bytes: int
    header_bytes: int


@dataclass
class HitLog:
    """Requests seen by the server (thread-safe): path, status, body and header bytes."""

    hits: list[Hit] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, hit: Hit) -> None:
        with self._lock:
            self.hits.append(hit)

    def reset(self) -> None:
        with self._lock:
            self.hits = []

    def snapshot(self) -> list[Hit]:
        with self._lock:
            return list(self.hits)

    def summary(self) -> dict[str, Any]:
        hits = self.snapshot()
        return {
            "requests": len(hits),
            "body_bytes": sum(h.body_bytes for h in hits),
            "header_bytes": sum(h.header_bytes for h in hits),
            "blob_requests": sum(1 for h in hits if h.path.startswith("/blobs/")),
            "blob_bytes": sum(h.body_bytes for h in hits if h.path.startswith("/blobs/")),
            "metadata_requests": sum(1 for h in hits if h.path.startswith("/metadata/")),
            "metadata_bytes": sum(h.body_bytes for h in hits if h.path.startswith("/metadata/")),
            "target_requests": sum(1 for h in hits if h.path.startswith("/targets/")),
            "target_bytes": sum(h.body_bytes for h in hits if h.path.startswith("/targets/")),
        }


class CountingApp:
    """WSGI middleware: records every response's status, body bytes (as iterated by the
    server) and header bytes (status line and the app's headers; the server's own ``Server``
    and ``Date`` headers are not included)."""

    def __init__(self, app: Callable[..., Iterable[bytes]], log_: HitLog) -> None:
        self.app = app
        self.log = log_

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        seen: dict[str, Any] = {}

        def sr(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            seen["status"] = int(status.split(" ", 1)[0])
            seen["header_bytes"] = (
                len(status) + 11 + sum(len(k) + len(v) + 4 for k, v in headers) + 2
            )
            return start_response(status, headers, exc_info)

        body = self.app(environ, sr)
        return self._count(body, environ, seen)

    def _count(
        self, body: Iterable[bytes], environ: dict[str, Any], seen: dict[str, Any]
    ) -> Iterator[bytes]:
        n = 0
        try:
            for piece in body:
                n += len(piece)
                yield piece
        finally:
            close = getattr(body, "close", None)
            if callable(close):
                close()
            self.log.add(
                Hit(
                    environ.get("REQUEST_METHOD", ""),
                    environ.get("PATH_INFO", ""),
                    seen.get("status", 0),
                    n,
                    seen.get("header_bytes", 0),
                )
            )


@contextlib.contextmanager
def serve_counting(root: Path) -> Iterator[tuple[str, HitLog]]:
    """Serve ``root`` with ``ota serve``'s app (as ``tests.repo_helpers.serve_dir`` does),
    wrapped in :class:`CountingApp`; yield the base URL and the hit log."""
    from werkzeug.serving import make_server

    from ota.repository._serve import create_app

    quiet_http_logs()
    hits = HitLog()
    mode = os.environ.get("OTA_BENCH_SERVER", "thread")
    if mode in ("process", "nginx"):
        from tests.nginx import serve_static

        with _serve_process(root) if mode == "process" else serve_static(root) as url:
            yield url, hits  # a separate process: its requests are not counted here
        return
    server = make_server("127.0.0.1", 0, CountingApp(create_app(root), hits), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", hits
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def _serve_process(root: Path) -> Iterator[str]:
    """``ota serve`` in its own process, as a real server (or S3, or a CDN) would be."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ota.cli", "serve", "--root", str(root), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=1):
                    break
            except OSError:
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def no_smoke(
    model_path: Path, bundle_dir: Path, spec: Any, *, tier: str, runtime_path: Path | None = None
) -> dict[str, Any]:
    """Smoke seam for the timed runs: returns at once (the real smoke is measured apart)."""
    return {"skipped": "benchmark seam: smoke measured apart"}


def build_model(path: Path, size_mb: int) -> Path:
    """``tests.onnx_models.big_mlp(size_mb)`` saved at ``path`` (once)."""
    from tests.onnx_models import big_mlp, save

    if not path.exists():
        save(big_mlp(size_mb), path)
    return path


@dataclass
class Repo:
    """A local project and repository (``<work>/proj``, ``<work>/repo``) publishing MODEL."""

    work: Path
    project: Any

    @classmethod
    def create(cls, work: Path) -> Repo:
        from tests.repo_helpers import make_project

        work.mkdir(parents=True, exist_ok=True)
        return cls(work, make_project(work))

    @property
    def root_dir(self) -> Path:
        return self.work / "repo"

    @property
    def trusted_root(self) -> bytes:
        return (self.project.root_dir / "root.json").read_bytes()  # type: ignore[no-any-return]

    def publish(self, model: Path, version: str, name: str = MODEL) -> Any:
        from ota.repository import PublishRequest, publish

        return publish(self.project, PublishRequest(model, name, version, ring="ga"))


def init_dev(state: Path, base_url: str, root: bytes, name: str = MODEL) -> Path:
    """A fresh device state dir following ``name`` (health timeout 0: confirmed at once)."""
    from ota.client import init_device

    shutil.rmtree(state, ignore_errors=True)
    init_device(state, base_url, root, "bench-dev", [name], health_timeout_s=0)
    return state


def update(state: Path, **kw: Any) -> Any:
    """``update_once`` with the no-op smoke seam; raises unless the release was installed."""
    from ota.client import update_once

    result = update_once(state, smoke=no_smoke, **kw)
    if result.status not in ("updated", "pending_confirmation"):
        raise RuntimeError(f"update failed: {result.to_dict()}")
    return result


def warm_up_device(workdir: Path) -> None:
    """One tiny publish + device update, untimed, so imports (python-tuf, urllib3,
    model_signing, the publish pipeline) are paid before anything is measured."""
    from tests.onnx_models import write_mlp

    base = workdir / "warm-up"
    shutil.rmtree(base, ignore_errors=True)
    repo = Repo.create(base)
    repo.publish(write_mlp(base / "m" / "model.onnx"), "1.0.0")
    with serve_counting(repo.root_dir) as (url, _):
        update(init_dev(base / "dev", url, repo.trusted_root))
    shutil.rmtree(base, ignore_errors=True)


def compile_project() -> None:
    """Write the bytecode of the project's packages (``__pycache__``, git-ignored), as
    installing the wheel on a device does. With ``PYTHONDONTWRITEBYTECODE`` set (it is on this
    machine) a fresh child would otherwise compile about 27 of our modules from source at every
    start (0.04-0.06 s of CPU, measured), while python-tuf, installed by pip, has its bytecode:
    the stock baseline would start warmer than ours."""
    import compileall

    import ota
    import ota.client
    import ota.signing

    for pkg in (ota, ota.client, ota.signing):
        for path in pkg.__path__:
            compileall.compile_dir(path, quiet=1)


def disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


def update_phases() -> PhaseTimer:
    """Wrap the client's steps (from outside) to time the phases of ``update_once``:
    ``tuf_refresh``, ``tuf_lookup`` (index and release targets), ``manifest``, ``stage``
    (fetch + verify every chunk, assemble, hash and fsync the files), ``signature`` (the
    signer list through TUF, then model-signing verification of the staged bundle),
    ``install_slot``, ``switch``, ``confirm`` (journal, health window); the rest is
    ``other``."""
    import ota.client._device as device
    import ota.client._install as install
    import ota.client._slots as slots
    import ota.client._tuf as tuf

    timer = PhaseTimer()
    timer.wrap(tuf.TufSession, "refresh", "tuf_refresh")
    timer.wrap(tuf.TufSession, "index", "tuf_lookup")
    timer.wrap(tuf.TufSession, "release", "tuf_lookup")
    timer.wrap(tuf.TufSession, "manifest", "manifest")
    timer.wrap(install, "stage", "stage")
    timer.wrap(install, "verify_signature", "signature")
    timer.wrap(slots, "install_staged", "install_slot")
    timer.wrap(device.Device, "begin_switch", "switch")
    timer.wrap(device.Device, "check_trial", "confirm")
    return timer


UPDATE_PHASES = (
    "tuf_refresh",
    "tuf_lookup",
    "manifest",
    "stage",
    "signature",
    "install_slot",
    "switch",
    "confirm",
)


# -- baselines ------------------------------------------------------------------------------


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_get(url: str, dest: Path, *, writeback: bool = False) -> str:
    """Baseline: one streaming GET, sha256 over the blocks as they are written, fsync of the
    file and its folder. Returns the hex digest. With ``writeback`` it also gives the kernel
    the same early-writeback hint every 8 MiB that the device's stager gives (a stronger
    baseline, reported beside the plain one)."""
    import urllib3

    dest.parent.mkdir(parents=True, exist_ok=True)
    pool = urllib3.PoolManager(retries=False)
    h = hashlib.sha256()
    resp = pool.request("GET", url, preload_content=False)
    try:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status} for {url}")
        with dest.open("wb") as out:
            done = flushed = 0
            while block := resp.read1(_BLOCK):
                h.update(block)
                out.write(block)
                done += len(block)
                if writeback and done - flushed >= 8 * _BLOCK:
                    os.posix_fadvise(out.fileno(), flushed, done - flushed, os.POSIX_FADV_DONTNEED)
                    flushed = done
            out.flush()
            os.fsync(out.fileno())
    finally:
        resp.release_conn()
        pool.clear()
    fsync_path(dest.parent)
    return h.hexdigest()


def build_stock_repo(root: Path, model: Path, target: str = "model.onnx") -> bytes:
    """A minimal stock TUF repository (python-tuf Metadata API, as in python-tuf's
    ``examples/manual_repo``) at ``root/{metadata,targets}`` holding ``model`` as the one
    target ``target`` (hard-linked, or copied); one ECDSA P-256 key for all four roles, no
    consistent snapshots. Returns the trusted root's bytes."""
    from securesystemslib.signer import CryptoSigner
    from tuf.api.metadata import (
        Metadata,
        MetaFile,
        Root,
        Snapshot,
        TargetFile,
        Targets,
        Timestamp,
    )
    from tuf.api.serialization.json import JSONSerializer

    meta_dir, tgt_dir = root / "metadata", root / "targets"
    meta_dir.mkdir(parents=True, exist_ok=True)
    tgt_dir.mkdir(parents=True, exist_ok=True)
    dest = tgt_dir / target
    if not dest.exists():
        try:
            os.link(model, dest)
        except OSError:
            shutil.copyfile(model, dest)
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=7)
    signer = CryptoSigner.generate_ecdsa()
    key = signer.public_key
    rootmd = Root(expires=expires, consistent_snapshot=False)
    for role in ("root", "timestamp", "snapshot", "targets"):
        rootmd.add_key(key, role)
    targets = Targets(expires=expires)
    targets.targets[target] = TargetFile.from_file(target, str(dest), ["sha256"])
    snapshot = Snapshot(expires=expires)
    snapshot.meta["targets.json"] = MetaFile(version=targets.version)
    timestamp = Timestamp(expires=expires)
    timestamp.snapshot_meta = MetaFile(version=snapshot.version)
    ser = JSONSerializer(compact=False)
    for name, signed in (
        ("root", rootmd),
        ("targets", targets),
        ("snapshot", snapshot),
        ("timestamp", timestamp),
    ):
        md: Metadata[Any] = Metadata(signed)
        md.sign(signer)
        data = md.to_bytes(ser)
        (meta_dir / f"{name}.json").write_bytes(data)
        if name == "root":
            (meta_dir / "1.root.json").write_bytes(data)
    return (meta_dir / "1.root.json").read_bytes()


def stock_update(base_url: str, trusted_root: bytes, work: Path, target: str) -> dict[str, float]:
    """Baseline, in this process: python-tuf's stock Updater from an empty metadata folder:
    refresh, get_targetinfo, then ``download_target(info, filepath=FINAL)``: python-tuf writes
    the final file itself (temp file, hash check, rename; no fsync), no second copy.
    Returns the seconds of each step."""
    from tuf.ngclient import Updater

    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    (work / "metadata").mkdir(parents=True)
    up = Updater(
        metadata_dir=str(work / "metadata"),
        metadata_base_url=f"{base_url}/metadata/",
        target_base_url=f"{base_url}/targets/",
        bootstrap=trusted_root,
    )
    up.refresh()
    info = up.get_targetinfo(target)
    if info is None:
        raise RuntimeError(f"stock repository has no target {target}")
    t1 = time.perf_counter()
    slot = work / "slot"
    slot.mkdir()
    up.download_target(info, filepath=str(slot / target))
    t2 = time.perf_counter()
    return {"refresh": t1 - t0, "download_target": t2 - t1, "total": t2 - t0}


def _child(argv: list[str]) -> dict[str, Any]:
    """Run ``python -m bench.device_update --child ...`` (a fresh process); return its JSON
    line plus ``process_s``, the wall time from spawn to exit."""
    import json
    import subprocess
    import sys

    t0, c0 = time.perf_counter(), _children_cpu()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.device_update", "--child", *argv],
        capture_output=True, text=True, check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    secs = time.perf_counter() - t0
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child {argv[0]} failed: {proc.stderr[-2000:]}")
    doc: dict[str, Any] = json.loads(lines[-1])
    doc["process_s"] = round(secs, 4)
    doc["cpu_s"] = round(_children_cpu() - c0, 4)
    return doc


def _children_cpu() -> float:
    """User + system CPU seconds of all waited-for children so far (the load-independent
    cost of a path: wall time on a loaded 2-core machine is mostly waiting for a core)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def child_main(kind: str, args: list[str]) -> None:
    """In a fresh process: ``ours STATE`` (``ota device``'s preparation, then update_once
    with the no-op smoke seam) or ``stock URL ROOT WORK TARGET``; print one JSON line with
    the seconds after imports (``work_s``)."""
    import json

    if kind == "ours":
        from ota._lean import lean_device_process

        lean_device_process()
        import ota.client
        import ota.signing  # noqa: F401 - the default verifier's imports, before the clock

        t0 = time.perf_counter()
        result = update(Path(args[0]))
        doc: dict[str, Any] = {
            "work_s": round(time.perf_counter() - t0, 4),
            "requests": result.requests,
            "bytes": result.bytes,
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
    else:
        url, root, work, target = args
        import tuf.ngclient  # noqa: F401 - imports before the clock, as for ours

        steps = stock_update(url, Path(root).read_bytes(), Path(work), target)
        doc = {
            "work_s": round(steps["total"], 4),
            "steps": steps,
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
    print(json.dumps(doc), flush=True)


def curl_openssl_sync(url: str, dest: Path) -> tuple[float, str, float]:
    """Baseline: ``curl -o FINAL`` + ``openssl dgst -sha256 FINAL`` + ``sync FINAL DIR``
    (fsync of the file and its folder), one shell; wall seconds, the digest, CPU seconds."""
    import subprocess

    dest.parent.mkdir(parents=True, exist_ok=True)
    script = 'curl -sSf -o "$2" "$1" && openssl dgst -sha256 -r "$2" && sync "$2" "$(dirname "$2")"'
    t0, c0 = time.perf_counter(), _children_cpu()
    out = subprocess.run(
        ["bash", "-c", script, "baseline", url, str(dest)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return time.perf_counter() - t0, out.stdout.split()[0], _children_cpu() - c0


def real_smoke(state: Path, name: str = MODEL) -> dict[str, Any]:
    """Time the real sandboxed smoke run (``default_smoke``) of the installed release."""
    from ota.client import _slots
    from ota.client._install import default_smoke
    from ota.errors import OtaError

    mdir = _slots.model_dir(state, name)
    slot = _slots.current_slot(mdir)
    rel = _slots.read_release(mdir, slot) if slot else None
    if slot is None or rel is None or rel.smoke is None:
        return {"error": "no installed release with a smoke spec"}
    bundle, spec = _slots.slot_path(mdir, slot), rel.smoke
    try:
        secs, report = timed(
            lambda: default_smoke(bundle / rel.model_path, bundle, spec, tier="default")
        )
    except OtaError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    to_dict = getattr(report, "to_dict", None)
    return {"seconds": round(secs, 3), "report": to_dict() if callable(to_dict) else str(report)}


# -- the benchmark --------------------------------------------------------------------------

PATHS = ("ours", "stock", "curl")


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def run(size_mb: int, repeat: int, workdir: Path, with_smoke: bool = True) -> dict[str, Any]:
    t0 = time.perf_counter()
    load_before = environment()["loadavg"]
    log(f"building a {size_mb} MB model")
    model = build_model(workdir / "model" / "model.onnx", size_mb)
    size = model.stat().st_size
    warm_up_device(workdir)
    compile_project()
    repo = Repo.create(workdir / "ours")
    log("publishing 1.0.0")
    repo.publish(model, "1.0.0")
    raw_rel = "targets/bench-raw/model.onnx"  # the raw file, served by the same server
    (repo.root_dir / raw_rel).parent.mkdir(parents=True, exist_ok=True)
    if not (repo.root_dir / raw_rel).exists():
        os.link(model, repo.root_dir / raw_rel)
    stock_root = build_stock_repo(workdir / "stock-repo", model)
    (workdir / "stock-root.json").write_bytes(stock_root)
    want = sha256_file(model)

    rounds: list[dict[str, Any]] = []
    smoke: dict[str, Any] = {}
    with (
        serve_counting(repo.root_dir) as (url, hits),
        serve_counting(workdir / "stock-repo") as (stock_url, _),
    ):
        for i in range(max(1, repeat)):
            rnd: dict[str, Any] = {"loadavg": environment()["loadavg"]}
            order = PATHS[i % 3 :] + PATHS[: i % 3]  # each path goes first in turn
            for path in order:
                drop_dirty_pages()
                if path == "ours":
                    state = init_dev(workdir / "dev", url, repo.trusted_root)
                    hits.reset()
                    doc = _child(["ours", str(state)])
                    rnd["ours_s"], rnd["ours_work_s"] = doc["process_s"], doc["work_s"]
                    rnd["ours_cpu_s"] = doc["cpu_s"]
                    rnd["ours_requests"] = doc["requests"]
                    rnd["ours_peak_rss_mb"] = doc["peak_rss_mb"]
                    rnd["ours_served"] = hits.summary()
                    if with_smoke and i == max(1, repeat) - 1:
                        log("real smoke run (timed apart)")
                        smoke = real_smoke(state)
                    shutil.rmtree(state, ignore_errors=True)
                elif path == "stock":
                    work = workdir / "stock-client"
                    doc = _child(["stock", stock_url, str(workdir / "stock-root.json"),
                                  str(work), "model.onnx"])  # fmt: skip
                    if sha256_file(work / "slot" / "model.onnx") != want:
                        raise RuntimeError("stock python-tuf wrote other bytes")
                    rnd["stock_s"], rnd["stock_work_s"] = doc["process_s"], doc["work_s"]
                    rnd["stock_cpu_s"] = doc["cpu_s"]
                    rnd["stock_steps_s"] = doc["steps"]
                    rnd["stock_peak_rss_mb"] = doc["peak_rss_mb"]
                    shutil.rmtree(work, ignore_errors=True)
                else:
                    dest = workdir / "curl" / "model.onnx"
                    secs, digest, cpu = curl_openssl_sync(f"{url}/{raw_rel}", dest)
                    if digest != want:
                        raise RuntimeError("curl fetched other bytes")
                    rnd["curl_s"], rnd["curl_cpu_s"] = round(secs, 4), round(cpu, 4)
                    shutil.rmtree(dest.parent, ignore_errors=True)
            rnd["ratio_stock"] = ratio(rnd["ours_s"], rnd["stock_s"])
            rnd["ratio_curl"] = ratio(rnd["ours_s"], rnd["curl_s"])
            rnd["ratio_stock_work"] = ratio(rnd["ours_work_s"], rnd["stock_work_s"])
            rounds.append(rnd)
            log(
                f"round {i + 1}: ours {rnd['ours_s']:.2f}s stock {rnd['stock_s']:.2f}s"
                f" curl {rnd['curl_s']:.2f}s (load {rnd['loadavg'][0]})"
            )

    # An in-process update, only to split ours into phases (not compared with anything).
    state = init_dev(workdir / "dev", url, repo.trusted_root)
    with serve_counting(repo.root_dir) as (url2, _):
        state = init_dev(workdir / "dev", url2, repo.trusted_root)
        timer = update_phases()
        try:
            phased_s, _result = timed(lambda: update(state))
        finally:
            timer.restore()
    shutil.rmtree(state, ignore_errors=True)
    r_stock = _spread([r["ratio_stock"] for r in rounds])
    r_curl = _spread([r["ratio_curl"] for r in rounds])
    return {
        "benchmark": "device_update",
        "size_mb": size_mb,
        "model_bytes": size,
        "repeat": repeat,
        "rounds": rounds,
        "seconds": {k: _spread([r[f"{k}_s"] for r in rounds]) for k in PATHS},
        "cpu_seconds": {k: _spread([r[f"{k}_cpu_s"] for r in rounds]) for k in PATHS},
        "ratio_stock": r_stock,
        "ratio_curl": r_curl,
        "ratio_stock_work": _spread([r["ratio_stock_work"] for r in rounds]),
        "goal_stock": GOAL_STOCK,
        "goal_curl": GOAL_CURL,
        "goal_stock_met": r_stock["median"] <= GOAL_STOCK,
        "goal_curl_met": r_curl["median"] <= GOAL_CURL,
        "ours_requests": rounds[-1]["ours_requests"],
        "peak_rss_mb": {
            k: _spread([r[f"{k}_peak_rss_mb"] for r in rounds]) for k in ("ours", "stock")
        },
        "ours_served": rounds[-1]["ours_served"],
        "ours_phases_s": timer.breakdown(phased_s, UPDATE_PHASES),
        "ours_phased_s": round(phased_s, 4),
        "smoke": smoke,
        "loadavg_before": load_before,
        "environment": environment(),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def render(doc: dict[str, Any]) -> str:
    sec = doc["seconds"]
    names = {
        "ours": "ours: ota update_once, fresh process (no smoke)",
        "stock": "stock python-tuf download_target(filepath=), fresh process",
        "curl": "curl + openssl dgst -sha256 + sync",
    }
    cpu = doc["cpu_seconds"]
    rows = [
        [names[k], sec[k]["median"], sec[k]["min"], sec[k]["max"],
         round(doc["model_bytes"] / sec[k]["median"] / 2**20, 1), cpu[k]["median"]]
        for k in PATHS
    ]  # fmt: skip
    rs, rc = doc["ratio_stock"], doc["ratio_curl"]
    out = [
        table(
            f"device_update: {mb(doc['model_bytes'])} MiB model, {doc['repeat']} rounds"
            f" (server: {doc.get('server', '?')})",
            ["path", "median s", "min s", "max s", "MiB/s (median)", "CPU s (median)"],
            rows,
        ),
        "",
        f"ours / stock per round: median {rs['median']:.3f} ({rs['min']:.3f}-{rs['max']:.3f}),"
        f" goal <= {doc['goal_stock']}: {'met' if doc['goal_stock_met'] else 'NOT met'}",
        f"ours / curl+openssl+sync per round: median {rc['median']:.3f}"
        f" ({rc['min']:.3f}-{rc['max']:.3f}), goal <= {doc['goal_curl']}:"
        f" {'met' if doc['goal_curl_met'] else 'NOT met'}",
        f"ours / stock after imports (work only): median {doc['ratio_stock_work']['median']:.3f}",
        f"peak RSS (VmHWM, MiB, median): ours {doc['peak_rss_mb']['ours']['median']},"
        f" stock {doc['peak_rss_mb']['stock']['median']}",
        f"load average per round: {[r['loadavg'][0] for r in doc['rounds']]}",
        "",
    ]
    phases = [*UPDATE_PHASES, "other"]
    out.append(
        table(
            f"phases of one in-process update ({doc['ours_phased_s']:.3f} s, not compared)",
            phases,
            [[doc["ours_phases_s"][p] for p in phases]],
        )
    )
    s = doc["ours_served"]
    if s["requests"]:
        out.append(f"served for our update: {s['requests']} requests ({s['blob_requests']} blobs)")
    else:
        out.append(f"our update made {doc['ours_requests']} requests (counted by the client)")
    sm = doc["smoke"]
    if sm:
        if "error" in sm:
            out.append(f"real smoke (apart): {sm['error']}")
        else:
            out.append(f"real smoke (apart, sandboxed subprocess): {sm['seconds']:.2f}s")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "device_update")
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument(
        "--server",
        choices=("thread", "process", "nginx"),
        default=None,
        help="ota serve in this process (counts requests), ota serve in its own process, or"
        " nginx serving the folder (tests.nginx: a real static server, as in production);"
        " default: nginx when installed, else thread",
    )
    parser.add_argument("--repeat", type=int, default=5, help="rounds (best and median kept)")
    parser.add_argument(
        "--no-smoke", action="store_true", help="skip the real smoke run measured apart"
    )
    parser.add_argument("--child", nargs="+", default=None, help="internal: a measured child")
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child[0], args.child[1:])
        return
    if args.server is None:
        from tests import nginx

        args.server = "nginx" if nginx.available() else "thread"
    before = os.environ.get("OTA_BENCH_SERVER")
    os.environ["OTA_BENCH_SERVER"] = args.server
    try:
        with scratch_dir(args.workdir) as work:
            doc = run(args.size_mb, args.repeat, work, with_smoke=not args.no_smoke)
    finally:
        if before is None:
            del os.environ["OTA_BENCH_SERVER"]
        else:
            os.environ["OTA_BENCH_SERVER"] = before
    doc["server"] = args.server
    emit(doc, render(doc), args.json)


if __name__ == "__main__":
    main()
