"""A real static web server for tests and benchmarks: nginx serving a repository folder.

Devices fetch from S3, a CDN or a plain web server in production, never from Python. This
starts Debian's nginx (``nginx-light``; ``.ci/run`` installs it) in its own process group on a
free loopback port with the documented server block ``docs/serving/nginx-site.conf``, so the
tests prove that the documented mirror works and the benchmarks measure the device against a
server whose per-request cost is that of a real one.

``serve_static(root)`` yields the base URL; ``available()`` says whether nginx is installed
(tests that need it are skipped with that reason on a developer machine without it; CI has it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

SITE_CONF = Path(__file__).resolve().parents[1] / "docs" / "serving" / "nginx-site.conf"
_CANDIDATES = ("nginx", "/usr/sbin/nginx")


def binary() -> str | None:
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def available() -> bool:
    """Whether nginx can be used. Where ``OTA_REQUIRE_NGINX`` is set (CI installs nginx) this
    is always True, so a missing nginx fails the tests that need it instead of skipping them."""
    return binary() is not None or bool(os.environ.get("OTA_REQUIRE_NGINX"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(work: Path, root: Path, port: int) -> Path:
    site = SITE_CONF.read_text(encoding="utf-8")
    site = site.replace("@LISTEN@", f"127.0.0.1:{port}").replace("@ROOT@", str(root.resolve()))
    (work / "site.conf").write_text(site, encoding="utf-8")
    temp = {k: work / k for k in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for d in temp.values():
        d.mkdir(exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must read pytest's tmp dirs
    conf = (
        f"{user}daemon off;\nworker_processes 1;\npid {work / 'nginx.pid'};\n"
        f"error_log {work / 'error.log'} warn;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        "  access_log off;\n"
        "  default_type application/octet-stream;\n"
        "  types { application/json json; }\n"
        f"  client_body_temp_path {temp['body']};\n  proxy_temp_path {temp['proxy']};\n"
        f"  fastcgi_temp_path {temp['fastcgi']};\n  uwsgi_temp_path {temp['uwsgi']};\n"
        f"  scgi_temp_path {temp['scgi']};\n"
        f"  include {work / 'site.conf'};\n"
        "}\n"
    )
    path = work / "nginx.conf"
    path.write_text(conf, encoding="utf-8")
    return path


@contextlib.contextmanager
def serve_static(root: Path) -> Iterator[str]:
    """Serve ``root`` (a repository folder) with nginx; yield ``http://127.0.0.1:<port>``."""
    exe = binary()
    if exe is None:
        raise RuntimeError("nginx is not installed (Debian: apt-get install nginx-light)")
    with tempfile.TemporaryDirectory(prefix="ota-nginx-") as tmp:
        work = Path(tmp)
        port = _free_port()
        conf = _config(work, root, port)
        proc = subprocess.Popen(
            [exe, "-p", str(work), "-c", str(conf), "-e", str(work / "error.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(proc, url, work)
            yield url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            if proc.stderr:
                proc.stderr.close()


def _wait_ready(proc: subprocess.Popen[bytes], url: str, work: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            log = (work / "error.log").read_text(errors="replace") if (
                work / "error.log").exists() else ""
            raise RuntimeError(f"nginx exited with {proc.returncode}: {err}{log}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    raise RuntimeError("nginx did not become ready within 15 s")
