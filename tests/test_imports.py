"""A device installs only the client extra: importing the client must not need the server's
or the publisher's dependencies (flask, boto3, cyclonedx, onnx, fastcdc)."""

from __future__ import annotations

import subprocess
import sys

# Run in a fresh interpreter in which those packages cannot be imported at all, as on a device
# that never installed them (securesystemslib and tuf import boto3 only if it is installed).
_PROBE = """
import importlib.abc, sys
BLOCKED = ("flask", "boto3", "botocore", "cyclonedx", "onnx", "fastcdc", "sqlalchemy", "moto",
           "alembic", "psycopg", "gunicorn", "prometheus_client", "werkzeug")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED and name != "onnxruntime":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)")
        return None
sys.meta_path.insert(0, Block())
import ota, ota.bundle, ota.client
from ota.client import _smoke
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not loaded, loaded
print("ok")
"""


def test_client_imports_without_server_dependencies() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"


def test_cli_help_is_cheap_and_lists_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ota.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    for cmd in ("init", "publish", "promote", "rollback", "yank", "releases", "gc", "serve"):
        assert cmd in out.stdout


_DEVICE_CLI_PROBE = """
import atexit, sys
def report():
    sdk = sorted(m for m in ("boto3", "botocore") if sys.modules.get(m) is not None)
    print("SDK", sdk, "TUF", "tuf.ngclient" in sys.modules, file=sys.stderr)
atexit.register(report)
from ota.cli import main
sys.argv = ["ota", "device", "status", "--state-dir", sys.argv[1]]
main()
"""


def test_device_commands_keep_cloud_sdks_out_even_when_installed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """boto3 is installed here (the publisher needs it); the device process must still not
    load it through securesystemslib's optional KMS signers (memory, attack surface)."""
    import importlib.util

    assert importlib.util.find_spec("boto3") is not None  # the probe means something
    out = subprocess.run(
        [sys.executable, "-c", _DEVICE_CLI_PROBE, str(tmp_path / "no-device")],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert "SDK [] TUF True" in out.stderr, out.stderr[-3000:]


def test_lean_device_process_leaves_boto3_importable_afterwards() -> None:
    """Only securesystemslib's import is kept away from the SDKs: code that runs later in the
    same process (a CLI embedded in an app, a test runner) can still import boto3."""
    probe = (
        "import sys\n"
        "from ota._lean import lean_device_process\n"
        "assert lean_device_process() == ['boto3', 'botocore']\n"
        "import tuf.ngclient\n"
        "assert 'boto3' not in sys.modules\n"
        "import boto3\n"
        "print('ok', boto3.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok boto3", out.stderr[-2000:]
