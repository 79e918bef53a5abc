"""The end-to-end demo on embedded defaults: every step is a real `ota` command.

init a repository in a local folder -> publish a model it builds itself -> serve it over HTTP ->
start the fleet service (embedded SQLite) -> enrol a simulated device with a token -> update it
-> publish a fine-tune to the canary ring -> delta update -> audit -> yank -> the device reverts
by itself -> the audit log -> the fleet status shows the device on the version it committed.

Everything is written under demo-out/ (removed first). Exit status is non-zero if any step
does something other than expected.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "demo-out"
OTA = [sys.executable, "-m", "ota.cli"]


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def ota(*args: str, expect: int = 0) -> str:
    print("$ ota " + " ".join(args), flush=True)
    proc = subprocess.run([*OTA, *args], capture_output=True, text=True, check=False)
    out = proc.stdout + proc.stderr
    print(out.rstrip())
    if proc.returncode != expect:
        sys.exit(f"demo: `ota {args[0]}` exited {proc.returncode}, expected {expect}")
    return proc.stdout


def build_models() -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT))
    from tests.onnx_models import big_mlp, fine_tune, save

    base = big_mlp(8, layers=8)  # an 8 MB MLP: big enough to show delta updates
    v1 = save(base, OUT / "models" / "detector-1.0.0.onnx")
    v2 = save(fine_tune(base, 0.1), OUT / "models" / "detector-1.1.0.onnx")
    return v1, v2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str) -> None:
    for _ in range(100):
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - loopback only
                return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"demo: {url} did not come up")


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    os.chdir(OUT)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    fleet_port = free_port()
    fleet = f"http://127.0.0.1:{fleet_port}"

    step("build two versions of a model with onnx.helper (v1.1.0 fine-tunes 10% of weights)")
    v1, v2 = build_models()
    print(f"{v1.name}: {v1.stat().st_size} bytes, {v2.name}: {v2.stat().st_size} bytes")

    step("create a repository (local folder, TUF metadata, keys by URI)")
    ota("init", "repo", "--project", "proj", "--base-url", base, "--bins", "64")

    step("publish 1.0.0 to everyone: checks, golden outputs, SBOM, provenance, signature")
    ota("publish", str(v1), "--project", "proj", "--name", "detector", "--version", "1.0.0",
        "--ring", "ga", "--budget", "*:1000:1024", "--license", "Apache-2.0")

    step("serve the repository read-only over HTTP (devices could use S3 or a CDN instead)")
    server = subprocess.Popen([*OTA, "serve", "--project", "proj", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    step("start the fleet service (gunicorn, embedded SQLite file proj/fleet.sqlite3)")
    print(f"$ ota fleet serve --project proj --bind 127.0.0.1:{fleet_port} &", flush=True)
    fleet_log = (OUT / "fleet.log").open("wb")
    fleet_proc = subprocess.Popen(
        [*OTA, "fleet", "serve", "--project", "proj", "--bind", f"127.0.0.1:{fleet_port}"],
        stdout=fleet_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"{base}/healthz")
        wait_http(f"{fleet}/v1/health")
        run_device_story(base, fleet)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=10)
        fleet_proc.send_signal(signal.SIGTERM)  # gunicorn's master stops its workers
        fleet_proc.wait(timeout=30)
        fleet_log.close()
    step("done: everything is in demo-out/")


def run_device_story(base: str, fleet: str) -> None:
    step("an operator creates a one-use enrolment token for the canary ring")
    token = json.loads(ota("fleet", "enroll-token", "create", "--project", "proj",
                           "--ring", "canary", "--expires", "1h", "--json"))["token"]

    step("a device (canary ring) enrols, then installs 1.0.0: verify, fetch, stage, smoke, "
         "commit; its events go to the fleet service")
    os.environ["OTA_ENROLL_TOKEN"] = token  # not on the command line (visible in ps)
    ota("device", "init", "--state-dir", "device", "--repo-url", base, "--root",
        "proj/root.json", "--device-id", "camera-017", "--model", "detector",
        "--ring", "canary", "--health-timeout", "0", "--fleet-url", fleet)
    del os.environ["OTA_ENROLL_TOKEN"]
    ota("device", "update", "--state-dir", "device")
    ota("device", "update", "--state-dir", "device", expect=10)  # nothing new: exit 10

    step("publish the fine-tune 1.1.0 to the canary ring only")
    ota("publish", str(OUT / "models" / "detector-1.1.0.onnx"), "--project", "proj",
        "--name", "detector", "--version", "1.1.0", "--ring", "canary",
        "--budget", "*:1000:1024")

    step("the device takes 1.1.0 and downloads only the chunks it lacks (delta)")
    out = ota("device", "update", "--state-dir", "device", "--json")
    doc = json.loads(out)
    full = (OUT / "models" / "detector-1.1.0.onnx").stat().st_size
    print(f"downloaded {doc['bytes']} bytes for a {full}-byte model "
          f"({100 * doc['bytes'] / full:.1f}%)")
    ota("device", "status", "--state-dir", "device")

    step("the security team audits the release")
    ota("audit", "detector", "1.1.0", "--project", "proj")

    step("the canary looks bad: yank 1.1.0; the device reverts by itself on its next poll")
    ota("yank", "detector", "1.1.0", "--project", "proj")
    ota("device", "update", "--state-dir", "device")
    ota("device", "current", "--state-dir", "device")

    step("roll everyone back with a new release over the old chunks (nothing re-uploaded)")
    ota("rollback", "detector", "--to", "1.0.0", "--project", "proj")
    ota("releases", "detector", "--project", "proj")

    step("the append-only audit log, and its verification")
    ota("log", "--project", "proj")
    ota("log", "verify", "--project", "proj")

    step("the fleet sees the device on the version it committed")
    ota("device", "report", "--state-dir", "device")
    ota("fleet", "status", "--project", "proj")
    check_fleet_status()


def check_fleet_status() -> None:
    committed = json.loads(ota("device", "status", "--state-dir", "device", "--json"))
    version = committed["models"]["detector"]["current_version"]
    status = json.loads(ota("fleet", "status", "--project", "proj", "--json"))
    seen = [(m["model"], m["version"], m["devices"]) for m in status["models"]]
    if seen != [("detector", version, 1)]:
        sys.exit(f"demo: the fleet shows {seen}, the device committed detector {version}")
    confirmed = {(r["model"], r["version"]): r["confirmed"] for r in status["releases"]}
    if not confirmed.get(("detector", version)):
        sys.exit(f"demo: the fleet has no confirmed install of detector {version}")
    print(f"fleet: camera-017 runs detector {version}, committed and confirmed")


if __name__ == "__main__":
    main()
