"""A poll with nothing new: what an up-to-date device costs the network per cycle.

A small model (``tests.onnx_models.write_mlp``, or ``big_mlp(--size-mb)``) is published as
1.0.0 and installed on a fresh device with :func:`ota.client.update_once` over loopback HTTP.
Then ``--polls`` more cycles run with nothing published in between. Requests and bytes are
counted **at the server** (``ota serve``'s app wrapped in a WSGI counter,
``bench.device_update.CountingApp``), not taken from the client's own figures; the client's
figures are reported beside them as a cross-check.

Goal: each poll makes only the next-root probe (``<n+1>.root.json``, answered 404) and the
timestamp request, under 1 KB of response bodies together. Header bytes (status line and the
app's headers; the server adds ``Server`` and ``Date``) are reported apart.

Where nginx is installed, the same polls are also served by nginx with the documented server
block (``docs/serving/nginx-site.conf``) through a TCP relay that counts every byte on the wire
both ways, request and status lines and headers included (``nginx_wire``); goal: <= 1 KB per
poll. The response heads of the last poll are printed.

Baseline for context: the first (installing) cycle's requests and bytes, and the same
measurement for the stock python-tuf ``Updater.refresh`` of an up-to-date client
(``bench.device_update.build_stock_repo`` repository, same server app).

Run: ``python -m bench.device_poll [--json] [--polls 3] [--size-mb 0]``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench._common import (
    WireCounter,
    base_parser,
    emit,
    environment,
    log,
    scratch_dir,
    table,
)
from bench.device_update import (
    Repo,
    build_model,
    build_stock_repo,
    init_dev,
    serve_counting,
    update,
    warm_up_device,
)

GOAL_BYTES = 1024


def _is_root_probe(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return path.startswith("/metadata/") and name.endswith(".root.json") and name[0].isdigit()


def run(polls: int, size_mb: int, workdir: Path) -> dict[str, Any]:
    from ota.client import update_once
    from tests.onnx_models import write_mlp
    from tests.repo_helpers import stock_updater

    t0 = time.perf_counter()
    warm_up_device(workdir)
    repo = Repo.create(workdir / "ours")
    if size_mb > 0:
        model = build_model(workdir / "model" / "model.onnx", size_mb)
    else:
        model = write_mlp(workdir / "model" / "model.onnx")
    repo.publish(model, "1.0.0")
    rounds: list[dict[str, Any]] = []
    with serve_counting(repo.root_dir) as (url, hits):
        state = init_dev(workdir / "dev", url, repo.trusted_root)
        hits.reset()
        update(state)
        install = hits.summary()
        for i in range(max(1, polls)):
            hits.reset()
            t1 = time.perf_counter()
            result = update_once(state)
            secs = time.perf_counter() - t1
            if result.status != "up_to_date":
                raise RuntimeError(f"poll {i + 1} was not up to date: {result.to_dict()}")
            seen = hits.snapshot()
            body = sum(h.body_bytes for h in seen)
            probe_and_ts = (
                len(seen) == 2
                and sum(1 for h in seen if _is_root_probe(h.path) and h.status == 404) == 1
                and sum(1 for h in seen if h.path == "/metadata/timestamp.json") == 1
            )
            rounds.append(
                {
                    "requests": len(seen),
                    "body_bytes": body,
                    "header_bytes": sum(h.header_bytes for h in seen),
                    "hits": [
                        {"path": h.path, "status": h.status, "body_bytes": h.body_bytes}
                        for h in seen
                    ],
                    "client_requests": result.requests,
                    "client_bytes": result.bytes,
                    "seconds": round(secs, 4),
                    "only_root_probe_and_timestamp": probe_and_ts,
                    "goal_met": probe_and_ts and body < GOAL_BYTES,
                }
            )
            log(f"poll {i + 1}: {len(seen)} requests, {body} bytes")

    # stock python-tuf, for context: a second refresh of an up-to-date client
    stock_root = build_stock_repo(workdir / "stock-repo", model)
    with serve_counting(workdir / "stock-repo") as (stock_url, stock_hits):
        stock_updater(stock_url, stock_root, workdir / "stock-client").refresh()
        stock_hits.reset()
        stock_updater(stock_url, stock_root, workdir / "stock-client").refresh()
        stock = stock_hits.summary()
        stock["hits"] = [
            {"path": h.path, "status": h.status, "body_bytes": h.body_bytes}
            for h in stock_hits.snapshot()
        ]

    wire = wire_polls(repo, polls, workdir) if nginx_available() else None
    last = rounds[-1]
    return {
        "nginx_wire": wire,
        "benchmark": "device_poll",
        "polls": rounds,
        "requests": last["requests"],
        "body_bytes": last["body_bytes"],
        "header_bytes": last["header_bytes"],
        "install": install,
        "stock_refresh_up_to_date": stock,
        "goal_bytes": GOAL_BYTES,
        "goal_met": all(r["goal_met"] for r in rounds) and (wire is None or wire["goal_met"]),
        "environment": environment(),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def nginx_available() -> bool:
    from tests import nginx

    return nginx.binary() is not None


def wire_polls(repo: Repo, polls: int, workdir: Path) -> dict[str, Any]:
    """The same polls served by nginx with the documented server block, counted on the wire
    by a TCP relay in front of it (:class:`bench._common.WireCounter`): request and response
    bytes, status lines and headers included. Goal: under 1 KB per poll in all."""
    from ota.client import update_once
    from tests.nginx import serve_static

    rounds = []
    with serve_static(repo.root_dir) as upstream, WireCounter(upstream) as wire:
        state = init_dev(workdir / "dev-wire", wire.url, repo.trusted_root)
        update(state)
        for _ in range(max(1, polls)):
            wire.reset()
            result = update_once(state)
            if result.status != "up_to_date":
                raise RuntimeError(f"poll was not up to date: {result.to_dict()}")
            rounds.append({"sent": wire.sent, "received": wire.received,
                           "total": wire.sent + wire.received})  # fmt: skip
        heads = [
            block.split(b"\r\n\r\n", 1)[0].decode("latin-1")
            for block in wire.responses.split(b"HTTP/1.1 ")[1:]
        ]
    last = rounds[-1]
    return {
        "polls": rounds,
        "total_bytes": last["total"],
        "request_bytes": last["sent"],
        "response_bytes": last["received"],
        "response_heads": ["HTTP/1.1 " + h for h in heads],
        "goal_met": all(r["total"] <= GOAL_BYTES for r in rounds),
    }


def render(doc: dict[str, Any]) -> str:
    rows: list[list[object]] = []
    for i, r in enumerate(doc["polls"]):
        for h in r["hits"]:
            rows.append([i + 1, h["path"], h["status"], h["body_bytes"]])
        rows.append([i + 1, "total", f"{r['requests']} req", r["body_bytes"]])
    goal = "met" if doc["goal_met"] else "NOT met"
    stock = doc["stock_refresh_up_to_date"]
    return "\n".join(
        [
            table(
                f"device_poll: cycles with nothing new, counted at the server"
                f" (goal: root probe + timestamp, < {GOAL_BYTES} B: {goal})",
                ["poll", "path", "status", "body bytes"],
                rows,
            ),
            "",
            f"headers (app's, per poll): {doc['header_bytes']} B;"
            f" first install for context: {doc['install']['requests']} requests,"
            f" {doc['install']['body_bytes']} B",
            f"stock python-tuf refresh of an up-to-date client: {stock['requests']} requests,"
            f" {stock['body_bytes']} B",
            *_render_wire(doc.get("nginx_wire")),
        ]
    )


def _render_wire(wire: dict[str, Any] | None) -> list[str]:
    if wire is None:
        return ["", "nginx not installed: no on-the-wire figure"]
    goal = "met" if wire["goal_met"] else "NOT met"
    return [
        "",
        f"through nginx, on the wire, per poll: {[r['total'] for r in wire['polls']]} B"
        f" (requests {wire['request_bytes']} B + responses {wire['response_bytes']} B, headers"
        f" included; goal <= {GOAL_BYTES} B: {goal})",
        "response heads of the last poll:",
        *("  " + h.replace("\r\n", " | ") for h in wire["response_heads"]),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0] if __doc__ else "device_poll")
    parser.add_argument("--polls", type=int, default=3)
    parser.add_argument(
        "--size-mb",
        type=int,
        default=0,
        help="model size (0: a small MLP; the size does not change a poll)",
    )
    args = parser.parse_args(argv)
    with scratch_dir(args.workdir) as work:
        doc = run(args.polls, args.size_mb, work)
    emit(doc, render(doc), args.json)


if __name__ == "__main__":
    main()
