"""Publish speed and memory: ``ota publish`` of a large model vs copying and hashing it.

Two measurements per round (``--repeat`` rounds, interleaved, load average recorded):

* **cli** (local folder, the issue 13 figure): the baseline is ``cp`` of the model into the
  storage's file system, ``openssl dgst -sha256`` of it and ``sync``, three commands timed
  together; the publish is a fresh ``ota publish`` process (``init`` untimed) timed from spawn to
  exit, imports, checks, golden run and commit included, and its peak RSS is the child's own
  ``VmHWM``, which it reads at exit (``python -m ota.cli`` under a two-line ``atexit`` hook).
* **in-process** (each ``--storage``): the publish in a warm process with its phases timed
  (:func:`bench._common.publish_phases`) and the peak RSS seen during each phase (``VmRSS``
  sampled every 5 ms), so the golden run is reported apart; baselines as before (file: copy +
  sha256 + fsync in Python; S3: sha256 + boto3 ``upload_file``).

Both checkouts' own modules are compiled to bytecode first, as a wheel install does
(:func:`compile_project`). Dirty pages are flushed (untimed) before each timed step. Each
figure is the median of the per-round ratios with its spread (min-max); nothing is best-of.
The RSS goal is ``1.3 x model + 200 MB``.

With ``--compare-python PYTHON`` (another checkout's venv interpreter, e.g. main's), each round
also runs that checkout's fresh ``ota publish`` beside ours, the order rotated per round: a
before/after figure from the same rounds and the same baseline.

Run: ``python -m bench.publish_speed [--json] [--size-mb 256] [--repeat 5] [--storage file]
[--external] [--compare-python /work/main/.venv/bin/python]``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from bench._common import (
    PUBLISH_PHASES,
    base_parser,
    drop_dirty_pages,
    emit,
    environment,
    import_cost,
    log,
    mb,
    peak_rss_mb,
    publish_phases,
    quiet_http_logs,
    ratio,
    reset_peak_rss,
    scratch_dir,
    table,
    timed,
    warm_up,
)

GOAL = 1.3  # in-process publish / Python copy + hash baseline (issue 2)
GOAL_CLI = 2.5  # `ota publish` / cp + openssl dgst -sha256 + sync (issue 13)
RSS_FACTOR, RSS_EXTRA_MB = 1.3, 200.0  # peak RSS goal: 1.3 x model + 200 MB (issue 13)
_BLOCK = 1 << 20
_SAMPLE_S = 0.005


def build_model(folder: Path, size_mb: int, *, external: bool = False) -> Path:
    """``tests.onnx_models.big_mlp(size_mb)`` saved once as ``folder/model.onnx``; with
    ``external``, an MLP of the same shape written layer by layer with its weights in
    ``model.onnx.data`` beside it (ONNX external data; never whole in memory, so 4 GB works)."""
    from tests.onnx_models import big_mlp, save

    path = folder / "model.onnx"
    if not path.exists():
        if external:
            build_external_mlp(path, size_mb)
        else:
            save(big_mlp(size_mb), path)
    return path


def build_external_mlp(path: Path, size_mb: int, *, layers: int = 8, seed: int = 0) -> None:
    """``layers`` square Gemm + Relu layers of about ``size_mb`` MB of float32 weights in
    total, weights streamed to ``<path>.data`` in 64 MiB blocks (offsets page-aligned)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    width = int((size_mb * 2**20 // 4 // layers) ** 0.5)
    rng = np.random.default_rng(seed)
    data_name = path.name + ".data"
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    rows_per_block = max(1, (64 << 20) // (4 * width))
    with open(path.with_name(data_name), "wb") as out:

        def tensor(name: str, dims: list[int], write: Callable[[], object]) -> None:
            out.seek((out.tell() + 4095) // 4096 * 4096)
            offset = out.tell()
            write()
            t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims)
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", offset),
                         ("length", out.tell() - offset)):  # fmt: skip
                t.external_data.add(key=k, value=str(v))
            inits.append(t)

        def weights() -> None:
            for start in range(0, width, rows_per_block):
                n = min(rows_per_block, width - start)
                block = rng.standard_normal((n, width), dtype=np.float32) / np.float32(width**0.5)
                out.write(block.tobytes())

        prev = "x"
        for i in range(layers):
            tensor(f"w{i}", [width, width], weights)
            tensor(f"b{i}", [width], lambda: out.write(np.zeros(width, np.float32).tobytes()))
            nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"h{i}"]))
            last = i == layers - 1
            nodes.append(helper.make_node("Relu", [f"h{i}"], ["y" if last else f"r{i}"]))
            prev = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path.write_bytes(model.SerializeToString())


def model_bytes(model: Path) -> int:
    """The model file plus its external-data files (``<name>.data`` beside it)."""
    data = model.with_name(model.name + ".data")
    return model.stat().st_size + (data.stat().st_size if data.exists() else 0)


def median(values: list[float]) -> float:
    return round(statistics.median(values), 4) if values else float("nan")


def spread(values: list[float]) -> list[float]:
    return [round(min(values), 4), round(max(values), 4)] if values else []


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def raw_copy(source: Path, dest: Path) -> str:
    """Baseline for file storage: copy + hash in one pass, then fsync file and folder."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with source.open("rb") as src, dest.open("wb") as out:
        while block := src.read(_BLOCK):
            h.update(block)
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return h.hexdigest()


def raw_copy_model(model: Path, dest: Path) -> str:
    """:func:`raw_copy` of the model and of its external data (``<name>.data``) if any."""
    digest = raw_copy(model, dest)
    data = model.with_name(model.name + ".data")
    if data.exists():
        raw_copy(data, dest.with_name(data.name))
    return digest


def raw_upload(client: Any, source: Path, bucket: str) -> str:
    """Baseline for S3: sha256 over the file, then boto3 ``upload_file`` (its defaults)."""
    digest = sha256_file(source)
    client.upload_file(str(source), bucket, "model.onnx")
    return digest


@contextlib.contextmanager
def s3_endpoint(*, out_of_process: bool = False) -> Iterator[str]:
    """moto's S3 server (``tests.s3server.S3Server``) on 127.0.0.1 with fake credentials in the
    environment for the duration; yields the endpoint URL. ``out_of_process`` runs the server in
    its own process, as a real S3 endpoint would be, so it does not share the GIL with us."""
    from tests.s3server import S3Server, s3_env

    quiet_http_logs()
    if out_of_process:
        with _external_s3() as url:
            saved = dict(os.environ)
            os.environ.update(s3_env(url))
            try:
                yield url
            finally:
                os.environ.clear()
                os.environ.update(saved)
        return
    server = S3Server()
    server.start()
    saved = dict(os.environ)
    os.environ.update(s3_env(server.url))
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(name, None)
    try:
        yield server.url
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.stop()


@contextlib.contextmanager
def _external_s3() -> Iterator[str]:
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.s3server"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = ""
        for line in proc.stdout:
            if "AWS_ENDPOINT_URL=" in line:
                url = line.strip().split("=", 1)[1]
                break
        if not url:
            raise RuntimeError("the S3 server did not start")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def _empty_bucket(client: Any, bucket: str) -> None:
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})


def children_cpu_s() -> float:
    """User + system CPU seconds of every waited-for child so far (deltas time one child):
    under load, wall time is mostly waiting for a core, CPU time is what the work costs."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def cp_openssl_sync(model: Path, dest_dir: Path) -> float:
    """Baseline of the cli figure: ``cp`` the model (and its external data) into ``dest_dir``,
    ``openssl dgst -sha256`` the copies, ``sync``; wall seconds of the three together."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    sources = [model, *([d] if (d := model.with_name(model.name + ".data")).exists() else [])]
    global _last_baseline_cpu_s  # noqa: PLW0603 - a side figure, read right after the call
    cpu0 = children_cpu_s()
    t0 = time.perf_counter()
    subprocess.run(["cp", *map(str, sources), str(dest_dir)], check=True)
    subprocess.run(
        ["openssl", "dgst", "-sha256", *(str(dest_dir / p.name) for p in sources)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    subprocess.run(["sync"], check=True)
    secs = time.perf_counter() - t0
    _last_baseline_cpu_s = children_cpu_s() - cpu0
    return secs


_last_baseline_cpu_s = 0.0


# What a publish imports, in a fresh interpreter: bench._common.import_cost's set plus the
# bundle signer: ota.signing._light_sign since issue 13's second pass (no model_signing), or
# model_signing.signing in a checkout without it (a --compare-python "before").
_PUBLISH_IMPORTS = (
    "import ota.repository, ota.repository._golden, ota.repository._model_checks, "
    "ota.signing, ota.sbom._mlbom, onnxruntime\n"
    "try:\n    import ota.signing._light_sign\n"
    "except ImportError:\n    import model_signing.signing\n"
    "from ota.sbom._schema import _strict_validator; _strict_validator()"
)


def cold_imports(pythons: dict[str, str], rounds: int = 7) -> dict[str, Any]:
    """Wall and CPU seconds of :data:`_PUBLISH_IMPORTS` in a fresh interpreter, minus those of
    ``python -c pass``, for each named interpreter (checkouts), rounds alternating in rotated
    order; medians with spread and the load average."""

    def child(py: str, code: str) -> tuple[float, float]:
        cpu0 = children_cpu_s()
        t0 = time.perf_counter()
        subprocess.run([py, "-c", code], check=True, cwd=_NEUTRAL_CWD)
        return time.perf_counter() - t0, children_cpu_s() - cpu0

    got: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in pythons}
    loads: list[float] = []
    for i in range(rounds):
        loads.append(loadavg()[0])
        names = list(pythons) if i % 2 == 0 else list(pythons)[::-1]
        for name in names:
            wall, cpu = child(pythons[name], _PUBLISH_IMPORTS)
            wall0, cpu0 = child(pythons[name], "pass")
            got[name]["wall"].append(wall - wall0)
            got[name]["cpu"].append(cpu - cpu0)
    out: dict[str, Any] = {"rounds": rounds, "loadavg_1min": spread(loads)}
    for name, v in got.items():
        out[name] = {
            "wall_s": median(v["wall"]),
            "wall_spread": spread(v["wall"]),
            "cpu_s": median(v["cpu"]),
            "cpu_spread": spread(v["cpu"]),
        }
    return out


def _ota() -> list[str]:
    exe = Path(sys.executable).with_name("ota")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "ota.cli"]


# `ota` run as `python -m ota.cli`, writing its own VmHWM to $BENCH_VMHWM at exit, plus the
# largest peak RSS among its own children (the chunking child, ota.repository._chunkjob): the
# figure is their sum, an upper bound of the two processes' peak together. The benchmark's
# figures cannot be used: ru_maxrss from wait4 starts at the parent's high-water mark when the
# child is spawned with vfork (exec records the old mm's), so a benchmark process holding 500 MB
# would make every child look 500 MB large (the same holds one level down: the chunking child
# is started while `ota` is still small, and its figure may include up to `ota`'s size then).
_CLI_WITH_VMHWM = """
import atexit, os, resource, runpy, sys
def _report():
    with open("/proc/self/status") as f:
        hwm = int(next((line.split()[1] for line in f if line.startswith("VmHWM:")), "0"))
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    with open(os.environ["BENCH_VMHWM"], "w") as out:
        out.write(f"{hwm} {kids}")
atexit.register(_report)
sys.argv = ["ota", *sys.argv[1:]]
runpy.run_module("ota.cli", run_name="__main__", alter_sys=True)
"""


# Working directory of the fresh `ota` children: not a checkout. `python -c` and `python -m` put
# the working directory first on sys.path, so from a checkout the compared interpreter would
# import `ota` and `ota.cli` from *that* checkout and the rest (`ota.repository`, ...) from its
# own editable install: a mix of both.
_NEUTRAL_CWD = tempfile.gettempdir()


def compile_project(python: str) -> None:
    """Write the bytecode of the packages of the checkout that ``python`` runs (``__pycache__``,
    git-ignored), as installing the wheel does. This machine sets ``PYTHONDONTWRITEBYTECODE``,
    so a fresh ``ota publish`` from an editable checkout otherwise compiles about 60 of our
    modules from source at every start (0.08-0.12 s of CPU measured, issue 13), which an
    installed ``ota`` never does; site-packages has its bytecode either way."""
    code = (
        "import compileall, importlib\n"
        "for name in ('ota', 'ota.repository', 'ota.client', 'ota.signing', 'ota.sbom'):\n"
        "    for path in importlib.import_module(name).__path__:\n"
        "        compileall.compile_dir(path, quiet=1)\n"
    )
    subprocess.run([python, "-c", code], check=True, stdout=subprocess.DEVNULL, cwd=_NEUTRAL_CWD)


def cli_publish(model: Path, work: Path, i: int, python: str | None = None) -> dict[str, Any]:
    """One fresh ``ota publish`` process into a new local-folder repository (``ota init``
    untimed). Returns its wall seconds and its own peak RSS (``VmHWM`` read by the child at
    exit, see ``_CLI_WITH_VMHWM``). ``python``: another checkout's interpreter (its venv's
    ``ota``), for a before/after comparison in the same rounds; default this one."""
    python = python or sys.executable
    tag = "" if python == sys.executable else "b"
    proj, repo = work / f"cli-proj-{i}{tag}", work / f"cli-repo-{i}{tag}"
    init = _ota() if python == sys.executable else [python, "-m", "ota.cli"]
    subprocess.run(
        [*init, "init", "--project", str(proj), "--bins", "16", str(repo)],
        check=True,
        stdout=subprocess.DEVNULL,
        cwd=_NEUTRAL_CWD,
    )
    cmd = [python, "-c", _CLI_WITH_VMHWM, "publish", "--project", str(proj)]
    cmd += ["--name", "bench-model", "--version", "1.0.0", "--json", str(model)]
    hwm_file = work / f"vmhwm-{i}{tag}"
    env = dict(os.environ, BENCH_VMHWM=str(hwm_file))
    drop_dirty_pages()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        cpu0 = children_cpu_s()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=out, stderr=err, env=env, check=False, cwd=_NEUTRAL_CWD)
        secs = time.perf_counter() - t0
        cpu = children_cpu_s() - cpu0
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"ota publish failed ({proc.returncode}): {err.read()[-2000:]!r}")
        out.seek(0)
        result = json.loads(out.read())
    own_kib, child_kib = (int(v) for v in [*hwm_file.read_text().split(), "0", "0"][:2])
    vmhwm_kib = own_kib + child_kib
    hwm_file.unlink()
    shutil.rmtree(proj, ignore_errors=True)
    shutil.rmtree(repo, ignore_errors=True)
    return {
        "publish_s": round(secs, 4),
        "cpu_s": round(cpu, 3),
        "vmhwm_mb": round(vmhwm_kib / 1024, 1),  # ota's own VmHWM + its largest child's
        "child_maxrss_mb": round(child_kib / 1024, 1),
        "bytes_uploaded": result.get("upload", {}).get("bytes_uploaded"),
        # ADR 0017: the file blob is counted apart (a checkout before it reports no such key)
        "file_blob_bytes": result.get("upload", {}).get("file_blob_bytes"),
    }


@contextlib.contextmanager
def phase_rss() -> Iterator[dict[str, float]]:
    """Peak ``VmRSS`` (MiB, sampled every 5 ms) while each publish phase runs, by wrapping the
    functions ``ota.repository.publish`` calls (phases may overlap: the golden run and the
    model card run beside the chunking). Yields the dict it fills."""
    import ota.repository._golden as golden
    import ota.repository._model_checks as checks
    import ota.repository._publish as pub

    peaks: dict[str, float] = {}
    active: set[str] = set()
    lock = threading.Lock()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            rss = _vmrss_mb()
            with lock:
                for p in active:
                    peaks[p] = max(peaks.get(p, 0.0), rss)
            stop.wait(_SAMPLE_S)

    undo: list[tuple[object, str, Any]] = []

    def wrap(owner: object, attr: str, phase: str) -> None:
        original = getattr(owner, attr)

        def run(*args: Any, **kwargs: Any) -> Any:
            with lock:
                active.add(phase)
                peaks[phase] = max(peaks.get(phase, 0.0), _vmrss_mb())
            try:
                return original(*args, **kwargs)
            finally:
                with lock:
                    peaks[phase] = max(peaks.get(phase, 0.0), _vmrss_mb())
                    active.discard(phase)

        undo.append((owner, attr, original))
        setattr(owner, attr, run)

    wrap(checks, "check_model", "checks")
    wrap(pub, "chunk_file", "chunk_upload")
    wrap(pub, "_chunk_in_child", "chunk_upload")  # this process only: the child is apart
    wrap(golden, "make_smoke_files", "smoke_golden")
    wrap(pub, "_model_card", "model_card")
    wrap(pub, "_sbom", "sbom")
    wrap(pub, "_finish", "sign_commit")
    sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    sampler.start()
    try:
        yield peaks
    finally:
        stop.set()
        sampler.join()
        while undo:
            owner, attr, original = undo.pop()
            setattr(owner, attr, original)


def _vmrss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def measure_storage(
    kind: str,
    model: Path,
    work: Path,
    repeat: int,
    endpoint: str | None,
    cli: bool,
    compare: str | None = None,
) -> dict[str, Any]:
    """``repeat`` interleaved rounds on one storage kind: baseline, in-process publish (phases,
    per-phase RSS) and, for ``file`` with ``cli``, cp + openssl + sync and ``ota publish``."""
    from ota.repository import Project, PublishRequest, init_project, publish

    size = model_bytes(model)
    client: Any = None
    if kind.startswith("s3"):
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint)
    rounds: list[dict[str, Any]] = []
    for i in range(max(1, repeat)):
        load_before = loadavg()
        # -- baseline --------------------------------------------------------------------
        drop_dirty_pages()
        if kind == "file":
            dest = work / f"raw-{i}" / "model.onnx"
            base_fn: Callable[[], str] = partial(raw_copy_model, model, dest)
        else:
            bucket = f"bench-raw-{uuid.uuid4().hex[:8]}"
            client.create_bucket(Bucket=bucket)
            base_fn = partial(raw_upload, client, model, bucket)

        reset_peak_rss()
        base_s, _ = timed(base_fn)
        base_rss = peak_rss_mb()
        if kind == "file":
            shutil.rmtree(work / f"raw-{i}", ignore_errors=True)
        else:
            _empty_bucket(client, bucket)
            client.delete_bucket(Bucket=bucket)

        # -- publish, in this (warm) process ---------------------------------------------
        proj_dir = work / f"proj-{kind}-{i}"
        if kind == "file":
            storage_url = str(work / f"repo-{i}")
            init_project(proj_dir, storage_url, bins=16)
        else:
            bucket = f"bench-pub-{uuid.uuid4().hex[:8]}"
            client.create_bucket(Bucket=bucket)
            init_project(proj_dir, f"s3://{bucket}/repo", s3_endpoint=endpoint, bins=16)
        project = Project.open(proj_dir)
        req = PublishRequest(source=model, name="bench-model", version="1.0.0")
        drop_dirty_pages()
        reset_peak_rss()
        with publish_phases() as timer, phase_rss() as rss:
            pub_s, result = timed(partial(publish, project, req))
        pub_rss = peak_rss_mb()
        row: dict[str, Any] = {
            "baseline_s": round(base_s, 4),
            "publish_s": round(pub_s, 4),
            "ratio": ratio(pub_s, base_s),
            "phases_s": timer.breakdown(pub_s, PUBLISH_PHASES, overlap=True),
            "phase_peak_rss_mb": {p: round(v, 1) for p, v in rss.items()},
            "upload": result.upload.to_dict(),
            "baseline_peak_rss_mb": round(base_rss, 1),
            "publish_peak_rss_mb": round(pub_rss, 1),
        }
        if kind == "file":
            shutil.rmtree(work / f"repo-{i}", ignore_errors=True)
        else:
            _empty_bucket(client, bucket)
            client.delete_bucket(Bucket=bucket)
        shutil.rmtree(proj_dir, ignore_errors=True)

        # -- cp + openssl + sync vs a fresh `ota publish` process --------------------------
        if kind == "file" and cli:
            drop_dirty_pages()
            cli_base = cp_openssl_sync(model, work / f"cp-{i}")
            shutil.rmtree(work / f"cp-{i}", ignore_errors=True)
            before: dict[str, Any] | None = None
            if compare and i % 2:  # rotate which checkout goes first
                before = cli_publish(model, work, i, compare)
            pub_cli = cli_publish(model, work, i)
            if compare and before is None:
                before = cli_publish(model, work, i, compare)
            row["cli"] = {
                "baseline_s": round(cli_base, 4),
                "baseline_cpu_s": round(_last_baseline_cpu_s, 3),
                **pub_cli,
                "ratio": ratio(pub_cli["publish_s"], cli_base),
                "golden_s": row["phases_s"]["smoke_golden"],
                "golden_over_baseline": ratio(row["phases_s"]["smoke_golden"], cli_base),
            }
            if before is not None:
                row["cli"]["before_s"] = before["publish_s"]
                row["cli"]["before_cpu_s"] = before["cpu_s"]
                row["cli"]["before_vmhwm_mb"] = before["vmhwm_mb"]
                row["cli"]["before_ratio"] = ratio(before["publish_s"], cli_base)
            log(
                f"cli round {i + 1}: cp+openssl+sync {cli_base:.2f}s, ota publish"
                f" {pub_cli['publish_s']:.2f}s, VmHWM {pub_cli['vmhwm_mb']} MiB"
                f" (of which child {pub_cli['child_maxrss_mb']} MiB)"
            )
        row["loadavg"] = [load_before, loadavg()]
        rounds.append(row)
        log(f"{kind} round {i + 1}: baseline {base_s:.2f}s publish {pub_s:.2f}s (in-process)")
    return summarize(kind, size, rounds)


def summarize(kind: str, size: int, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the per-round figures with their spread (min-max); no best-of."""
    ratios = [r["ratio"] for r in rounds]
    phases = list(rounds[0]["phases_s"])
    rss_goal = round(RSS_FACTOR * size / 2**20 + RSS_EXTRA_MB, 1)
    doc: dict[str, Any] = {
        "storage": kind,
        "model_bytes": size,
        "rounds": rounds,
        "baseline_s": median([r["baseline_s"] for r in rounds]),
        "publish_s": median([r["publish_s"] for r in rounds]),
        "ratio": median(ratios),
        "ratio_spread": spread(ratios),
        "goal": GOAL,
        "goal_met": median(ratios) <= GOAL,
        "phases_s": {p: median([r["phases_s"][p] for r in rounds]) for p in phases},
        "phase_peak_rss_mb": {
            p: max(r["phase_peak_rss_mb"].get(p, 0.0) for r in rounds)
            for p in rounds[0]["phase_peak_rss_mb"]
        },
        "upload": rounds[-1]["upload"],
        "baseline_peak_rss_mb": max(r["baseline_peak_rss_mb"] for r in rounds),
        "publish_peak_rss_mb": max(r["publish_peak_rss_mb"] for r in rounds),
        "rss_goal_mb": rss_goal,
        "loadavg_1min": spread(
            [x for r in rounds for x in (r["loadavg"][0][0], r["loadavg"][1][0])]
        ),
    }
    doc["chunk_upload_ratio"] = ratio(doc["phases_s"]["chunk_upload"], doc["baseline_s"])
    doc["golden_ratio"] = ratio(doc["phases_s"]["smoke_golden"], doc["baseline_s"])
    if all("cli" in r for r in rounds):
        cli = [r["cli"] for r in rounds]
        cr = [c["ratio"] for c in cli]
        doc["cli"] = {
            "baseline_s": median([c["baseline_s"] for c in cli]),
            "baseline_spread": spread([c["baseline_s"] for c in cli]),
            "publish_s": median([c["publish_s"] for c in cli]),
            "publish_spread": spread([c["publish_s"] for c in cli]),
            "ratio": median(cr),
            "ratio_spread": spread(cr),
            "goal": GOAL_CLI,
            "goal_met": median(cr) <= GOAL_CLI,
            "cpu_s": median([c["cpu_s"] for c in cli]),
            "cpu_spread": spread([c["cpu_s"] for c in cli]),
            "baseline_cpu_s": median([c["baseline_cpu_s"] for c in cli]),
            "golden_s": median([c["golden_s"] for c in cli]),
            "golden_spread": spread([c["golden_s"] for c in cli]),
            "golden_over_baseline": median([c["golden_over_baseline"] for c in cli]),
            "golden_over_baseline_spread": spread([c["golden_over_baseline"] for c in cli]),
            "vmhwm_mb": max(c["vmhwm_mb"] for c in cli),
            "vmhwm_spread": spread([c["vmhwm_mb"] for c in cli]),
            "rss_goal_mb": rss_goal,
            "rss_goal_met": max(c["vmhwm_mb"] for c in cli) <= rss_goal,
        }
        if all("before_s" in c for c in cli):
            br = [c["before_ratio"] for c in cli]
            doc["cli"]["before"] = {
                "publish_s": median([c["before_s"] for c in cli]),
                "publish_spread": spread([c["before_s"] for c in cli]),
                "ratio": median(br),
                "ratio_spread": spread(br),
                "vmhwm_mb": max(c["before_vmhwm_mb"] for c in cli),
                "cpu_s": median([c["before_cpu_s"] for c in cli]),
                "cpu_spread": spread([c["before_cpu_s"] for c in cli]),
                "after_over_before": median(
                    [c["publish_s"] / c["before_s"] for c in cli if c["before_s"]]
                ),
            }
    return doc


def run(
    size_mb: int,
    repeat: int,
    storages: list[str],
    workdir: Path,
    *,
    external: bool,
    cli: bool,
    compare: str | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    model_dir = workdir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    log(f"building a {size_mb} MB model{' (external data)' if external else ''}")
    model = build_model(model_dir, size_mb, external=external)
    warm_up(workdir)
    if cli:  # both checkouts as installed: with their bytecode (see compile_project)
        for python in (sys.executable, compare):
            if python:
                compile_project(python)
    results: list[dict[str, Any]] = []
    for kind in storages:
        work = workdir / kind
        work.mkdir(exist_ok=True)
        if kind in ("s3", "s3-proc"):
            with s3_endpoint(out_of_process=kind == "s3-proc") as url:
                results.append(measure_storage(kind, model, work, repeat, url, False))
        else:
            results.append(measure_storage(kind, model, work, repeat, None, cli, compare))
    return {
        "benchmark": "publish_speed",
        "size_mb": size_mb,
        "external_data": external,
        "model_bytes": model_bytes(model),
        "repeat": repeat,
        "results": results,
        "cold_import_s": import_cost(),
        # this checkout's and the compared one's, alternating (only with --compare-python)
        "cold_imports": cold_imports({"this": sys.executable, "compare": compare})
        if compare
        else None,
        "environment": environment(),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def render(doc: dict[str, Any]) -> str:
    out: list[str] = []
    size = mb(doc["model_bytes"])
    ext = " (external data)" if doc["external_data"] else ""
    for r in doc["results"]:
        if "cli" not in r:
            continue
        c = r["cli"]
        out.append(
            table(
                f"publish_speed cli: {size} MiB model{ext},"
                f" medians of {doc['repeat']} rounds [min-max], load {r['loadavg_1min']}",
                ["figure", "median", "spread", "goal", "met"],
                [
                    ["cp+openssl+sync s", c["baseline_s"], c["baseline_spread"], "", ""],
                    ["ota publish s", c["publish_s"], c["publish_spread"], "", ""],
                    ["ota publish CPU s", c["cpu_s"], c["cpu_spread"], "", ""],
                    ["cp+openssl+sync CPU s", c["baseline_cpu_s"], "", "", ""],
                    [
                        "publish / baseline",
                        c["ratio"],
                        c["ratio_spread"],
                        f"<= {GOAL_CLI}",
                        "yes" if c["goal_met"] else "NO",
                    ],
                    ["golden run s (in-process)", c["golden_s"], c["golden_spread"], "", ""],
                    [
                        "golden run / baseline",
                        c["golden_over_baseline"],
                        c["golden_over_baseline_spread"],
                        "(inside the above)",
                        "",
                    ],
                    [
                        "publish VmHWM MiB (+ child)",
                        c["vmhwm_mb"],
                        c["vmhwm_spread"],
                        f"<= {c['rss_goal_mb']}",
                        "yes" if c["rss_goal_met"] else "NO",
                    ],
                ],
            )
        )
        if "before" in c:
            b = c["before"]
            out.append(
                f"before (--compare-python): ota publish {b['publish_s']} s {b['publish_spread']},"
                f" / baseline {b['ratio']} {b['ratio_spread']}, VmHWM {b['vmhwm_mb']} MiB,"
                f" CPU {b['cpu_s']} s {b['cpu_spread']};"
                f" after / before {round(b['after_over_before'], 3)} (median per round)"
            )
        out.append("")
    rows = [
        [
            r["storage"],
            r["baseline_s"],
            r["publish_s"],
            r["ratio"],
            r["ratio_spread"],
            "yes" if r["goal_met"] else "NO",
            mb(r["upload"]["bytes_uploaded"]),
            r["publish_peak_rss_mb"],
        ]
        for r in doc["results"]
    ]
    out.append(
        table(
            f"publish_speed in-process: {size} MiB model, medians of {doc['repeat']} rounds"
            f" (goal publish/baseline <= {GOAL})",
            [
                "storage",
                "baseline s",
                "publish s",
                "ratio",
                "spread",
                "goal",
                "uploaded MiB",
                "peak RSS MiB",
            ],
            rows,
        )
    )
    phases = list(doc["results"][0]["phases_s"]) if doc["results"] else []
    prow = []
    for r in doc["results"]:
        prow.append([r["storage"], *(r["phases_s"][p] for p in phases)])
        prow.append(
            [f"{r['storage']} /base", *(ratio(r["phases_s"][p], r["baseline_s"]) for p in phases)]
        )
    out.append("")
    out.append(
        f"(warm process; a fresh `ota publish` process also pays"
        f" {doc['cold_import_s']:.2f} s of imports)"
    )
    ci = doc["cold_imports"] or {}
    for name in [k for k in ci if k not in ("rounds", "loadavg_1min")]:
        c = ci[name]
        out.append(
            f"cold imports of a publish ({name}, {ci['rounds']} rounds, load"
            f" {ci['loadavg_1min']}): wall {c['wall_s']} s {c['wall_spread']},"
            f" CPU {c['cpu_s']} s {c['cpu_spread']}"
        )
    out.append("")
    out.append(
        table(
            "publish phases, medians (seconds; /base = ratio to baseline)",
            ["storage", *phases],
            prow,
        )
    )
    for r in doc["results"]:
        out.append("")
        out.append(
            table(
                f"{r['storage']}: peak VmRSS MiB while each phase runs (goal {r['rss_goal_mb']})",
                list(r["phase_peak_rss_mb"]),
                [list(r["phase_peak_rss_mb"].values())],
            )
        )
    return "\n".join(out)


def profile_once(size_mb: int, workdir: Path, storage: str, out: Path) -> None:
    """Publish once under cProfile and dump the stats to ``out`` (diagnosis, not a figure)."""
    import cProfile
    import pstats

    from ota.repository import Project, PublishRequest, init_project, publish

    model_dir = workdir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(model_dir, size_mb)

    def go(url: str, endpoint: str | None) -> None:
        init_project(workdir / "prof-proj", url, s3_endpoint=endpoint)
        project = Project.open(workdir / "prof-proj")
        req = PublishRequest(source=model, name="bench-model", version="1.0.0")
        prof = cProfile.Profile()
        prof.runcall(publish, project, req)
        prof.dump_stats(str(out))
        pstats.Stats(str(out)).sort_stats("cumulative").print_stats(40)

    if storage == "s3":
        import boto3

        with s3_endpoint() as endpoint:
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench-prof")
            go("s3://bench-prof/repo", endpoint)
    else:
        go(str(workdir / "prof-repo"), None)


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "publish_speed")
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument(
        "--storage",
        default="file",
        help="comma list of file, s3 (moto in this process), s3-proc (moto in its own process)",
    )
    parser.add_argument(
        "--external", action="store_true", help="the model's weights as ONNX external data"
    )
    parser.add_argument(
        "--no-cli", action="store_true", help="skip the fresh `ota publish` process figure"
    )
    parser.add_argument(
        "--compare-python",
        metavar="PYTHON",
        default=None,
        help="also run each fresh `ota publish` with another checkout's interpreter (its venv),"
        " in the same rounds, order rotated: a before/after figure",
    )
    parser.add_argument(
        "--profile",
        metavar="OUT",
        default=None,
        help="instead: publish once under cProfile (first storage), dump stats",
    )
    args = parser.parse_args(argv)
    storages = [s for s in args.storage.split(",") if s]
    for s in storages:
        if s not in ("file", "s3", "s3-proc"):
            parser.error(f"unknown storage {s!r}")
    with scratch_dir(args.workdir) as work:
        if args.profile:
            profile_once(args.size_mb, work, storages[0], Path(args.profile))
            return
        doc = run(
            args.size_mb,
            args.repeat,
            storages,
            work,
            external=args.external,
            cli=not args.no_cli,
            compare=args.compare_python,
        )
    emit(doc, render(doc), args.json)


if __name__ == "__main__":
    main()
