"""A fleet-service peer for device tests: a real HTTP server that speaks the device's side of
``edge-ota.report/1`` (``ota.client._report``), stores what it receives and acks it.

Not the fleet service: just enough of its contract to test the device end to end over HTTP.
``replies`` scripts the next answers (a status and a body, or ``"ack"`` for the normal one);
by default every batch is stored and acked with its highest ``seq``. Batches are deduplicated
by ``(device, seq)`` as the real service must do (delivery is at least once).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response


@dataclass
class FleetPeer:
    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)  # path, headers, body
    events: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    replies: list[tuple[int, bytes] | str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def kinds(self, device: str) -> list[str]:
        with self.lock:
            return [e["kind"] for (d, _), e in sorted(self.events.items()) if d == device]

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        req = Request(environ)
        body = req.get_data(cache=False)
        with self.lock:
            self.requests.append({"path": req.path, "method": req.method,
                                  "headers": dict(req.headers), "body": body})
            reply = self.replies.pop(0) if self.replies else "ack"
        if reply != "ack":
            assert isinstance(reply, tuple)
            return Response(reply[1], status=reply[0])(environ, start_response)
        parts = req.path.strip("/").split("/")
        if req.method != "POST" or len(parts) != 4 or parts[:2] != ["v1", "devices"]:
            return Response(b"not found", status=404)(environ, start_response)
        doc = json.loads(body)
        device = parts[2]
        with self.lock:
            for e in doc["events"]:
                self.events[(device, e["seq"])] = e
        ack = max((e["seq"] for e in doc["events"]), default=0)
        return Response(json.dumps({"ack": ack}), status=200,
                        content_type="application/json")(environ, start_response)


@contextlib.contextmanager
def fleet_peer() -> Iterator[FleetPeer]:
    peer = FleetPeer()
    server = make_server("127.0.0.1", 0, peer, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    peer.url = f"http://127.0.0.1:{server.server_port}"
    try:
        yield peer
    finally:
        server.shutdown()
        server.server_close()
