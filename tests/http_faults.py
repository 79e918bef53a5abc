"""A real HTTP server on 127.0.0.1 that serves a folder with Range support and injectable faults.

Faults are matched by a substring of the request path and consumed ``times`` times:

* ``reset`` - send headers and ``after`` bytes of the body, then reset the connection (RST);
* ``status`` - answer with ``status`` (e.g. 503) and a short body;
* ``truncate`` - announce the full length, send ``after`` bytes, close cleanly;
* ``drip`` - send the body ``step`` bytes at a time with ``delay`` seconds between writes;
* ``endless`` - announce no length and send bytes until the client hangs up;
* ``norange`` - ignore a Range header and send the whole file (or ``body``) with 200;
* ``replace`` - serve ``body`` instead of the file (tampering);
* ``badrange`` - answer a range with ``Content-Range: <content_range>`` (a lying server);
* ``overlong`` - answer a range with ``after`` bytes more than asked (and announce them).

Ranges are ``bytes=<start>-`` or ``bytes=<start>-<end>`` (one range; the end is clamped).

Every request is logged as (path, range header, status) so tests can assert on resumes.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Fault:
    kind: str
    match: str = ""
    times: int = 1
    status: int = 503
    after: int = 0
    step: int = 1
    delay: float = 0.0
    body: bytes = b""
    content_range: str = ""


@dataclass
class FaultServer:
    root: Path
    faults: list[Fault] = field(default_factory=list)
    log: list[tuple[str, str | None, int]] = field(default_factory=list)
    url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, match: str = "", **kw: object) -> Fault:
        f = Fault(kind, match, **kw)  # type: ignore[arg-type]
        with self._lock:
            self.faults.append(f)
        return f

    def take(self, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.match in path and f.times > 0:
                    f.times -= 1
                    return f
        return None

    def requests(self, match: str = "") -> list[tuple[str, str | None, int]]:
        with self._lock:
            return [r for r in self.log if match in r[0]]

    def record(self, path: str, rng: str | None, status: int) -> None:
        with self._lock:
            self.log.append((path, rng, status))


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        fs = self.server.fs
        path = self.path.split("?", 1)[0]
        rng = self.headers.get("Range")
        fault = fs.take(path)
        if fault and fault.kind == "status":
            self._simple(fault.status, path, rng)
            return
        if fault and fault.kind == "endless":
            self._endless(path, rng)
            return
        replaced = fault and (fault.kind == "replace" or (fault.kind == "norange" and fault.body))
        data = fault.body if fault and replaced else self._read(path)
        if data is None:
            self._simple(404, path, rng)
            return
        status, start, last = 200, 0, len(data) - 1
        if rng and not (fault and fault.kind == "norange") and rng.startswith("bytes="):
            first, _, end = rng[6:].partition("-")
            start = int(first)
            last = min(int(end), len(data) - 1) if end else len(data) - 1
            if start >= len(data) or last < start:
                self._simple(416, path, rng)
                return
            status = 206
        body = data[start : last + 1]
        if fault and fault.kind == "overlong":
            body += b"\xee" * fault.after
        fs.record(path, rng, status)
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            content_range = f"bytes {start}-{last}/{len(data)}"
            if fault and fault.kind == "badrange":
                content_range = fault.content_range
            self.send_header("Content-Range", content_range)
        self.end_headers()
        self._body(body, fault)

    def _body(self, body: bytes, fault: Fault | None) -> None:
        try:
            if fault is None or fault.kind in ("replace", "norange", "badrange", "overlong"):
                self.wfile.write(body)
            elif fault.kind == "reset":
                self.wfile.write(body[: fault.after])
                self.wfile.flush()
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                self.close_connection = True
            elif fault.kind == "truncate":
                self.wfile.write(body[: fault.after])
                self.close_connection = True
            elif fault.kind == "drip":
                for i in range(0, len(body), fault.step):
                    self.wfile.write(body[i:i + fault.step])
                    self.wfile.flush()
                    time.sleep(fault.delay)
        except OSError:
            self.close_connection = True

    def _endless(self, path: str, rng: str | None) -> None:
        self.server.fs.record(path, rng, 200)
        self.send_response(200)
        self.end_headers()
        self.close_connection = True
        try:
            block = b"\0" * 65536
            for _ in range(1 << 16):  # bounded so a broken client cannot hang the test forever
                self.wfile.write(block)
        except OSError:
            pass

    def _simple(self, status: int, path: str, rng: str | None) -> None:
        self.server.fs.record(path, rng, status)
        body = f"status {status}".encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _read(self, path: str) -> bytes | None:
        root = self.server.fs.root.resolve()
        target = (root / path.lstrip("/")).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            return None
        return target.read_bytes()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fs: FaultServer

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients hanging up mid-body is what these tests do


@contextmanager
def serve(root: Path) -> Iterator[FaultServer]:
    """Serve ``root`` on an ephemeral port; yield the FaultServer (``.url``, ``.add``, ``.log``)."""
    fs = FaultServer(Path(root))
    server = _Server(("127.0.0.1", 0), _Handler)
    server.fs = fs
    fs.url = f"http://127.0.0.1:{server.server_address[1]}"
    # shutdown() waits for the loop's next poll: 0.5 s by default, paid by every test
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    try:
        yield fs
    finally:
        server.shutdown()
        server.server_close()
