"""Device update speed: ``ota.client.update_once`` of a large model over loopback HTTP.

A model of ``--size-mb`` (``tests.onnx_models.big_mlp``) is published as 1.0.0 into a local
repository, served with ``ota serve``'s app (``tests.repo_helpers.serve_dir``'s server, with a
WSGI wrapper that counts requests and body bytes at the server). For each of ``--repeat``
rounds, from a freshly initialised device (health timeout 0, so the release is confirmed at
once), the same bytes are fetched three ways:

* **ours**: :func:`ota.client.update_once` - TUF refresh, manifest and signer list through TUF,
  every chunk fetched and verified while it streams, files assembled, hashed and fsynced in the
  staging folder, the bundle's model-signing signature verified (the default verifier), the
  slot installed and switched. The smoke step is a seam that returns at once (``no_smoke``);
  the real sandboxed smoke run of the installed model is timed apart, once;
* **raw**: one streaming GET of the model file served by the same server, sha256 over the
  blocks while they are written to disk, then ``fsync`` of the file and its folder;
* **stock**: python-tuf's ``ngclient.Updater`` against a separate minimal TUF repository
  (python-tuf's Metadata API: root, timestamp, snapshot and targets, one ECDSA key, the raw model
  as its only target), served the same way: ``refresh`` + ``get_targetinfo`` +
  ``download_target`` + a copy into a slot folder with ``fsync``.

Dirty pages are flushed (untimed) before each timed step; imports are paid by a tiny untimed
update first. Figures: best ours / best raw (goal <= 1.25) and best ours / best stock (goal < 1),
with ours broken into phases by wrapping the client's functions from outside.

Run: ``python -m bench.device_update [--json] [--size-mb 256] [--repeat 3]``.

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
    quiet_http_logs,
    ratio,
    scratch_dir,
    table,
    timed,
)
from bench.publish_speed import sha256_file

GOAL_RAW = 1.25
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
                    os.posix_fadvise(out.fileno(), flushed, done - flushed,
                                     os.POSIX_FADV_DONTNEED)
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
    """Baseline: python-tuf's stock Updater from an empty metadata folder: refresh,
    get_targetinfo, download_target, then a copy into a slot folder (fsync of the file and
    its folder). Returns the seconds of each step."""
    from tests.repo_helpers import stock_updater

    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    up = stock_updater(base_url, trusted_root, work)
    up.refresh()
    info = up.get_targetinfo(target)
    if info is None:
        raise RuntimeError(f"stock repository has no target {target}")
    t1 = time.perf_counter()
    path = up.download_target(info)
    t2 = time.perf_counter()
    slot = work / "slot"
    slot.mkdir()
    placed = slot / target
    shutil.copyfile(path, placed)
    with placed.open("rb+") as fh:
        os.fsync(fh.fileno())
    fsync_path(slot)
    t3 = time.perf_counter()
    return {
        "refresh": t1 - t0,
        "download_target": t2 - t1,
        "copy_into_place": t3 - t2,
        "total": t3 - t0,
    }


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


def run(size_mb: int, repeat: int, workdir: Path, with_smoke: bool = True) -> dict[str, Any]:
    t0 = time.perf_counter()
    log(f"building a {size_mb} MB model")
    model = build_model(workdir / "model" / "model.onnx", size_mb)
    size = model.stat().st_size
    warm_up_device(workdir)
    repo = Repo.create(workdir / "ours")
    log("publishing 1.0.0")
    repo.publish(model, "1.0.0")
    raw_rel = "targets/bench-raw/model.onnx"  # the raw file, served by the same server
    (repo.root_dir / raw_rel).parent.mkdir(parents=True, exist_ok=True)
    if not (repo.root_dir / raw_rel).exists():
        os.link(model, repo.root_dir / raw_rel)
    stock_root = build_stock_repo(workdir / "stock-repo", model)
    want = sha256_file(model)

    rounds: list[dict[str, Any]] = []
    smoke: dict[str, Any] = {}
    with (
        serve_counting(repo.root_dir) as (url, hits),
        serve_counting(workdir / "stock-repo") as (stock_url, stock_hits),
    ):
        for i in range(max(1, repeat)):
            # raw GET
            dest = workdir / "raw" / "model.onnx"
            shutil.rmtree(dest.parent, ignore_errors=True)
            drop_dirty_pages()
            raw_s, digest = timed(lambda d=dest: raw_get(f"{url}/{raw_rel}", d))  # type: ignore[misc]
            if digest != want:
                raise RuntimeError("raw GET returned other bytes")
            shutil.rmtree(dest.parent, ignore_errors=True)
            drop_dirty_pages()
            raw_wb_s, digest = timed(
                lambda d=dest: raw_get(f"{url}/{raw_rel}", d, writeback=True)  # type: ignore[misc]
            )
            if digest != want:
                raise RuntimeError("raw GET returned other bytes")
            shutil.rmtree(dest.parent, ignore_errors=True)

            # ours
            state = init_dev(workdir / "dev", url, repo.trusted_root)
            drop_dirty_pages()
            hits.reset()
            timer = update_phases()
            try:
                ours_s, result = timed(lambda s=state: update(s))  # type: ignore[misc]
            finally:
                timer.restore()
            served = hits.summary()
            if with_smoke and i == max(1, repeat) - 1:
                log("real smoke run (timed apart)")
                smoke = real_smoke(state)
            shutil.rmtree(state, ignore_errors=True)

            # stock python-tuf
            drop_dirty_pages()
            stock_hits.reset()
            stock = stock_update(stock_url, stock_root, workdir / "stock-client", "model.onnx")
            stock_served = stock_hits.summary()
            shutil.rmtree(workdir / "stock-client", ignore_errors=True)

            stage = result.outcomes[0].figures.get("stage", {})
            rounds.append(
                {
                    "raw_s": round(raw_s, 4),
                    "raw_writeback_s": round(raw_wb_s, 4),
                    "ours_s": round(ours_s, 4),
                    "stock_s": round(stock["total"], 4),
                    "stock_steps_s": {k: round(v, 4) for k, v in stock.items() if k != "total"},
                    "ours_phases_s": timer.breakdown(ours_s, UPDATE_PHASES),
                    "ours_served": served,
                    "ours_client": {"requests": result.requests, "bytes": result.bytes},
                    "ours_stage": stage,
                    "stock_served": stock_served,
                }
            )
            log(f"round {i + 1}: raw {raw_s:.2f}s ours {ours_s:.2f}s stock {stock['total']:.2f}s")

    best_raw = min(r["raw_s"] for r in rounds)
    best_raw_wb = min(r["raw_writeback_s"] for r in rounds)
    med = {k: statistics.median(r[k] for r in rounds) for k in ("raw_s", "ours_s", "stock_s")}
    best = min(rounds, key=lambda r: r["ours_s"])
    best_stock = min(rounds, key=lambda r: r["stock_s"])
    r_raw = ratio(best["ours_s"], best_raw)
    r_stock = ratio(best["ours_s"], best_stock["stock_s"])
    return {
        "benchmark": "device_update",
        "size_mb": size_mb,
        "model_bytes": size,
        "repeat": repeat,
        "rounds": rounds,
        "raw_s": best_raw,
        "ours_s": best["ours_s"],
        "stock_s": best_stock["stock_s"],
        "stock_steps_s": best_stock["stock_steps_s"],
        "ratio_raw": r_raw,
        "raw_writeback_s": best_raw_wb,
        "ratio_raw_writeback": ratio(best["ours_s"], best_raw_wb),
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "median_ratio_raw": ratio(med["ours_s"], med["raw_s"]),
        "median_ratio_stock": ratio(med["ours_s"], med["stock_s"]),
        "ratio_stock": r_stock,
        "goal_raw": GOAL_RAW,
        "goal_raw_met": r_raw <= GOAL_RAW,
        "goal_stock_met": r_stock < 1.0,
        "raw_mb_per_s": round(size / best_raw / 2**20, 1),
        "ours_mb_per_s": round(size / best["ours_s"] / 2**20, 1),
        "stock_mb_per_s": round(size / best_stock["stock_s"] / 2**20, 1),
        "ours_phases_s": best["ours_phases_s"],
        "ours_served": best["ours_served"],
        "smoke": smoke,
        "environment": environment(),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def render(doc: dict[str, Any]) -> str:
    rows = [
        ["raw GET + sha256 + fsync", doc["raw_s"], 1.0, doc["raw_mb_per_s"]],
        [
            "raw, with our writeback hint",
            doc["raw_writeback_s"],
            ratio(doc["raw_writeback_s"], doc["raw_s"]),
            round(doc["model_bytes"] / doc["raw_writeback_s"] / 2**20, 1),
        ],
        ["ours: update_once (no smoke)", doc["ours_s"], doc["ratio_raw"], doc["ours_mb_per_s"]],
        [
            "stock python-tuf + copy",
            doc["stock_s"],
            ratio(doc["stock_s"], doc["raw_s"]),
            doc["stock_mb_per_s"],
        ],
    ]
    out = [
        table(
            f"device_update: {mb(doc['model_bytes'])} MiB model over loopback HTTP,"
            f" best of {doc['repeat']}",
            ["path", "seconds", "/ raw", "MB/s"],
            rows,
        ),
        "",
        f"ours / raw = {doc['ratio_raw']:.3f} (goal <= {GOAL_RAW}:"
        f" {'met' if doc['goal_raw_met'] else 'NOT met'});"
        f" ours / stock = {doc['ratio_stock']:.3f} (goal < 1:"
        f" {'met' if doc['goal_stock_met'] else 'NOT met'})",
        f"medians over {len(doc['rounds'])} rounds: ours / raw = {doc['median_ratio_raw']:.3f},"
        f" ours / stock = {doc['median_ratio_stock']:.3f}; ours / raw-with-writeback-hint ="
        f" {doc['ratio_raw_writeback']:.3f} (best)",
        "",
    ]
    phases = [*UPDATE_PHASES, "other"]
    out.append(
        table(
            "phases of the best update (seconds; /raw = ratio to the raw GET)",
            ["", *phases],
            [
                ["s", *(doc["ours_phases_s"][p] for p in phases)],
                ["/raw", *(ratio(doc["ours_phases_s"][p], doc["raw_s"]) for p in phases)],
            ],
        )
    )
    s = doc["ours_served"]
    out.append("")
    out.append(
        f"served for our update: {s['requests']} requests, {mb(s['body_bytes'])} MiB"
        f" ({s['blob_requests']} blobs, {s['metadata_requests']} metadata,"
        f" {s['target_requests']} targets)"
    )
    st = doc["stock_steps_s"]
    out.append(
        f"stock steps: refresh {st['refresh']:.3f}s, download_target"
        f" {st['download_target']:.3f}s, copy into place {st['copy_into_place']:.3f}s"
    )
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
    args = parser.parse_args(argv)
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
