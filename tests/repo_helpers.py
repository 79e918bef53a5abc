"""Shared helpers for tests that need a real repository: init, publish, serve over HTTP.

Nothing here is a mock: a repository is created with ``init_project`` in a real folder (or a
real S3 endpoint), models are real ONNX files, and serving is real HTTP on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ota.repository import Project, PublishRequest, PublishResult, init_project, publish
from ota.repository._chunkjob import ChunkJob
from ota.repository._fileblob import new_copy_path
from tests.onnx_models import write_mlp


def make_project(
    tmp: Path, storage_url: str | None = None, *, bins: int = 16, **kw: Any
) -> Project:
    """Init a project in ``tmp/proj`` with storage ``tmp/repo`` (or ``storage_url``)."""
    storage = storage_url or str(tmp / "repo")
    s3_endpoint = kw.pop("s3_endpoint", None)
    init_project(tmp / "proj", storage, bins=bins, s3_endpoint=s3_endpoint, **kw)
    return Project.open(tmp / "proj")


def publish_mlp(
    project: Project, name: str, version: str, *, seed: int = 0, **kw: Any
) -> PublishResult:
    """Build a small MLP (deterministic for ``seed``) and publish it."""
    model = project.root_dir.parent / "models" / f"{name}-{version}.onnx"
    if not model.exists():
        write_mlp(model, seed=seed)
    return publish(project, PublishRequest(source=model, name=name, version=version, **kw))


@contextlib.contextmanager
def serve_dir(root: Path) -> Iterator[str]:
    """Serve a local repository folder with ``ota serve``'s app; yield its base URL."""
    from ota.repository._serve import make_server

    server = make_server(root, "127.0.0.1", 0)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def stock_updater(base_url: str, trusted_root: bytes, work: Path) -> Any:
    """A stock python-tuf ``Updater`` (not our client) pointed at a served repository."""
    from tuf.ngclient import Updater

    (work / "metadata").mkdir(parents=True, exist_ok=True)
    (work / "targets").mkdir(parents=True, exist_ok=True)
    return Updater(
        metadata_dir=str(work / "metadata"),
        metadata_base_url=f"{base_url}/metadata/",
        target_dir=str(work / "targets"),
        target_base_url=f"{base_url}/targets/",
        bootstrap=trusted_root,
    )


def fake_chunk_child(tmp_path: Path, code: str) -> ChunkJob:
    """A real child process running ``code`` in place of the chunking child (ADR 0018), as
    the parent sees it: a 1000-byte source, a fresh temp copy in ``tmp_path/blobs``."""
    source = tmp_path / "src"
    source.write_bytes(b"\0" * 1000)
    copy = new_copy_path(tmp_path / "blobs")
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    return ChunkJob(source, copy, 1000, proc)
