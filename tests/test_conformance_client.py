"""``ota-conformance-client`` speaks the tuf-conformance protocol against a real repository."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from urllib import parse

import pytest

from ota.client.conformance import main
from tests import http_faults
from tests.repo_helpers import make_project


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("conf")
    make_project(root, bins=4)
    return root / "repo"


def test_init_refresh_download(repo: Path, tmp_path: Path) -> None:
    md, tg = tmp_path / "md", tmp_path / "tg"
    tg.mkdir()
    root = repo / "metadata" / "1.root.json"
    assert main(["--metadata-dir", str(md), "init", str(root)]) == 0
    assert not (md / "timestamp.json").exists()  # init makes no request
    with http_faults.serve(repo) as fs:
        murl = fs.url + "/metadata"
        assert main(["--metadata-dir", str(md), "--metadata-url", murl, "refresh"]) == 0
        assert {p.name for p in md.glob("*.json")} >= {"root.json", "timestamp.json",
                                                         "snapshot.json", "targets.json"}
        args = ["--metadata-dir", str(md), "--metadata-url", murl, "--target-name",
                "trust/signers.json", "--target-base-url", fs.url + "/targets",
                "--target-dir", str(tg), "download"]
        assert main(args) == 0
        got = tg / parse.quote("trust/signers.json", "")
        assert b"public_key_pem" in got.read_bytes()
        n = len(fs.requests("/targets/"))
        assert main(args) == 0 and len(fs.requests("/targets/")) == n  # cached, not re-fetched
        bad = [*args[:5], "nope.txt", *args[6:]]
        assert main(bad) == 1
        fs.add("endless", "/metadata/timestamp.json")
        assert main(["--metadata-dir", str(md), "--metadata-url", murl, "refresh"]) == 1


def test_console_script_exit_codes(tmp_path: Path) -> None:
    exe = shutil.which("ota-conformance-client", path=str(Path(sys.executable).parent))
    assert exe is not None
    out = subprocess.run([exe, "--metadata-dir", str(tmp_path), "init", str(tmp_path / "none")],
                         capture_output=True, check=False)
    assert out.returncode == 1
