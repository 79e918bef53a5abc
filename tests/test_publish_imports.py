"""A fresh ``ota publish`` imports only what it uses (issue 13: its fixed CPU cost), and what it
no longer imports eagerly still works where it is used.

Each probe is a fresh interpreter: the import state of this test process says nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.onnx_models import write_mlp

# `ota` with an exit hook that writes the names in sys.modules to $PROBE_OUT.
_CLI_PROBE = """
import atexit, json, os, runpy, sys
def report():
    with open(os.environ["PROBE_OUT"], "w") as out:
        json.dump(sorted(sys.modules), out)
atexit.register(report)
sys.argv = ["ota", *sys.argv[1:]]
runpy.run_module("ota.cli", run_name="__main__", alter_sys=True)
"""

# Loaded by a publish before this change, used by none: the device's HTTP stack (through
# ota.client._patch), jsonschema's format libraries for formats no CycloneDX schema names, and
# the sbom/signing modules of other commands.
_UNUSED = (
    "urllib3",
    "ssl",
    "http.client",
    "tuf.ngclient",
    "ota.client._fetch",
    "arrow",
    "dateutil",
    "webcolors",
    "uri_template",
    "cyclonedx.spdx",  # the SPDX licence index: only for --license
    "ota.sbom._diff",
    "ota.sbom._osv",
    "ota.sbom._runtime_bom",
    "ota.signing._keyless",
    "ota.signing._light_verify",
)


def _ota(tmp_path: Path, *args: str, probe: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", _CLI_PROBE] if probe else [sys.executable, "-m", "ota.cli"]
    env = dict(os.environ, PROBE_OUT=str(tmp_path / "modules.json"))
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=300, check=False, env=env
    )


def test_fresh_publish_imports_none_of_the_unused_modules(tmp_path: Path) -> None:
    proj, repo = tmp_path / "proj", tmp_path / "repo"
    init = _ota(tmp_path, "init", "--project", str(proj), "--bins", "16", str(repo))
    assert init.returncode == 0, init.stderr[-2000:]
    model = write_mlp(tmp_path / "model.onnx")
    out = _ota(tmp_path, "publish", "--project", str(proj), "--name", "m", "--version", "1.0.0",
               "--json", str(model), probe=True)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout)["version"] == "1.0.0"
    loaded = set(json.loads((tmp_path / "modules.json").read_text()))
    # the probe means something: the SBOM was strictly validated, signed, the model checked
    assert {"jsonschema._format", "ota.sbom._schema", "ota.signing._light_sign", "onnx"} <= loaded
    assert not loaded & set(_UNUSED), sorted(loaded & set(_UNUSED))


_PACKAGE_PROBE = """
import importlib, json, sys
name = sys.argv[1]
before = set(sys.modules)
package = importlib.import_module(name)
eager = sorted(m for m in set(sys.modules) - before if m.startswith(name + "."))
names = list(package.__all__)
missing = [n for n in names if n not in dir(package)]
star = {}
exec(f"from {name} import *", star)
resolved = {n: star[n] is getattr(importlib.import_module(f"{name}.{package._LAZY[n]}"), n)
            for n in names}
try:
    getattr(package, "no_such_name")
    unknown = "no error"
except AttributeError as e:
    unknown = str(e)
print(json.dumps({"eager": eager, "missing": missing, "resolved": resolved, "unknown": unknown}))
"""


def _package_probe(name: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", _PACKAGE_PROBE, name], capture_output=True,
                         text=True, timeout=120, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_sbom_and_signing_packages_import_their_modules_on_first_use() -> None:
    for name in ("ota.sbom", "ota.signing"):
        result = _package_probe(name)
        assert result["eager"] == [], result  # importing the package imports none of them
        assert result["missing"] == [], result  # dir() lists every public name
        resolved = result["resolved"]
        assert isinstance(resolved, dict) and resolved and all(resolved.values()), result
        assert result["unknown"] == f"module {name!r} has no attribute 'no_such_name'"


def test_commands_that_use_the_lazy_modules_still_run(tmp_path: Path) -> None:
    """`ota sbom diff` (ota.sbom._diff) and `ota audit` (ota.signing's verifiers), each in a
    fresh process, on a real published repository."""
    proj, repo = tmp_path / "proj", tmp_path / "repo"
    assert _ota(tmp_path, "init", "--project", str(proj), "--bins", "16", str(repo)).returncode == 0
    for version, seed in (("1.0.0", 0), ("1.1.0", 1)):
        model = write_mlp(tmp_path / f"model-{version}.onnx", seed=seed)
        out = _ota(tmp_path, "publish", "--project", str(proj), "--name", "m", "--version",
                   version, "--json", str(model))  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
    diff = _ota(tmp_path, "sbom", "diff", "--project", str(proj), "m", "1.0.0", "1.1.0", "--json")
    assert diff.returncode == 0, diff.stderr[-3000:]
    assert json.loads(diff.stdout)
    audit = _ota(tmp_path, "audit", "--project", str(proj), "m", "1.1.0", "--json")
    assert audit.returncode == 0, audit.stderr[-3000:]
    statuses = {c["name"]: c["status"] for c in json.loads(audit.stdout)["checks"]}
    assert statuses["signature"] == statuses["provenance"] == statuses["sbom"] == "ok", statuses


_MLBOM_PROBE = """
import hashlib, json, sys
from pathlib import Path
from typing import Any
from ota.sbom import build_mlbom
model = Path(sys.argv[1])
files = {"model/model.onnx": (hashlib.sha256(model.read_bytes()).hexdigest(),
                              model.stat().st_size)}
licenses = json.loads(sys.argv[2])
doc = json.loads(build_mlbom(name="m", version="1.0.0", model_path=model, files=files,
                             runtime_range=">=1.20,<2", runtime_version="1.31.1",
                             licenses=licenses))
print(json.dumps({"spdx_loaded": "cyclonedx.spdx" in sys.modules,
                  "licenses": doc["metadata"]["component"].get("licenses", [])}))
"""


def test_mlbom_loads_the_spdx_licence_index_only_for_licences(tmp_path: Path) -> None:
    """The SPDX index (about 30 ms to build) is loaded only when licences are given, and
    licences are still recognised as SPDX ids, SPDX expressions, or names."""
    model = write_mlp(tmp_path / "model.onnx")

    def probe(licenses: list[str]) -> dict[str, Any]:
        out = subprocess.run([sys.executable, "-c", _MLBOM_PROBE, str(model),
                              json.dumps(licenses)], capture_output=True, text=True,
                             timeout=300, check=False)  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        return result

    assert probe([]) == {"spdx_loaded": False, "licenses": []}
    given = probe(["Apache-2.0", "ACME model licence"])
    assert given["spdx_loaded"] is True
    assert given["licenses"] == [
        {"license": {"id": "Apache-2.0"}},
        {"license": {"name": "ACME model licence"}},
    ]
    expression = probe(["MIT OR Apache-2.0"])  # CycloneDX: an expression stands alone
    assert expression == {"spdx_loaded": True, "licenses": [{"expression": "MIT OR Apache-2.0"}]}
