"""Large models end to end: ``ota device update`` with the REAL sandboxed smoke test.

For each size in ``--sizes-mb`` (default 64, 256, 1024), ``tests.onnx_models.big_mlp(size)``
(a single-file float32 model, eight square layers), and for each size in ``--external-sizes-mb``
(opt-in, default none; 4096 is the issue 13 case: ONNX's protobuf stops at 2 GB, so such a model
is a small ``model.onnx`` plus its weights in ``model.onnx.data``, built layer by layer by
``bench.publish_speed.build_external_mlp`` without ever holding them), is published as 1.0.0 of
its own model into
a local repository in a temporary folder, served by nginx in its own process when installed
(``tests/nginx.py``, the documented server block), else by ``ota serve``'s app in this process.
A fresh device is initialised, then a **child process** (``python -m bench.device_large
--child``) runs the real CLI, ``ota device update --json``, in-process, and reports:

* the updater's own peak RSS: ``VmHWM`` of the child (the updater process; the smoke child is
  its own process and is not counted here);
* the smoke child's peak RSS, twice: what the smoke child measured itself (``peak_mem_mb``,
  its ``ru_maxrss``) and ``ru_maxrss`` of ``RUSAGE_CHILDREN`` seen by the updater;
* the address-space limit the smoke child ran under (``mem_limit_mb``) and the smoke's wall
  time, load time and latency.

Goals (issue 13): the update installs (exit 0) at every size; the updater peaks at <= 80 MB
(76.3 MiB), flat with size; the smoke child at <= 1.3 x model size + 150 MB. No baseline is
timed here: the figures are memory, compared with the model's size. Every file lives in the
scratch folder (``--workdir`` or a temporary one), removed at the end.

The 4 GB case needs about 6 x 4 GB of scratch disk and several minutes (building, publishing,
installing); it is never part of the test suite.

Run: ``python -m bench.device_large [--json] [--sizes-mb 64,256,1024] [--external-sizes-mb 4096]``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench._common import base_parser, emit, environment, log, scratch_dir, table
from bench.device_update import Repo, build_model, disk_free, init_dev, serve_counting

UPDATER_GOAL_MB = 80.0
MB = 1_000_000
MIB = 1024 * 1024


def _vmhwm_mib() -> float:
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_main(state: str) -> None:
    """In the child: run ``ota device update --json`` in this process and print one JSON
    line with the CLI's result and the peaks."""
    from ota.cli import main as cli_main

    out = io.StringIO()
    t0 = time.perf_counter()
    code: Any = 0
    with contextlib.redirect_stdout(out):
        sys.argv = ["ota", "device", "update", "--state-dir", state, "--json"]
        try:
            cli_main()
        except SystemExit as e:
            code = e.code
    seconds = time.perf_counter() - t0
    try:
        result = json.loads(out.getvalue())
    except ValueError:
        result = {"unparsed": out.getvalue()[-2000:]}
    doc = {
        "exit_code": code,
        "seconds": round(seconds, 3),
        "updater_peak_mib": round(_vmhwm_mib(), 1),
        "children_maxrss_mib": round(
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1
        ),
        "result": result,
    }
    sys.stdout.write(json.dumps(doc) + "\n")


def run_child(state: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.device_large", "--child", str(state)],
        capture_output=True, text=True, check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"child printed nothing ({proc.returncode}): {proc.stderr[-2000:]}")
    doc: dict[str, Any] = json.loads(lines[-1])
    return doc


def _smoke_report(result: dict[str, Any]) -> dict[str, Any]:
    for o in result.get("models", []):
        smoke = (o.get("figures") or {}).get("smoke")
        if isinstance(smoke, dict):
            return smoke
    return {}


def measure_size(
    size_mb: int, work: Path, server: str, *, external: bool = False
) -> dict[str, Any]:
    name = f"large-{size_mb}" + ("-ext" if external else "")
    log(f"{name}: building and publishing")
    if external:
        from bench.publish_speed import build_external_mlp
        from bench.publish_speed import model_bytes as files_bytes

        model = work / "models" / name / "model.onnx"
        model.parent.mkdir(parents=True, exist_ok=True)
        build_external_mlp(model, size_mb)
        model_bytes = files_bytes(model)
    else:
        model = build_model(work / "models" / name / "model.onnx", size_mb)
        model_bytes = model.stat().st_size
    repo = Repo.create(work / f"repo-{name}")
    t0 = time.perf_counter()
    repo.publish(model, "1.0.0", name=name)
    publish_s = time.perf_counter() - t0
    shutil.rmtree(model.parent, ignore_errors=True)
    before = os.environ.get("OTA_BENCH_SERVER")
    os.environ["OTA_BENCH_SERVER"] = server
    try:
        with serve_counting(repo.root_dir) as (url, _):
            state = init_dev(work / f"dev-{name}", url, repo.trusted_root, name=name)
            log(f"{name}: ota device update (real smoke)")
            child = run_child(state)
    finally:
        if before is None:
            os.environ.pop("OTA_BENCH_SERVER", None)
        else:
            os.environ["OTA_BENCH_SERVER"] = before
    smoke = _smoke_report(child["result"])
    smoke_peak_mib = float(smoke.get("peak_mem_mb") or child["children_maxrss_mib"])
    smoke_goal_mib = (1.3 * model_bytes + 150 * MB) / MIB
    point = {
        "size_mb": size_mb,
        "external_data": external,
        "model_bytes": model_bytes,
        "publish_s": round(publish_s, 2),
        "exit_code": child["exit_code"],
        "status": child["result"].get("status"),
        "update_s": child["seconds"],
        "updater_peak_mib": child["updater_peak_mib"],
        "updater_goal_met": child["updater_peak_mib"] <= UPDATER_GOAL_MB * MB / MIB,
        "smoke_peak_mib": round(smoke_peak_mib, 1),
        "children_maxrss_mib": child["children_maxrss_mib"],
        "smoke_goal_mib": round(smoke_goal_mib, 1),
        "smoke_goal_met": bool(smoke) and smoke_peak_mib <= smoke_goal_mib,
        "smoke_peak_per_model": round(smoke_peak_mib * MIB / model_bytes, 2),
        "smoke_mem_limit_mib": smoke.get("mem_limit_mb"),
        "smoke_wall_s": round(float(smoke.get("wall_ms", 0.0)) / 1000, 2),
        "smoke_load_s": round(float(smoke.get("load_ms", 0.0)) / 1000, 2),
        "smoke_latency_ms_p95": smoke.get("latency_ms_p95"),
        "failure": None if child["exit_code"] == 0 else _failure(child["result"]),
    }
    log(
        f"{name}: exit {point['exit_code']}, updater {point['updater_peak_mib']} MiB, "
        f"smoke child {point['smoke_peak_mib']} MiB (goal {point['smoke_goal_mib']})"
    )
    shutil.rmtree(state, ignore_errors=True)
    shutil.rmtree(repo.work, ignore_errors=True)
    return point


def _failure(result: dict[str, Any]) -> str:
    for o in result.get("models", []):
        if o.get("reason"):
            return str(o["reason"])[:300]
    return json.dumps(result)[:300]


def run(
    sizes: list[int], work: Path, server: str, external_sizes: list[int] | None = None
) -> dict[str, Any]:
    t0 = time.perf_counter()
    points, notes = [], []
    cases = [(s, False) for s in sizes] + [(s, True) for s in external_sizes or []]
    for size, external in cases:
        need = 6 * size * MIB + 512 * MIB
        if disk_free(work) < need:
            notes.append(
                f"skipped {size} MB: {disk_free(work) / 1e9:.1f} GB free, need {need / 1e9:.1f}"
            )
            continue
        points.append(measure_size(size, work, server, external=external))
    return {
        "benchmark": "device_large",
        "server": server,
        "sizes_mb": sizes,
        "external_sizes_mb": external_sizes or [],
        "points": points,
        "notes": notes,
        "installed_all": bool(points) and all(p["exit_code"] == 0 for p in points),
        "goal_met": bool(points)
        and all(
            p["exit_code"] == 0 and p["updater_goal_met"] and p["smoke_goal_met"] for p in points
        ),
        "environment": environment(),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def render(doc: dict[str, Any]) -> str:
    rows = [
        [f"{p['size_mb']}{' ext' if p.get('external_data') else ''}", p["exit_code"],
         p["update_s"], p["updater_peak_mib"],
         p["smoke_peak_mib"], p["smoke_goal_mib"], p["smoke_peak_per_model"],
         p["smoke_mem_limit_mib"], p["smoke_load_s"], p["smoke_wall_s"],
         "yes" if p["updater_goal_met"] and p["smoke_goal_met"] else "NO"]
        for p in doc["points"]
    ]  # fmt: skip
    out = [table(
        f"device_large: ota device update with the real smoke (server: {doc['server']})",
        ["MB", "exit", "update s", "updater MiB", "smoke MiB", "smoke goal", "smoke/model",
         "RLIMIT_AS MiB", "load s", "smoke s", "goals"],
        rows,
    )]  # fmt: skip
    out += [f"{p['size_mb']} MB failed: {p['failure']}" for p in doc["points"] if p["failure"]]
    out += [f"note: {n}" for n in doc["notes"]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "device_large")
    parser.add_argument("--sizes-mb", default="64,256,1024")
    parser.add_argument(
        "--external-sizes-mb",
        default="",
        help="opt-in: models with external data (model.onnx + model.onnx.data), e.g. 4096",
    )
    parser.add_argument(
        "--server",
        choices=("thread", "nginx"),
        default="nginx" if shutil.which("nginx") else "thread",
    )
    parser.add_argument("--child", default=None, help="internal: the state dir to update")
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child)
        return
    sizes = [int(s) for s in args.sizes_mb.split(",") if s]
    with scratch_dir(args.workdir) as work:
        external = [int(s) for s in args.external_sizes_mb.split(",") if s]
        doc = run(sizes, work, args.server, external)
    emit(doc, render(doc), args.json)


if __name__ == "__main__":
    main()
