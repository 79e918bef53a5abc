"""The head start of a fresh ``ota publish`` (issue 13, ``ota.repository._early`` and the CLI).

The checks and the golden session may be computed before the publish asks for them, but only
ever adopted for the very file and limit they were computed for, after the same checks passed;
a failure there is the publish's own error, raised where it always was.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ota.cli._main import _register, cli
from ota.errors import ExitCode
from ota.repository import _early
from ota.repository._chunker import MAX_CHUNK
from tests.onnx_models import big_mlp, save, write_mlp
from tests.repo_helpers import make_project

_LIMIT = 1 << 30


def test_the_session_built_early_is_adopted_once(tmp_path: Path) -> None:
    model = write_mlp(tmp_path / "m.onnx")
    _early.prestart(model, _LIMIT)
    facts = _early.checked(model, _LIMIT)
    assert facts is not None
    session = _early.session(model)
    assert session is not None and session.get_inputs()  # a working onnxruntime session
    assert _early.session(model) is None  # once
    assert _early.checked(model, _LIMIT) is None


def test_nothing_is_adopted_for_another_limit(tmp_path: Path) -> None:
    model = write_mlp(tmp_path / "m.onnx")
    _early.prestart(model, _LIMIT)
    assert _early.checked(model, _LIMIT - 1) is None
    assert _early.session(model) is None  # dropped with the checks


def test_nothing_is_adopted_for_a_file_changed_since(tmp_path: Path) -> None:
    model = write_mlp(tmp_path / "m.onnx")
    _early.prestart(model, _LIMIT)
    data = model.read_bytes()
    st = model.stat()
    model.write_bytes(data)
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert _early.checked(model, _LIMIT) is None


def test_a_model_the_checks_refuse_gets_no_session(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07" + b"\xff" * 4096)
    _early.prestart(bad, _LIMIT)
    assert _early.checked(bad, _LIMIT) is None
    assert _early.session(bad) is None


def test_a_session_is_never_built_for_a_model_over_the_limit(tmp_path: Path) -> None:
    model = write_mlp(tmp_path / "m.onnx")
    _early.prestart(model, 16)  # the checks refuse it by size: no onnxruntime load at all
    assert _early.checked(model, 16) is None
    assert _early.session(model) is None


def test_discard_frees_an_unused_job(tmp_path: Path) -> None:
    model = write_mlp(tmp_path / "m.onnx")
    _early.prestart(model, _LIMIT)
    _early.discard(model)
    assert _early.checked(model, _LIMIT) is None


def test_the_cli_command_leaves_gc_and_openblas_as_it_found_them(tmp_path: Path) -> None:
    make_project(tmp_path)
    model = write_mlp(tmp_path / "m.onnx")
    assert gc.isenabled()
    before = os.environ.get("OPENBLAS_NUM_THREADS")
    _register()
    result = CliRunner().invoke(
        cli, ["publish", "--project", str(tmp_path / "proj"), "--name", "m",
              "--version", "1.0.0", "--json", str(model)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert gc.isenabled()
    assert os.environ.get("OPENBLAS_NUM_THREADS") == before


def _ota(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ota.cli", *args],
        capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip


def test_a_fresh_publish_of_a_bad_large_model_fails_on_its_check_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    """The CLI starts the chunking child and the early checks; the checks refuse the file:
    the operator sees the check's error and exit code, and no temp copy or child is left."""
    make_project(tmp_path)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07" + bytes(range(256)) * (40 * 1024))  # 10 MiB, not a model
    assert bad.stat().st_size > MAX_CHUNK
    proc = _ota("publish", "--project", str(tmp_path / "proj"), "--name", "m",
                "--version", "1.0.0", str(bad))  # fmt: skip
    assert proc.returncode == ExitCode.INPUT, proc.stderr[-2000:]
    assert "bad.onnx" in proc.stderr
    assert not list((tmp_path / "repo").rglob(".file.*"))
    assert not list((tmp_path / "repo").rglob("releases/m/*"))


def test_a_fresh_publish_over_the_size_limit_is_refused_as_before(tmp_path: Path) -> None:
    make_project(tmp_path)
    model = save(big_mlp(6), tmp_path / "big.onnx")
    proc = _ota("publish", "--project", str(tmp_path / "proj"), "--name", "m",
                "--version", "1.0.0", "--max-model-mb", "5", str(model))  # fmt: skip
    assert proc.returncode == ExitCode.INPUT, proc.stderr[-2000:]
    assert "budget" in proc.stderr
    assert not list((tmp_path / "repo").rglob(".file.*"))


@pytest.mark.parametrize("chunk_blobs", [False, True])
def test_a_fresh_publish_stores_the_model_whatever_the_layout(
    tmp_path: Path, chunk_blobs: bool
) -> None:
    """The CLI's head start with the default layout (child) and with chunk blobs (no child):
    both publish the same model entry, and the stored bytes are the model's."""
    from ota.bundle import blob_key
    from ota.repository._chunker import chunk_file

    make_project(tmp_path)
    if chunk_blobs:
        conf = tmp_path / "proj" / "ota.toml"
        conf.write_text(conf.read_text().replace("chunk_blobs = false", "chunk_blobs = true"))
    model = save(big_mlp(8), tmp_path / "big.onnx")
    proc = _ota("publish", "--project", str(tmp_path / "proj"), "--name", "m",
                "--version", "1.0.0", "--json", str(model))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    entry = chunk_file(model, "model/model.onnx", None)
    assert (tmp_path / "repo" / blob_key(entry.sha256)).read_bytes() == model.read_bytes()
    stored = {p.name for p in (tmp_path / "repo").rglob("*") if p.is_file()}
    assert (entry.chunks[0].sha256 in stored) == chunk_blobs
    assert not list((tmp_path / "repo").rglob(".file.*"))
