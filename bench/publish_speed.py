"""Publish speed: ``ota publish`` of a large model vs hashing it and uploading it raw.

For each storage (a local folder; a moto S3 server on 127.0.0.1, in-process) and each of
``--repeat`` rounds, the same model file is

* baseline, file storage: copied into the storage folder in 1 MiB blocks, sha256 over the same
  blocks, then ``fsync`` of the file and its folder;
* baseline, S3: sha256 over the file, then boto3 ``upload_file`` (multipart, its defaults) to the
  same endpoint;
* published with :func:`ota.repository.publish` into a fresh repository (``init`` untimed).

Dirty pages are flushed (untimed) before each timed step, so no step pays for the last one's
writes. The figure is best publish / best baseline (goal <= 1.3); the publish phases of the best
run are reported beside it (see :func:`bench._common.publish_phases`).

Run: ``python -m bench.publish_speed [--json] [--size-mb 256] [--repeat 3] [--storage file,s3]``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
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

GOAL = 1.3
_BLOCK = 1 << 20


def build_model(folder: Path, size_mb: int) -> Path:
    """``tests.onnx_models.big_mlp(size_mb)`` saved once as ``folder/model.onnx``."""
    from tests.onnx_models import big_mlp, save

    path = folder / "model.onnx"
    if not path.exists():
        save(big_mlp(size_mb), path)
    return path


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


def measure_storage(
    kind: str, model: Path, work: Path, repeat: int, endpoint: str | None
) -> dict[str, Any]:
    """Best-of-``repeat`` baseline and publish on one storage kind."""
    from ota.repository import Project, PublishRequest, init_project, publish

    size = model.stat().st_size
    client: Any = None
    if kind.startswith("s3"):
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint)
    rounds: list[dict[str, Any]] = []
    for i in range(max(1, repeat)):
        # -- baseline --------------------------------------------------------------------
        drop_dirty_pages()
        if kind == "file":
            dest = work / f"raw-{i}" / "model.onnx"
            base_fn: Callable[[], str] = partial(raw_copy, model, dest)
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

        # -- publish ---------------------------------------------------------------------
        proj_dir = work / f"proj-{kind}-{i}"
        if kind == "file":
            storage_url = str(work / f"repo-{i}")
            init_project(proj_dir, storage_url)
        else:
            bucket = f"bench-pub-{uuid.uuid4().hex[:8]}"
            client.create_bucket(Bucket=bucket)
            init_project(proj_dir, f"s3://{bucket}/repo", s3_endpoint=endpoint)
        project = Project.open(proj_dir)
        req = PublishRequest(source=model, name="bench-model", version="1.0.0")
        drop_dirty_pages()
        reset_peak_rss()
        with publish_phases() as timer:
            pub_s, result = timed(partial(publish, project, req))
        pub_rss = peak_rss_mb()
        rounds.append(
            {
                "baseline_s": round(base_s, 4),
                "publish_s": round(pub_s, 4),
                "phases_s": timer.breakdown(pub_s, PUBLISH_PHASES, overlap=True),
                "upload": result.upload.to_dict(),
                "baseline_peak_rss_mb": round(base_rss, 1),
                "publish_peak_rss_mb": round(pub_rss, 1),
            }
        )
        log(f"{kind} round {i + 1}: baseline {base_s:.2f}s publish {pub_s:.2f}s")
        if kind == "file":
            shutil.rmtree(work / f"repo-{i}", ignore_errors=True)
        else:
            _empty_bucket(client, bucket)
            client.delete_bucket(Bucket=bucket)
        shutil.rmtree(proj_dir, ignore_errors=True)
    best_base = min(r["baseline_s"] for r in rounds)
    best_pub = min(rounds, key=lambda r: r["publish_s"])
    return {
        "storage": kind,
        "model_bytes": size,
        "rounds": rounds,
        "baseline_s": best_base,
        "publish_s": best_pub["publish_s"],
        "ratio": ratio(best_pub["publish_s"], best_base),
        "goal": GOAL,
        "goal_met": ratio(best_pub["publish_s"], best_base) <= GOAL,
        "baseline_mb_per_s": round(size / best_base / 2**20, 1),
        "publish_mb_per_s": round(size / best_pub["publish_s"] / 2**20, 1),
        "phases_s": best_pub["phases_s"],
        "chunk_upload_ratio": ratio(best_pub["phases_s"]["chunk_upload"], best_base),
        "upload": best_pub["upload"],
        "baseline_peak_rss_mb": max(r["baseline_peak_rss_mb"] for r in rounds),
        "publish_peak_rss_mb": max(r["publish_peak_rss_mb"] for r in rounds),
    }


def run(size_mb: int, repeat: int, storages: list[str], workdir: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    model_dir = workdir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    log(f"building a {size_mb} MB model")
    model = build_model(model_dir, size_mb)
    warm_up(workdir)
    results: list[dict[str, Any]] = []
    for kind in storages:
        work = workdir / kind
        work.mkdir(exist_ok=True)
        if kind in ("s3", "s3-proc"):
            with s3_endpoint(out_of_process=kind == "s3-proc") as url:
                results.append(measure_storage(kind, model, work, repeat, url))
        else:
            results.append(measure_storage(kind, model, work, repeat, None))
    return {
        "benchmark": "publish_speed",
        "size_mb": size_mb,
        "model_bytes": model.stat().st_size,
        "repeat": repeat,
        "results": results,
        "cold_import_s": import_cost(),
        "environment": environment(),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def render(doc: dict[str, Any]) -> str:
    rows = [
        [
            r["storage"],
            r["baseline_s"],
            r["publish_s"],
            r["ratio"],
            "yes" if r["goal_met"] else "NO",
            r["baseline_mb_per_s"],
            r["publish_mb_per_s"],
            mb(r["upload"]["bytes_uploaded"]),
            r["publish_peak_rss_mb"],
        ]
        for r in doc["results"]
    ]
    out = [
        table(
            f"publish_speed: {mb(doc['model_bytes'])} MiB model, best of {doc['repeat']}"
            f" (goal publish/baseline <= {GOAL})",
            [
                "storage",
                "baseline s",
                "publish s",
                "ratio",
                "goal",
                "base MB/s",
                "pub MB/s",
                "uploaded MiB",
                "pub RSS MiB",
            ],
            rows,
        )
    ]
    phases = [*PUBLISH_PHASES, "other", "overlap"]
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
    out.append("")
    out.append(
        table(
            "publish phases of the best run (seconds; /base = ratio to baseline)",
            ["storage", *phases],
            prow,
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
    parser.add_argument("--repeat", type=int, default=3, help="rounds; best of each is kept")
    parser.add_argument(
        "--storage",
        default="file,s3,s3-proc",
        help="comma list of file, s3 (moto in this process), s3-proc (moto in its own process)",
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
        doc = run(args.size_mb, args.repeat, storages, work)
    emit(doc, render(doc), args.json)


if __name__ == "__main__":
    main()
