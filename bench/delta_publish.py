"""Delta publish: bytes uploaded when a fine-tuned model is published as the next version.

A model of ``--size-mb`` (``tests.onnx_models.big_mlp``) is published as 1.0.0 into a fresh
repository on a local folder. Then, for each fraction in ``--fractions`` (the headline 10% first,
then 1% and 30% for context), ``tests.onnx_models.fine_tune(model, fraction)`` of that same base
is published as the next version of the same model. Each figure is ``PublishResult.upload``
bytes uploaded / the full model size (goal <= 15% for 10%), next to the publish time relative to
the first (full) publish and, within it, the seconds spent computing binary deltas from the
model's recent releases (ADR 0012; the uploaded bytes include the delta blobs).

Each fine-tune perturbs the last ``fraction`` of the weight bytes with its own random values,
so its changed chunks are new to the storage whatever was published before it.

``--effort`` is the publisher's delta effort: ``fast`` (``ota publish``'s default) or ``max``
(``--delta-effort max``); each candidate codec's bytes and seconds are in ``binary_deltas``.

Run: ``python -m bench.delta_publish [--json] [--size-mb 256] [--fractions 0.1,0.01,0.3]
[--effort fast|max]``.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

from bench._common import (
    PUBLISH_PHASES,
    base_parser,
    drop_dirty_pages,
    emit,
    environment,
    log,
    mb,
    publish_phases,
    ratio,
    scratch_dir,
    table,
    timed,
    warm_up,
)

GOAL = 0.15
HEADLINE = 0.1


def run(
    size_mb: int,
    fractions: list[float],
    workdir: Path,
    effort: str = "fast",
    file_blobs: bool = True,
) -> dict[str, Any]:
    from ota.repository import Project, PublishRequest, init_project, publish
    from ota.repository._deltas import DeltaSettings
    from tests.onnx_models import big_mlp, fine_tune, save

    t0 = time.perf_counter()
    log(f"building a {size_mb} MB model")
    base = big_mlp(size_mb)
    base_path = save(base, workdir / "models" / "base" / "model.onnx")
    model_bytes = base_path.stat().st_size
    init_project(workdir / "proj", str(workdir / "repo"))
    if not file_blobs:  # ADR 0017 2b: chunk blobs only, the store deduplicates by chunk
        toml = workdir / "proj" / "ota.toml"
        toml.write_text(toml.read_text().replace("file_blobs = true", "file_blobs = false"))
    project = Project.open(workdir / "proj")
    assert project.config.file_blobs is file_blobs
    warm_up(workdir)

    drop_dirty_pages()
    with publish_phases() as timer:
        full_s, full = timed(
            partial(publish, project, PublishRequest(base_path, "bench-model", "1.0.0"))
        )
    full_phases = timer.breakdown(full_s, PUBLISH_PHASES)
    log(f"full publish {full_s:.2f}s, {mb(full.upload.bytes_uploaded)} MiB uploaded")

    settings = DeltaSettings(slow_level=19 if effort == "max" else 9)
    deltas: list[dict[str, Any]] = []
    for i, fraction in enumerate(fractions):
        path = save(fine_tune(base, fraction), workdir / "models" / f"ft-{i}" / "model.onnx")
        version = f"1.{i + 1}.0"
        drop_dirty_pages()
        with publish_phases() as timer:
            pub_s, result = timed(
                partial(
                    publish, project, PublishRequest(path, "bench-model", version, deltas=settings)
                )
            )
        up = result.upload
        deltas.append(
            {
                "fraction": fraction,
                "version": version,
                "bytes_uploaded": up.bytes_uploaded,  # file blobs included (ADR 0017)
                "file_blob_bytes": up.file_blob_bytes,
                "chunks_uploaded": up.chunks_uploaded,
                "chunks_total": up.chunks_total,
                "uploaded_over_full": round(up.bytes_uploaded / model_bytes, 4),
                "uploaded_over_changed": round(up.bytes_uploaded / (model_bytes * fraction), 3),
                "publish_s": round(pub_s, 4),
                "time_over_full_publish": ratio(pub_s, full_s),
                "phases_s": timer.breakdown(pub_s, PUBLISH_PHASES),
                # issue 13 (ADR 0012): computing the binary deltas from recent releases
                "binary_deltas": result.deltas.to_dict() if result.deltas else None,
            }
        )
        log(f"fine-tune {fraction:.0%}: {mb(up.bytes_uploaded)} MiB uploaded in {pub_s:.2f}s")
        path.unlink()
    headline = next((d for d in deltas if d["fraction"] == HEADLINE), None)
    return {
        "benchmark": "delta_publish",
        "size_mb": size_mb,
        "model_bytes": model_bytes,
        "storage": "file",
        "file_blobs": file_blobs,
        "effort": effort,
        "full_publish_s": round(full_s, 4),
        "full_upload": full.upload.to_dict(),
        "full_phases_s": full_phases,
        "deltas": deltas,
        "goal": GOAL,
        "headline_fraction": HEADLINE,
        "goal_met": None if headline is None else headline["uploaded_over_full"] <= GOAL,
        "environment": environment(),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def render(doc: dict[str, Any]) -> str:
    rows: list[list[object]] = [
        ["full 1.0.0", mb(doc["full_upload"]["bytes_uploaded"]), 1.0, "",
         doc["full_upload"]["chunks_uploaded"], doc["full_publish_s"], 1.0, "-", "-", ""]
    ]
    for d in doc["deltas"]:
        goal = ""
        if d["fraction"] == doc["headline_fraction"]:
            goal = "yes" if d["uploaded_over_full"] <= doc["goal"] else "NO"
        bd = d.get("binary_deltas") or {}
        rows.append(
            [f"fine-tune {d['fraction']:.0%}", mb(d["bytes_uploaded"]), d["uploaded_over_full"],
             d["uploaded_over_changed"], f"{d['chunks_uploaded']}/{d['chunks_total']}",
             d["publish_s"], d["time_over_full_publish"], bd.get("computed", "-"),
             bd.get("seconds", "-"), goal]
        )
    return table(
        f"delta_publish: {mb(doc['model_bytes'])} MiB model on a local folder "
        f"(goal: uploaded/full <= {doc['goal']:.0%} for a "
        f"{doc['headline_fraction']:.0%} fine-tune)",
        ["release", "uploaded MiB", "/full size", "/changed bytes", "chunks up", "publish s",
         "time/full", "deltas", "delta s", "goal"],
        rows,
    )


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "delta_publish")
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--fractions", default="0.1,0.01,0.3",
                        help="comma list of fine-tune fractions, each from the same base")
    parser.add_argument("--effort", choices=("fast", "max"), default="fast")
    parser.add_argument(
        "--no-file-blobs",
        action="store_true",
        help="publish with file_blobs = false (ADR 0017 2b: chunk blobs only)",
    )
    args = parser.parse_args(argv)
    fractions = [float(f) for f in args.fractions.split(",") if f]
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        parser.error("fractions must be in (0, 1]")
    with scratch_dir(args.workdir) as work:
        doc = run(args.size_mb, fractions, work, args.effort, not args.no_file_blobs)
    emit(doc, render(doc), args.json)


if __name__ == "__main__":
    main()
