"""A fleet-service peer for device tests: a real HTTP server that speaks the device's side of
``edge-ota.report/1`` (``ota.client._report``), stores what it receives and acks it.

Not the fleet service: just enough of its contract to test the device end to end over HTTP.
``replies`` scripts the next answers (a status and a body, ``"ack"`` for the normal one, or
``("slow", seconds)`` to answer normally after a pause); by default every batch is stored and
acked with its highest ``seq``. Events are deduplicated by ``(device, queue epoch, seq)`` as the
real service must do (delivery is at least once; seq restarts when a device's queue is lost).
``on_request`` runs as each request arrives (tests use it to look at the device meanwhile).

Enrolment and rotation (``ota.client._enroll``): ``tokens`` maps an enrolment token to its
uses left; ``POST /v1/enroll`` spends one and returns a fresh credential (``credentials``
keeps the current one per device); ``POST /v1/devices/<id>/credential`` with the current
credential replaces it (with the device's proposal when ``honour_proposal``, else a secret of
its own) and the old one stops working. Once a device holds a credential its events need it
(401 otherwise); ``revoked`` devices get 401. ``lose_rotation_replies`` commits that many
rotations and then answers 504, as a reply lost on the way back would.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response


@dataclass
class FleetPeer:
    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)  # path, headers, body
    events: dict[tuple[str, str, int], dict[str, Any]] = field(default_factory=dict)
    replies: list[tuple[Any, Any] | str] = field(default_factory=list)
    on_request: Callable[[], None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    tokens: dict[str, int] = field(default_factory=dict)
    credentials: dict[str, str] = field(default_factory=dict)
    enrolled_facts: dict[str, dict[str, Any]] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)
    honour_proposal: bool = True
    lose_rotation_replies: int = 0

    def kinds(self, device: str) -> list[str]:
        """Kinds of the events stored for ``device``, in the order they were first stored."""
        with self.lock:
            return [e["kind"] for (d, _, _), e in self.events.items() if d == device]

    def seqs(self) -> list[int]:
        with self.lock:
            return sorted(seq for _, _, seq in self.events)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        req = Request(environ)
        body = req.get_data(cache=False)
        if self.on_request is not None:
            self.on_request()
        with self.lock:
            self.requests.append(
                {"path": req.path, "method": req.method, "headers": dict(req.headers), "body": body}
            )
            reply = self.replies.pop(0) if self.replies else "ack"
        if isinstance(reply, tuple) and reply[0] == "slow":
            time.sleep(float(reply[1]))
        elif reply != "ack":
            assert isinstance(reply, tuple)
            return Response(reply[1], status=reply[0])(environ, start_response)
        parts = req.path.strip("/").split("/")
        if req.method == "POST" and parts == ["v1", "enroll"]:
            return self._enroll(json.loads(body))(environ, start_response)
        if req.method != "POST" or len(parts) != 4 or parts[:2] != ["v1", "devices"]:
            return Response(b"not found", status=404)(environ, start_response)
        device = parts[2]
        bearer = req.headers.get("Authorization", "").removeprefix("Bearer ")
        with self.lock:
            known = self.credentials.get(device)
            refused = device in self.revoked or (known is not None and bearer != known)
        if refused:
            return _json({"error": "unauthorised"}, 401)(environ, start_response)
        if parts[3] == "credential":
            return self._rotate(device, json.loads(body))(environ, start_response)
        doc = json.loads(body)
        with self.lock:
            for e in doc["events"]:
                self.events.setdefault((device, doc["queue"], e["seq"]), e)
        ack = max((e["seq"] for e in doc["events"]), default=0)
        return Response(json.dumps({"ack": ack}), status=200, content_type="application/json")(
            environ, start_response
        )

    def _enroll(self, doc: dict[str, Any]) -> Response:
        with self.lock:
            token, device = str(doc.get("token")), str(doc.get("device_id"))
            if self.tokens.get(token, 0) <= 0:
                return _json({"error": "enrolment token refused"}, 401)
            if device in self.credentials:
                return _json({"error": "already enrolled"}, 409)
            self.tokens[token] -= 1
            self.credentials[device] = secrets.token_urlsafe(32)
            self.enrolled_facts[device] = doc["facts"]
            return _json(
                {
                    "device_id": device,
                    "credential": self.credentials[device],
                    "ring": doc["facts"]["ring"],
                    "tier": doc["facts"]["tier"],
                },
                201,
            )

    def _rotate(self, device: str, doc: dict[str, Any]) -> Response:
        with self.lock:
            proposal = doc.get("credential")
            new = proposal if self.honour_proposal and proposal else secrets.token_urlsafe(32)
            self.credentials[device] = new
            if self.lose_rotation_replies > 0:
                self.lose_rotation_replies -= 1
                return _json({"error": "gateway timeout"}, 504)
            return _json({"credential": new}, 200)


def _json(doc: dict[str, Any], status: int) -> Response:
    return Response(json.dumps(doc), status=status, content_type="application/json")


@contextlib.contextmanager
def fleet_peer() -> Iterator[FleetPeer]:
    peer = FleetPeer()
    server = make_server("127.0.0.1", 0, peer, threaded=True)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    peer.url = f"http://127.0.0.1:{server.server_port}"
    try:
        yield peer
    finally:
        server.shutdown()
        server.server_close()
