"""A device installs only the client extra: importing the client must not need the server's
or the publisher's dependencies (flask, boto3, cyclonedx, onnx, fastcdc)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from ota.errors import ExitCode

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
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
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
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok boto3", out.stderr[-2000:]


# -- issue 12 item 6: the documented device commands on a device-only install ---------------


def test_client_only_blocker_blocks_the_publishers_modules() -> None:
    """The probe below means something: what it blocks is computed from the installed
    metadata, and covers the modules a device-only install lacks."""
    from tests.client_only import blocked_modules

    blocked = blocked_modules()
    assert {"fastcdc", "onnx", "boto3", "cyclonedx", "packageurl", "flask"} <= blocked
    assert not {"onnxruntime", "numpy", "tuf", "model_signing", "click"} & blocked


def test_device_commands_work_on_the_client_extra_and_others_name_the_extra(
    tmp_path: Path,
) -> None:
    from ota.repository._audit import AuditOptions, audit
    from ota.repository._tufview import StorageSource
    from tests.client_only import run_client_only
    from tests.repo_helpers import make_project, publish_mlp, serve_dir

    project = make_project(tmp_path)
    publish_mlp(project, "det", "1.0.0")
    root_file = project.root_dir / "root.json"
    export = tmp_path / "export"
    assert audit(StorageSource(project.storage), root_file.read_bytes(), "det", "1.0.0",
                 AuditOptions(export=export)).ok  # fmt: skip
    slots = tmp_path / "state" / "slots"
    shutil.copytree(export / "bundle", slots / "a")
    shutil.copy(export / "manifest.json", slots / "a.manifest.json")
    key = str(project.root_dir / project.config.release_pub)

    # the incident runbook's device check
    out = run_client_only(["verify", str(slots / "a"), "--signer-key", key])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RESULT: PASS" in out.stdout and "sbom-schema" in out.stdout
    # a served repository audited from a device-only machine
    with serve_dir(project.storage.local_root()) as url:  # type: ignore[arg-type]
        out = run_client_only(["audit", "det", "1.0.0", "--repo-url", url,
                               "--root", str(root_file)])  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    # tampering is still found (exit 4), without the publisher's modules
    (slots / "a" / "model" / "model.onnx").write_bytes(b"\0" * 64)
    out = run_client_only(["verify", str(slots / "a"), "--signer-key", key])
    assert out.returncode == ExitCode.SECURITY, out.stderr[-3000:]
    # publisher commands: exit 9, the extra named, no traceback
    model = tmp_path / "models" / "det-1.0.0.onnx"
    for args in (
        ["publish", str(model), "--project", str(project.root_dir), "--name", "det",
         "--version", "2.0.0"],
        ["vulns", "--project", str(project.root_dir), "--osv", str(tmp_path)],
        ["sbom", "show", "det", "1.0.0", "--project", str(project.root_dir)],
        ["verify", str(slots / "a"), "--signer-key", key, "--osv", str(tmp_path)],
    ):  # fmt: skip
        out = run_client_only(args)
        assert out.returncode == ExitCode.CONFIG, (args, out.stderr[-3000:])
        assert "pip install 'edge-ota[repository]'" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
