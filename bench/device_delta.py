"""Device delta update: bytes fetched by the device, through the real update path, against
``zstd --patch-from`` and ``xdelta3`` on the same pair of files (issue 13, ADR 0012).

For each size in ``--sizes`` (MiB), a model of that size (``tests.onnx_models.big_mlp``, eight
square float32 layers) is the base. For each scenario a fresh repository publishes the base as
1.0.0, a fresh device installs it over loopback HTTP (``ota serve``'s app with a WSGI wrapper
counting every response body at the server), then the scenario's model is published as 1.1.0
(the publisher computes its binary deltas at ``--effort``: ``fast`` is ``ota publish``'s
default, ``max`` is ``--delta-effort max``; timed, each candidate codec apart) and the device
updates once. Smoke is the no-op seam (it downloads nothing).

Scenarios (each from the same base):

* ``finetune10``: the last 10 % of the weight bytes perturbed (a head fine-tune);
* ``layer``: one of the eight layers replaced by fresh random weights (12.5 %);
* ``scattered10``: 10 % of every tensor's floats nudged, at random positions;
* ``fp16``: every initializer re-exported as float16 (Cast nodes in front), half the size.

Baselines, same pair of ``.onnx`` files: ``zstd -19 --long=W --patch-from=OLD NEW`` (Debian's
zstd) and ``xdelta3 -9 -e -s OLD NEW``. Figures per scenario (one round each, with the load
average when it ran): every byte the server sent for the update (metadata, manifest, signer
list, blobs) / the best baseline (goal <= 1.05), and / the new file's size (never above 1 plus
metadata); the blob bytes alone; the client's delta figures and codec; the publish time, the
part of it spent on deltas (a publish without deltas takes about the difference) and each
candidate's bytes and seconds, vs the baselines' own seconds.

``--baseline-cache FILE`` keeps the baselines' figures by the sha256 of the pair (the models are
deterministic), so a re-run does not pay ``zstd -19`` again (minutes at 256 MiB); cached rows
say so.

Run: ``python -m bench.device_delta [--json] [--sizes 64,128,256] [--scenarios a,b]
[--effort fast|max] [--baseline-cache FILE]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench._common import base_parser, emit, environment, log, mb, ratio, scratch_dir, table
from bench.device_update import MODEL, Repo, init_dev, serve_counting, update, warm_up_device

GOAL = 1.05
SCENARIOS = ("finetune10", "layer", "scattered10", "fp16")
BASELINES = ("zstd", "xdelta3")


def _copy(model: Any) -> Any:
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def replace_layer(model: Any, layer: int = 3, seed: int = 2) -> Any:
    import numpy as np
    from onnx import numpy_helper

    out = _copy(model)
    rng = np.random.default_rng(seed)
    for t in out.graph.initializer:
        if t.name == f"w{layer}":
            shape = numpy_helper.to_array(t).shape
            fresh = (rng.standard_normal(shape) * 0.5).astype(np.float32)
            t.CopyFrom(numpy_helper.from_array(fresh, t.name))
    return out


def scattered(model: Any, fraction: float = 0.1, seed: int = 3) -> Any:
    import numpy as np
    from onnx import numpy_helper

    out = _copy(model)
    rng = np.random.default_rng(seed)
    for t in out.graph.initializer:
        arr = numpy_helper.to_array(t).copy()
        flat = arr.reshape(-1)
        idx = rng.choice(flat.size, int(flat.size * fraction), replace=False)
        flat[idx] += rng.standard_normal(idx.size).astype(np.float32) * 0.01
        t.CopyFrom(numpy_helper.from_array(arr, t.name))
    return out


def to_fp16(model: Any) -> Any:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    out = _copy(model)
    inits = list(out.graph.initializer)
    del out.graph.initializer[:]
    casts = []
    for t in inits:
        half = numpy_helper.to_array(t).astype(np.float16)
        out.graph.initializer.append(numpy_helper.from_array(half, t.name + "_fp16"))
        casts.append(helper.make_node("Cast", [t.name + "_fp16"], [t.name], to=TensorProto.FLOAT))
    nodes = list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(casts + nodes)
    return out


def builders() -> dict[str, Callable[[Any], Any]]:
    from tests.onnx_models import fine_tune

    return {
        "finetune10": lambda m: fine_tune(m, 0.1),
        "layer": replace_layer,
        "scattered10": scattered,
        "fp16": to_fp16,
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def cached_baselines(
    old: Path, new: Path, work: Path, cache: Path | None, tools: tuple[str, ...] = BASELINES
) -> dict[str, Any]:
    """:func:`baselines`, through ``cache`` (JSON keyed by the pair's sha256) when given."""
    if cache is None:
        return baselines(old, new, work, tools)
    key = f"{_sha256(old)}:{_sha256(new)}"
    doc = json.loads(cache.read_text()) if cache.exists() else {}
    have = doc.get(key, {})
    out = {k: {**v, "cached": True} for k, v in have.items() if k in tools}
    missing = tuple(t for t in tools if t not in out)
    if missing:
        fresh = baselines(old, new, work, missing)
        out.update(fresh)
        doc[key] = {**have, **fresh}
        cache.write_text(json.dumps(doc, indent=1))
    return out


def baselines(
    old: Path, new: Path, work: Path, tools: tuple[str, ...] = BASELINES
) -> dict[str, Any]:
    """Bytes and seconds of ``zstd --patch-from`` and ``xdelta3`` (those in ``tools``) on the
    pair."""
    window = max(old.stat().st_size, new.stat().st_size).bit_length()
    out: dict[str, Any] = {}
    runs = {
        "zstd": [
            "zstd",
            "-q",
            "-f",
            "-19",
            f"--long={window}",
            f"--patch-from={old}",
            str(new),
            "-o",
            str(work / "d.zst"),
        ],
        "xdelta3": ["xdelta3", "-f", "-9", "-e", "-s", str(old), str(new), str(work / "d.xd3")],
    }
    for name, argv in runs.items():
        if name not in tools:
            continue
        t0 = time.perf_counter()
        subprocess.run(argv, check=True)
        secs = time.perf_counter() - t0
        path = Path(argv[-1])
        out[name] = {"bytes": path.stat().st_size, "seconds": round(secs, 2)}
        path.unlink()
    return out


def one(
    name: str,
    base_path: Path,
    new_path: Path,
    work: Path,
    effort: str,
    cache: Path | None,
    tools: tuple[str, ...] = BASELINES,
) -> dict[str, Any]:
    from ota.repository import PublishRequest, publish
    from ota.repository._deltas import DeltaSettings

    load = [round(x, 2) for x in os.getloadavg()]
    repo = Repo.create(work / f"repo-{name}")
    repo.publish(base_path, "1.0.0")
    dev = work / f"dev-{name}"
    with serve_counting(repo.root_dir) as (url, hits):
        init_dev(dev, url, repo.trusted_root)
        update(dev)
        t0 = time.perf_counter()
        settings = DeltaSettings(slow_level=19 if effort == "max" else 9)
        req = PublishRequest(new_path, MODEL, "1.1.0", ring="ga", deltas=settings)
        pub = publish(repo.project, req)
        publish_s = time.perf_counter() - t0
        hits.reset()
        t0 = time.perf_counter()
        result = update(dev)
        update_s = time.perf_counter() - t0
        served = hits.summary()
    outcome = result.outcomes[0]
    if outcome.version != "1.1.0":
        raise RuntimeError(f"installed {outcome.version}, expected 1.1.0")
    base = cached_baselines(base_path, new_path, work, cache, tools)
    best = min(b["bytes"] for b in base.values())
    new_size = new_path.stat().st_size
    shutil.rmtree(dev, ignore_errors=True)
    shutil.rmtree(repo.work, ignore_errors=True)
    row = {
        "scenario": name,
        "new_bytes": new_size,
        "served": served,
        "ours_bytes": served["body_bytes"],
        "ours_blob_bytes": served["blob_bytes"],
        "baselines": base,
        "best_baseline_bytes": best,
        "ours_over_best": ratio(served["body_bytes"], best),
        "ours_over_new_size": round(served["body_bytes"] / new_size, 4),
        "baseline_over_new_size": {k: round(v["bytes"] / new_size, 4) for k, v in base.items()},
        "goal_met": served["body_bytes"] <= GOAL * best,
        "delta": outcome.figures.get("delta", {}),
        "stage": outcome.figures.get("stage", {}),
        "publish_s": round(publish_s, 2),
        "publish_delta": pub.deltas.to_dict() if pub.deltas else None,
        "codec": next(
            (a.get("codec") for a in outcome.figures.get("delta", {}).get("applied", [])), None
        ),
        "best_baseline_s": min(b["seconds"] for b in base.values() if b["bytes"] == best),
        "update_s": round(update_s, 2),
        "loadavg": load,
    }
    log(
        f"{name}: ours {mb(row['ours_bytes'])} MiB, "
        + ", ".join(f"{k} {mb(v['bytes'])}" for k, v in base.items())
        + f": {row['ours_over_best']}x best"
    )
    return row


def run(
    sizes: list[int],
    scenarios: list[str],
    workdir: Path,
    effort: str,
    cache: Path | None,
    tools: tuple[str, ...] = BASELINES,
    rows_log: Path | None = None,
) -> dict[str, Any]:
    from tests.onnx_models import big_mlp, save

    t0 = time.perf_counter()
    warm_up_device(workdir)
    make = builders()
    rows = []
    for size_mb in sizes:
        log(f"building a {size_mb} MB model")
        base = big_mlp(size_mb)
        base_path = save(base, workdir / "models" / "base" / "model.onnx")
        for name in scenarios:
            new_path = save(make[name](base), workdir / "models" / name / "model.onnx")
            row = one(name, base_path, new_path, workdir, effort, cache, tools)
            rows.append({"size_mb": size_mb, "model_bytes": base_path.stat().st_size, **row})
            if rows_log is not None:  # each row as it comes: a long run cut short keeps them
                with rows_log.open("a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
            shutil.rmtree(new_path.parent, ignore_errors=True)
        del base
    return {
        "benchmark": "device_delta",
        "sizes_mb": sizes,
        "effort": effort,
        "baselines": list(tools),
        "scenarios": rows,
        "goal": GOAL,
        "goal_met": all(r["goal_met"] for r in rows),
        "environment": environment(),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def render(doc: dict[str, Any]) -> str:
    rows: list[list[object]] = []
    for r in doc["scenarios"]:
        b = r["baselines"]
        applied = r["delta"].get("applied", [])
        pd = r["publish_delta"] or {}
        rows.append(
            [
                r["size_mb"],
                r["scenario"],
                mb(r["new_bytes"]),
                mb(r["ours_bytes"]),
                mb(b["zstd"]["bytes"]) if "zstd" in b else "not run",
                mb(b["xdelta3"]["bytes"]) if "xdelta3" in b else "not run",
                r["ours_over_best"],
                r["ours_over_new_size"],
                r["codec"] if applied else "chunks",
                r["publish_s"],
                pd.get("seconds", "-"),
                " ".join(f"{c['codec']}:{c['seconds']}" for c in pd.get("candidates", [])),
                b["zstd"]["seconds"] if "zstd" in b else "-",
                b["xdelta3"]["seconds"] if "xdelta3" in b else "-",
                " ".join(str(x) for x in r["loadavg"]),
            ]
        )
    goal = "met" if doc["goal_met"] else "NOT met"
    return table(
        f"device_delta: update 1.0.0 -> 1.1.0, publish effort {doc['effort']} "
        f"(goal ours <= {GOAL} x best baseline: {goal})",
        [
            "MiB",
            "scenario",
            "new MiB",
            "ours MiB",
            "zstd -19 MiB",
            "xdelta3 -9 MiB",
            "/ best",
            "/ new size",
            "path",
            "publish s",
            "of it deltas s",
            "candidates s",
            "zstd s",
            "xdelta3 s",
            "load 1/5/15",
        ],
        rows,
    )


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "device_delta")
    parser.add_argument("--sizes", default="64", help="comma list of model sizes in MiB")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--effort", choices=("fast", "max"), default="fast")
    parser.add_argument("--baseline-cache", type=Path, default=None)
    parser.add_argument("--rows-log", type=Path, default=None, help="append each row (JSON)")
    parser.add_argument(
        "--baselines",
        default=",".join(BASELINES),
        help="which baselines to run (zstd -19 takes minutes per pair at 256 MiB)",
    )
    args = parser.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    if any(s not in SCENARIOS for s in scenarios):
        parser.error(f"scenarios are {', '.join(SCENARIOS)}")
    sizes = [int(x) for x in args.sizes.split(",") if x]
    with scratch_dir(args.workdir) as work:
        tools = tuple(t for t in args.baselines.split(",") if t)
        if not tools or any(t not in BASELINES for t in tools):
            parser.error(f"baselines are {', '.join(BASELINES)}")
        doc = run(sizes, scenarios, work, args.effort, args.baseline_cache, tools, args.rows_log)
    emit(doc, render(doc), args.json)


if __name__ == "__main__":
    main()
