"""Offline media (issue 11): export size and time of a delta medium vs a full one, and a device
update from a local medium folder vs the same update over loopback HTTP.

A model of ``--size-mb`` (``tests.onnx_models.big_mlp``) is published as 1.0.0, and a 10 %
fine-tune of it as 1.1.0, into a local repository.

* **export**: each of ``--repeat`` rounds writes a full medium of 1.1.0 and a delta medium of
  1.1.0 for devices running 1.0.0 (``--have``), in alternating order, each into a fresh folder
  (dirty pages flushed, untimed, before each). Both include the export's repository
  transaction (online-role refresh, the medium's timestamp and snapshot, the commit) and the
  python-tuf self-check. Figures: bytes and files of each medium, seconds (median, min, max),
  delta / full for both.
* **update**: each round installs 1.1.0 on two fresh devices, in alternating order: one from a
  medium folder (:func:`ota.client._medium.update_from_medium`), one over loopback HTTP from
  ``ota serve`` in its own process (``--server process``, the default; ``thread`` serves from
  this process) with :func:`ota.client.update_once`. Same client code after the pool, same
  no-op smoke seam (smoke does not depend on where bytes came from). Goal: medium / HTTP <= 1.0
  (median over rounds, each ratio from the same round).

The load average is recorded per round (2 cores shared with other developers: read the ratios,
not the absolute seconds).

Run: ``python -m bench.offline [--json] [--size-mb 64] [--repeat 5]``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
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
from bench.device_update import MODEL, Repo, init_dev, no_smoke, serve_counting, warm_up_device

GOAL = 1.0


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4)}  # fmt: skip


def _tree_bytes(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


@contextlib.contextmanager
def _server(root: Path, mode: str) -> Iterator[str]:
    if mode == "process":
        from bench.device_update import _serve_process

        with _serve_process(root) as url:
            yield url
    else:
        with serve_counting(root) as (url, _):
            yield url


def run(size_mb: int, repeat: int, workdir: Path, server: str = "process") -> dict[str, Any]:
    from ota.client import update_once
    from ota.client._medium import update_from_medium
    from ota.repository._offline import export
    from tests.onnx_models import big_mlp, fine_tune, save

    t0 = time.perf_counter()
    log(f"building a {size_mb} MB model and a 10 % fine-tune")
    base = big_mlp(size_mb)
    v1 = save(base, workdir / "models" / "v1" / "model.onnx")
    v2 = save(fine_tune(base, 0.1), workdir / "models" / "v2" / "model.onnx")
    warm_up_device(workdir)
    repo = Repo.create(workdir / "ours")
    repo.publish(v1, "1.0.0")
    repo.publish(v2, "1.1.0")
    media = workdir / "media"

    def do_export(name: str, **kw: Any) -> Callable[[], Any]:
        def go() -> Any:
            return export(repo.project, [f"{MODEL}@1.1.0"], media / name, **kw)

        return go

    exports: list[dict[str, Any]] = []
    for i in range(repeat):
        row: dict[str, Any] = {"loadavg": [round(x, 2) for x in os.getloadavg()]}
        order = [("full", {}), ("delta", {"have": [f"{MODEL}@1.0.0"]})]
        for kind, kw in order if i % 2 == 0 else order[::-1]:
            shutil.rmtree(media / kind, ignore_errors=True)
            drop_dirty_pages()
            secs, res = timed(do_export(kind, **kw))
            files, nbytes = _tree_bytes(media / kind)
            row[kind] = {"seconds": round(secs, 4), "files": files, "bytes": nbytes,
                         "chunks": res.chunks, "chunks_omitted": res.chunks_omitted}  # fmt: skip
        row["ratio_bytes"] = ratio(row["delta"]["bytes"], row["full"]["bytes"])
        row["ratio_seconds"] = ratio(row["delta"]["seconds"], row["full"]["seconds"])
        exports.append(row)
        log(f"export round {i + 1}: full {mb(row['full']['bytes'])} MiB "
            f"{row['full']['seconds']:.2f}s, delta {mb(row['delta']['bytes'])} MiB "
            f"{row['delta']['seconds']:.2f}s")  # fmt: skip

    updates: list[dict[str, Any]] = []
    with _server(repo.root_dir, server) as url:
        for i in range(repeat):
            row = {"loadavg": [round(x, 2) for x in os.getloadavg()]}

            def medium_path() -> Any:
                return update_from_medium(workdir / "dev-m", media / "full", smoke=no_smoke)

            def http_path() -> Any:
                return update_once(workdir / "dev-h", smoke=no_smoke, report=False)

            paths = [("medium", "dev-m", medium_path), ("http", "dev-h", http_path)]
            for kind, dev, fn in paths if i % 2 == 0 else paths[::-1]:
                init_dev(workdir / dev, url, repo.trusted_root)
                drop_dirty_pages()
                secs, res = timed(fn)
                if res.status != "updated" or res.outcomes[0].version != "1.1.0":
                    raise RuntimeError(f"{kind} update failed: {res.to_dict()}")
                row[kind] = round(secs, 4)
            row["ratio"] = ratio(row["medium"], row["http"])
            updates.append(row)
            log(f"update round {i + 1}: medium {row['medium']:.2f}s, http {row['http']:.2f}s")
    shutil.rmtree(media, ignore_errors=True)
    ratio_update = statistics.median(r["ratio"] for r in updates)
    return {
        "benchmark": "offline",
        "size_mb": size_mb,
        "repeat": repeat,
        "server": server,
        "export": {
            "rounds": exports,
            "full_bytes": exports[0]["full"]["bytes"],
            "delta_bytes": exports[0]["delta"]["bytes"],
            "full_seconds": _spread([r["full"]["seconds"] for r in exports]),
            "delta_seconds": _spread([r["delta"]["seconds"] for r in exports]),
            "ratio_bytes": exports[0]["ratio_bytes"],
            "ratio_seconds": _spread([r["ratio_seconds"] for r in exports]),
        },
        "update": {
            "rounds": updates,
            "medium_seconds": _spread([r["medium"] for r in updates]),
            "http_seconds": _spread([r["http"] for r in updates]),
            "ratio": _spread([r["ratio"] for r in updates]),
        },
        "goal": GOAL,
        "goal_met": ratio_update <= GOAL,
        "environment": environment(),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def render(doc: dict[str, Any]) -> str:
    e, u = doc["export"], doc["update"]
    t1 = table(
        f"Export of {doc['size_mb']} MB 1.1.0 (10 % fine-tune of 1.0.0), {doc['repeat']} rounds",
        ["medium", "MiB", "seconds (median)", "min", "max"],
        [["full", mb(e["full_bytes"]), *e["full_seconds"].values()],
         ["delta (--have 1.0.0)", mb(e["delta_bytes"]), *e["delta_seconds"].values()]],
    )  # fmt: skip
    t2 = table(
        f"Device update to 1.1.0: medium folder vs loopback HTTP ({doc['server']})",
        ["path", "seconds (median)", "min", "max"],
        [["medium", *u["medium_seconds"].values()], ["http", *u["http_seconds"].values()]],
    )
    return "\n\n".join([
        t1, f"delta / full: bytes {e['ratio_bytes']}, seconds {e['ratio_seconds']['median']}",
        t2, f"medium / http: {u['ratio']['median']} (min {u['ratio']['min']}, max "
        f"{u['ratio']['max']}); goal <= {doc['goal']}: {'met' if doc['goal_met'] else 'NOT met'}",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "offline media")
    parser.add_argument("--size-mb", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--server", choices=["process", "thread"], default="process")
    args = parser.parse_args(argv)
    with scratch_dir(args.workdir) as work:
        doc = run(args.size_mb, max(1, args.repeat), work, args.server)
    emit(doc, render(doc), args.json)


if __name__ == "__main__":
    main()
