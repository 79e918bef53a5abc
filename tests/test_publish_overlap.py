"""The overlap of a publish (issue 13): the model file is chunked while the checks run.

A check that fails must stop that early chunking (it is the publisher's time, and the error
the operator sees must be the check's), and a model the checks reject publishes nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ota.errors import InputError
from ota.repository import PublishRequest, publish
from ota.repository._chunker import Uploader
from ota.repository._fileblob import blob_copy_path
from ota.repository._publish import _chunk_model_early, _Stopped
from ota.repository._storage import FileStorage
from tests.repo_helpers import make_project


def _copies_in(store: FileStorage, scratch: Path) -> Callable[[Path], Path | None]:
    return lambda src: blob_copy_path(store, src, scratch)


def test_early_chunking_stops_once_told(tmp_path: Path) -> None:
    source = tmp_path / "model.onnx"
    source.write_bytes(bytes(range(256)) * (32 * 1024))  # 8 MiB: several chunks
    store = FileStorage(tmp_path / "repo")
    stop = threading.Event()
    stop.set()  # the checks failed before the first chunk was cut
    req = PublishRequest(source=source, name="m", version="1.0.0")
    copies: dict[str, Path | None] = {}
    with ThreadPoolExecutor(max_workers=1) as side, Uploader(store) as up:
        job = _chunk_model_early(side, req, up, None, stop, _copies_in(store, tmp_path), copies)
        assert job is not None
        with pytest.raises(_Stopped):
            job.result()
        assert up.stats.chunks_total <= 1  # stopped at its first chunk, not at the end
    copy = copies["model/model.onnx"]
    assert copy is not None and copy.parent == tmp_path / "repo" / "blobs" / "sha256"
    assert not copy.exists()  # the file-blob copy of a stopped chunking is removed


def test_no_early_chunking_for_what_the_checks_refuse_by_size(tmp_path: Path) -> None:
    source = tmp_path / "model.onnx"
    source.write_bytes(b"\0" * 4096)
    req = PublishRequest(source=source, name="m", version="1.0.0", max_model_bytes=1024)
    store = FileStorage(tmp_path / "r")
    copies: dict[str, Path | None] = {}
    with ThreadPoolExecutor(max_workers=1) as side, Uploader(store) as up:
        assert _chunk_model_early(
            side, req, up, None, threading.Event(), _copies_in(store, tmp_path), copies
        ) is None  # fmt: skip
        folder = PublishRequest(source=tmp_path, name="m", version="1.0.0")
        assert _chunk_model_early(
            side, folder, up, None, threading.Event(), _copies_in(store, tmp_path), copies
        ) is None  # fmt: skip
    assert copies == {}


def test_a_model_the_checks_reject_publishes_nothing(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07" + bytes(range(256)) * (64 * 1024))  # 16 MiB, not a model
    with pytest.raises(InputError) as err:
        publish(project, PublishRequest(source=bad, name="m", version="1.0.0"))
    assert "bad.onnx" in str(err.value)  # the check's own error, not the stopped chunking
    assert not list((tmp_path / "repo").rglob("releases/m/*"))
    # the file-blob copy the chunking was writing is not left behind, stored or not
    assert not list((tmp_path / "repo").rglob(".file.*"))


_CLI_REPORTS_MODULES = """
import atexit, runpy, sys
atexit.register(lambda: print("BOTO3", "boto3" in sys.modules, file=sys.stderr))
sys.argv = ["ota", *sys.argv[1:]]
runpy.run_module("ota.cli", run_name="__main__", alter_sys=True)
"""


def test_a_file_storage_publish_keeps_the_aws_sdk_out(tmp_path: Path) -> None:
    """A fresh ``ota publish`` into a local folder with key-file signers never imports boto3
    (securesystemslib's KMS signer would), and still publishes."""
    import subprocess
    import sys

    from tests.onnx_models import write_mlp

    make_project(tmp_path)
    model = write_mlp(tmp_path / "m.onnx")
    proc = subprocess.run(
        [sys.executable, "-c", _CLI_REPORTS_MODULES, "publish", "--project",
         str(tmp_path / "proj"), "--name", "m", "--version", "1.0.0", "--json", str(model)],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "BOTO3 False" in proc.stderr
    assert list((tmp_path / "repo").rglob("releases/m/*1.0.0.json"))
