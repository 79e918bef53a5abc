"""Device delta update: bytes downloaded when the next version is a fine-tune of the installed one.

A model of ``--size-mb`` (``tests.onnx_models.big_mlp``) is published as 1.0.0 and installed
on a fresh device with :func:`ota.client.update_once` over loopback HTTP (``ota serve``'s app
with a WSGI wrapper counting requests and body bytes at the server). The device's state folder
is then kept as a pristine copy. For each fraction in ``--fractions`` (the headline 10 % first,
then 1 % and 30 % for context), ``tests.onnx_models.fine_tune(model, fraction)`` of that base is
published as the next version, the pristine device is copied afresh (so every delta is 1.0.0 ->
fine-tune, nothing else on the device), and updated once more. Smoke is the no-op seam (it
downloads nothing; see ``bench.device_update``).

Figures: bytes served for the delta update (all requests: metadata, manifest, signer list,
blobs) / model size (goal <= 15 % for 10 %), blob bytes alone, requests, the client's own
stage figures (chunks downloaded vs reused from the installed slot) and the update time
relative to the full install.

Run: ``python -m bench.device_delta [--json] [--size-mb 256] [--fractions 0.1,0.01,0.3]``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from bench._common import (
    base_parser,
    drop_dirty_pages,
    emit,
    environment,
    log,
    mb,
    ratio,
    scratch_dir,
    table,
    timed,
)
from bench.device_update import Repo, init_dev, serve_counting, update, warm_up_device

GOAL = 0.15
HEADLINE = 0.1


def run(size_mb: int, fractions: list[float], workdir: Path) -> dict[str, Any]:
    from tests.onnx_models import big_mlp, fine_tune, save

    t0 = time.perf_counter()
    log(f"building a {size_mb} MB model")
    base = big_mlp(size_mb)
    base_path = save(base, workdir / "models" / "base" / "model.onnx")
    size = base_path.stat().st_size
    warm_up_device(workdir)
    repo = Repo.create(workdir / "ours")
    repo.publish(base_path, "1.0.0")
    pristine = workdir / "dev-1.0.0"
    dev = workdir / "dev"
    deltas: list[dict[str, Any]] = []
    with serve_counting(repo.root_dir) as (url, hits):
        init_dev(pristine, url, repo.trusted_root)
        drop_dirty_pages()
        hits.reset()
        full_s, full = timed(lambda: update(pristine))
        full_served = hits.summary()
        log(f"full install {full_s:.2f}s, {mb(full_served['body_bytes'])} MiB served")
        for i, fraction in enumerate(fractions):
            path = save(fine_tune(base, fraction), workdir / "models" / f"ft-{i}" / "model.onnx")
            version = f"1.{i + 1}.0"
            repo.publish(path, version)
            shutil.rmtree(dev, ignore_errors=True)
            shutil.copytree(pristine, dev, symlinks=True)
            drop_dirty_pages()
            hits.reset()
            secs, result = timed(lambda: update(dev))
            served = hits.summary()
            outcome = result.outcomes[0]
            if outcome.version != version:
                raise RuntimeError(f"installed {outcome.version}, expected {version}")
            stage = outcome.figures.get("stage", {})
            deltas.append(
                {
                    "fraction": fraction,
                    "version": version,
                    "served": served,
                    "requests": served["requests"],
                    "bytes_downloaded": served["body_bytes"],
                    "downloaded_over_full": round(served["body_bytes"] / size, 4),
                    "blob_bytes_over_full": round(served["blob_bytes"] / size, 4),
                    "downloaded_over_changed": ratio(served["blob_bytes"], size * fraction),
                    "client_requests": result.requests,
                    "client_bytes": result.bytes,
                    "stage": stage,
                    "update_s": round(secs, 4),
                    "time_over_full_install": ratio(secs, full_s),
                }
            )
            log(
                f"fine-tune {fraction:.0%}: {mb(served['body_bytes'])} MiB in"
                f" {served['requests']} requests, {secs:.2f}s"
            )
    shutil.rmtree(dev, ignore_errors=True)
    head = next((d for d in deltas if d["fraction"] == HEADLINE), deltas[0] if deltas else None)
    return {
        "benchmark": "device_delta",
        "size_mb": size_mb,
        "model_bytes": size,
        "full": {
            "served": full_served,
            "update_s": round(full_s, 4),
            "stage": full.outcomes[0].figures.get("stage", {}),
        },
        "deltas": deltas,
        "headline_fraction": head["fraction"] if head else None,
        "goal": GOAL,
        "goal_met": bool(head and head["downloaded_over_full"] <= GOAL),
        "environment": environment(),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def render(doc: dict[str, Any]) -> str:
    full = doc["full"]
    rows: list[list[object]] = [
        [
            "full 1.0.0",
            mb(full["served"]["body_bytes"]),
            round(full["served"]["body_bytes"] / doc["model_bytes"], 4),
            "-",
            full["served"]["requests"],
            full["stage"].get("chunks_downloaded", "?"),
            full["update_s"],
            1.0,
        ]
    ]
    for d in doc["deltas"]:
        st = d["stage"]
        rows.append(
            [
                f"fine-tune {d['fraction']:.0%}",
                mb(d["bytes_downloaded"]),
                d["downloaded_over_full"],
                d["downloaded_over_changed"],
                d["requests"],
                f"{st.get('chunks_downloaded', '?')}/"
                f"{st.get('chunks_downloaded', 0) + st.get('chunks_reused', 0)}",
                d["update_s"],
                d["time_over_full_install"],
            ]
        )
    goal = "met" if doc["goal_met"] else "NOT met"
    return "\n".join(
        [
            table(
                f"device_delta: {mb(doc['model_bytes'])} MiB model, update from 1.0.0"
                f" (goal downloaded/full <= {GOAL} for {doc['headline_fraction']}: {goal})",
                [
                    "release",
                    "downloaded MiB",
                    "/ full",
                    "blobs / changed",
                    "requests",
                    "chunks fetched",
                    "update s",
                    "time / full",
                ],
                rows,
            ),
            "",
            "(downloaded = every response body the server sent for the update: metadata, manifest,"
            " signer list, blobs)",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "device_delta")
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument(
        "--fractions",
        default="0.1,0.01,0.3",
        help="fine-tune fractions, comma separated (headline 0.1)",
    )
    args = parser.parse_args(argv)
    fractions = [float(f) for f in args.fractions.split(",") if f]
    with scratch_dir(args.workdir) as work:
        doc = run(args.size_mb, fractions, work)
    emit(doc, render(doc), args.json)


if __name__ == "__main__":
    main()
