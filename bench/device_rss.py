"""Peak RSS of the device updater process for large bundles (flat with size, <= 80 MB).

For each size in ``--sizes-mb`` (default 256 and 1024; 1024 is skipped with a note when the
scratch folder has less than 6 GB free), ``tests.onnx_models.big_mlp(size)`` is published as
1.0.0 of its own model into a local repository served over loopback HTTP by this (parent)
process. A **child process** (``python -m bench.device_rss --child update``) then runs one
:func:`ota.client.update_once` on a freshly initialised device and reports its own peak RSS:
``VmHWM`` from ``/proc/self/status`` (``ru_maxrss`` of ``RUSAGE_SELF`` where there is no
``/proc``). The child uses the no-op smoke seam, so the figure is the updater's own: the real
smoke inference runs in its own sandboxed subprocess (``ota.client._smoke``), never in the
updater, and is measured apart by ``bench.device_update``. The server runs in the parent, so
its memory is not counted.

The child prepares itself as ``ota device`` does (:func:`ota._lean.lean_device_process`: the
cloud SDKs securesystemslib would import when installed stay out, as on a device installed with
the ``client`` extra). Baseline: the same child doing only the imports an update does
(``ota.client``, the TUF and HTTP stack, ``ota.signing`` with the device's verifier), then
reporting the same figure.
Goal: every update's peak <= 80 MB, and the 1 GB figure within a few MB of the 256 MB one.

Run: ``python -m bench.device_rss [--json] [--sizes-mb 256,1024]``.
"""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench._common import base_parser, emit, environment, log, ratio, scratch_dir, table
from bench.device_update import (
    Repo,
    build_model,
    disk_free,
    init_dev,
    serve_counting,
    update,
    warm_up_device,
)

GOAL_MB = round(80e6 / 2**20, 1)  # the goal is 80 MB; figures are MiB (VmHWM), so 76.3
MIN_FREE_FOR_1GB = 6 * 1024**3


def _peak_rss_mb() -> dict[str, float]:
    out = {"ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                key = "vmhwm_mb" if line.startswith("VmHWM") else "vmrss_mb"
                out[key] = round(int(line.split()[1]) / 1024, 1)
    out["peak_mb"] = out.get("vmhwm_mb", out["ru_maxrss_mb"])
    return out


def child_main(mode: str, state: str | None, model: str | None) -> None:
    """In the child: imports only, or one update; print the peak RSS figures as JSON."""
    t0 = time.perf_counter()
    from ota._lean import lean_device_process

    lean_device_process()  # as `ota device` does, before python-tuf is imported
    import ota.client
    import ota.client._install
    import ota.signing  # noqa: F401 - what the default verifier imports

    doc: dict[str, Any] = {"mode": mode, "import_s": round(time.perf_counter() - t0, 3)}
    if mode == "update":
        assert state is not None
        t1 = time.perf_counter()
        kw = {"model": model} if model else {}
        result = update(Path(state), **kw)
        doc["update_s"] = round(time.perf_counter() - t1, 3)
        doc["status"] = result.status
        doc["bytes"] = result.bytes
    doc.update(_peak_rss_mb())
    doc["heavy_modules"] = sorted(
        m
        for m in ("model_signing", "sigstore", "pydantic", "boto3", "botocore", "onnxruntime")
        if sys.modules.get(m) is not None
    )
    print(json.dumps(doc), flush=True)


def run_child(mode: str, state: Path | None = None, model: str | None = None) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.device_rss", "--child", mode]
    if state is not None:
        argv += ["--state", str(state)]
    if model:
        argv += ["--model", model]
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    doc: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return doc


def run(sizes: list[int], workdir: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    warm_up_device(workdir)
    repo = Repo.create(workdir / "ours")
    points: list[dict[str, Any]] = []
    notes: list[str] = []
    baseline = run_child("imports")
    log(f"imports-only child: {baseline['peak_mb']} MB")
    with serve_counting(repo.root_dir) as (url, _):
        for size in sizes:
            if size >= 1024 and disk_free(workdir) < MIN_FREE_FOR_1GB:
                note = (
                    f"skipped {size} MB: {disk_free(workdir) / 1024**3:.1f} GB free in"
                    f" {workdir}, need 6 GB"
                )
                log(note)
                notes.append(note)
                continue
            name = f"rss-{size}"
            log(f"building and publishing a {size} MB model")
            model = build_model(workdir / "models" / name / "model.onnx", size)
            repo.publish(model, "1.0.0", name=name)
            state = init_dev(workdir / f"dev-{size}", url, repo.trusted_root, name=name)
            child = run_child("update", state, name)
            log(f"{size} MB update: peak {child['peak_mb']} MB in {child['update_s']}s")
            points.append(
                {
                    "size_mb": size,
                    "model_bytes": model.stat().st_size,
                    "child": child,
                    "peak_mb": child["peak_mb"],
                    "over_imports_mb": round(child["peak_mb"] - baseline["peak_mb"], 1),
                    "goal_met": child["peak_mb"] <= GOAL_MB,
                }
            )
            shutil.rmtree(state, ignore_errors=True)
            shutil.rmtree(model.parent, ignore_errors=True)
    first = points[0]["peak_mb"] if points else 0.0
    for p in points:
        p["ratio_to_smallest"] = ratio(p["peak_mb"], first)
    return {
        "benchmark": "device_rss",
        "sizes_mb": sizes,
        "imports_only": baseline,
        "points": points,
        "notes": notes,
        "goal_mb": GOAL_MB,
        "goal_met": bool(points) and all(p["goal_met"] for p in points),
        "smoke": "no-op seam: smoke runs in its own sandboxed subprocess, measured apart",
        "environment": environment(),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def render(doc: dict[str, Any]) -> str:
    base = doc["imports_only"]
    rows: list[list[object]] = [["imports only", "-", base["peak_mb"], "-", "-", "-"]]
    for p in doc["points"]:
        rows.append(
            [
                f"update {p['size_mb']} MB",
                p["child"]["update_s"],
                p["peak_mb"],
                p["over_imports_mb"],
                p["ratio_to_smallest"],
                "yes" if p["goal_met"] else "NO",
            ]
        )
    out = [
        table(
            f"device_rss: peak RSS of the updater child (VmHWM, MiB; goal <= {GOAL_MB})",
            ["child", "update s", "peak MiB", "- imports", "/ smallest", "goal"],
            rows,
        ),
        "",
        f"({doc['smoke']})",
    ]
    for p in doc["points"]:
        heavy = p["child"].get("heavy_modules", [])
        out.append(f"{p['size_mb']} MB update: heavy modules loaded: {', '.join(heavy) or 'none'}")
    out += [f"note: {n}" for n in doc["notes"]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "device_rss")
    parser.add_argument("--sizes-mb", default="256,1024")
    parser.add_argument(
        "--child",
        choices=("imports", "update"),
        default=None,
        help="internal: run as the measured child",
    )
    parser.add_argument("--state", default=None, help="internal: the child's state dir")
    parser.add_argument("--model", default=None, help="internal: the child's model")
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child, args.state, args.model)
        return
    sizes = [int(s) for s in args.sizes_mb.split(",") if s]
    with scratch_dir(args.workdir) as work:
        doc = run(sizes, work)
    emit(doc, render(doc), args.json)


if __name__ == "__main__":
    main()
