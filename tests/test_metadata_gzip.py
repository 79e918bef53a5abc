"""gzip for the metadata that grows, without nginx (ADR 0010): ``ota serve`` negotiates it,
an ``s3://`` repository stores it ``Content-Encoding: gzip``.

Real HTTP throughout: ``ota serve``'s app on a loopback port, moto's S3 server (the device
and the stock python-tuf client fetch from the bucket's HTTP endpoint). Each test checks what
is compressed, what never is (``timestamp.json`` and roots: the idle poll), that the bytes
decode to exactly the signed file, and that both clients verify the result.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import boto3
import pytest
import urllib3

from ota.bundle import manifest_target_path
from ota.client._fetch import FetchConfig, make_pool
from ota.client._tuf import TufSession
from ota.errors import SecurityError
from ota.repository import Project
from ota.repository._s3 import S3Storage
from ota.repository._storage import GZIP_MIN_BYTES, TooLarge, gzip_eligible
from tests.repo_helpers import make_project, publish_mlp, serve_dir, stock_updater

pytest_plugins = ["tests.s3server"]
POLICY = Path(__file__).resolve().parents[1] / "docs" / "serving" / "s3-bucket-policy.json"


def test_gzip_eligible_names_only_versioned_non_root_metadata() -> None:
    assert gzip_eligible("metadata/12.snapshot.json")
    assert gzip_eligible("metadata/3.model.alpha.json")
    assert gzip_eligible("metadata/7.archive.h3f.json")
    for key in ("metadata/timestamp.json", "metadata/root.json", "metadata/2.root.json",
                "metadata/snapshot.json", "metadata/x.snapshot.json", "blobs/12.snapshot.json",
                "targets/1.a.json", "metadata/sub/1.a.json", "audit/1.x.json"):  # fmt: skip
        assert not gzip_eligible(key), key


def _published(tmp_path: Path, url: str | None = None, **kw: Any) -> Project:
    project = make_project(tmp_path, url, **kw) if url else make_project(tmp_path)
    publish_mlp(project, "alpha", "1.0.0")
    publish_mlp(project, "alpha", "1.1.0", seed=1)
    publish_mlp(project, "beta", "1.0.0", seed=2)
    return project


def _session(project: Project, url: str, work: Path) -> TufSession:
    cfg = FetchConfig(retries=0)
    return TufSession(work / "metadata", work / "cache", url,
                      (project.root_dir / "root.json").read_bytes(), pool=make_pool(cfg),
                      fetch_cfg=cfg)  # fmt: skip


def _both_clients_verify(project: Project, url: str, work: Path) -> None:
    session = _session(project, url, work / "device")
    session.refresh()
    assert session.index("alpha") is not None
    assert session.release("beta", "1.0.0") is not None
    stock = stock_updater(url, (project.root_dir / "root.json").read_bytes(), work / "stock")
    stock.refresh()
    assert stock.get_targetinfo(manifest_target_path("alpha", "1.1.0")) is not None


def _get(http: urllib3.PoolManager, url: str, encoding: str | None) -> urllib3.BaseHTTPResponse:
    headers = {} if encoding is None else {"Accept-Encoding": encoding}
    return http.request("GET", url, headers=headers, decode_content=False)


def test_ota_serve_gzips_growing_metadata_for_clients_that_ask(tmp_path: Path) -> None:
    project = _published(tmp_path)
    root = project.storage.local_root()
    assert root is not None
    files = {p.name: p.read_bytes() for p in (root / "metadata").iterdir()
             if p.is_file() and not p.name.startswith(".")}  # fmt: skip
    big = [n for n, b in files.items() if gzip_eligible(f"metadata/{n}")
           and len(b) >= GZIP_MIN_BYTES]  # fmt: skip
    assert any(n.endswith(".snapshot.json") or ".model." in n for n in big), sorted(files)
    http = urllib3.PoolManager()
    with serve_dir(root) as url:
        for name, data in sorted(files.items()):
            asked = _get(http, f"{url}/metadata/{name}", "gzip, deflate")
            assert asked.status == 200
            if name in big:
                assert asked.headers["Content-Encoding"] == "gzip", name
                assert asked.headers["Vary"] == "Accept-Encoding"
                assert asked.headers["Cache-Control"].endswith("immutable")
                assert len(asked.data) < len(data)
                assert gzip.decompress(asked.data) == data
            else:  # timestamp, roots, small files: as they are
                assert "Content-Encoding" not in asked.headers, name
                assert asked.data == data
            for refused in (None, "identity", "gzip;q=0", "br"):
                plain = _get(http, f"{url}/metadata/{name}", refused)
                assert "Content-Encoding" not in plain.headers, (name, refused)
                assert plain.data == data
            if name in big:  # a range is never answered with compressed bytes
                ranged = http.request(
                    "GET",
                    f"{url}/metadata/{name}",
                    decode_content=False,
                    headers={"Accept-Encoding": "gzip", "Range": "bytes=0-9"},
                )
                assert "Content-Encoding" not in ranged.headers
                assert ranged.data == data[: len(ranged.data)]
        # the head is never compressed, whatever the client asks
        head = _get(http, f"{url}/metadata/timestamp.json", "gzip")
        assert "Content-Encoding" not in head.headers and "Vary" not in head.headers
        assert _get(http, f"{url}/metadata/999.snapshot.json", "gzip").status == 404
        assert _get(http, f"{url}/metadata/..%2F..%2Fota.toml", "gzip").status == 404
        _both_clients_verify(project, url, tmp_path)


def _bucket_of(url: str, endpoint: str) -> tuple[str, str]:
    """(bucket, prefix) of ``url``, made readable over HTTP by the documented bucket policy."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    text = POLICY.read_text(encoding="utf-8")
    policy = text.replace("@BUCKET@", bucket).replace("@PREFIX@", f"{prefix}/")
    boto3.client("s3", endpoint_url=endpoint).put_bucket_policy(Bucket=bucket, Policy=policy)
    return bucket, prefix


def test_s3_stores_growing_metadata_gzip_encoded_and_clients_verify_it(
    tmp_path: Path, s3_endpoint: str, s3_url: str
) -> None:
    project = _published(tmp_path, s3_url, s3_endpoint=s3_endpoint)
    bucket, prefix = _bucket_of(s3_url, s3_endpoint)
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    storage = project.storage
    assert isinstance(storage, S3Storage)
    encoded: dict[str, bytes] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", ()):
            key = obj["Key"].removeprefix(f"{prefix}/")
            raw = client.get_object(Bucket=bucket, Key=obj["Key"])
            stored: bytes = raw["Body"].read()
            signed = storage.get(key)[0]
            if raw.get("ContentEncoding") == "gzip":
                assert gzip_eligible(key), key
                assert gzip.decompress(stored) == signed
                assert len(signed) >= GZIP_MIN_BYTES
                json.loads(signed)
                encoded[key] = signed
            else:
                assert not gzip_eligible(key) or len(signed) < GZIP_MIN_BYTES, key
                assert stored == signed
    assert any(".model." in k for k in encoded), sorted(encoded)
    head = client.head_object(Bucket=bucket, Key=f"{prefix}/metadata/timestamp.json")
    assert "ContentEncoding" not in head
    url = f"{s3_endpoint}/{bucket}/{prefix}"
    # S3 does not negotiate: a client that asks for nothing still gets gzip, and urllib3 (the
    # stock python-tuf fetcher's library) decodes it to the signed bytes
    for key, signed in encoded.items():
        plain = urllib3.PoolManager().request("GET", f"{url}/{key}")
        assert plain.headers["Content-Encoding"] == "gzip"
        assert plain.data == signed
    _both_clients_verify(project, url, tmp_path)


def test_a_gzip_bomb_in_the_bucket_is_cut_at_the_signed_length(
    tmp_path: Path, s3_endpoint: str, s3_url: str
) -> None:
    project = _published(tmp_path, s3_url, s3_endpoint=s3_endpoint)
    bucket, prefix = _bucket_of(s3_url, s3_endpoint)
    storage = project.storage
    timestamp = json.loads(storage.get("metadata/timestamp.json")[0])
    key = f"metadata/{timestamp['signed']['meta']['snapshot.json']['version']}.snapshot.json"
    bomb = gzip.compress(b" " * (64 << 20), 9)  # 64 MiB of spaces in ~64 KB
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=bomb, ContentEncoding="gzip")
    with pytest.raises(TooLarge):  # the publisher's own read is bounded too
        storage.get(key, max_bytes=1 << 20)
    session = _session(project, f"{s3_endpoint}/{bucket}/{prefix}", tmp_path / "device")
    with pytest.raises(SecurityError, match=r"endless data|length"):
        session.refresh()


def test_ota_serve_keeps_a_bounded_amount_of_compressed_metadata(tmp_path: Path) -> None:
    """review1 (low): the compressed bodies ``ota serve`` keeps for versioned metadata were
    bounded by count (64), not size: anyone who can reach the server could request 64 old
    multi-MiB versions and pin their compressed bodies in memory (up to 64 x 8 MiB). Over real
    HTTP, many large versions are requested once each; the memory still held afterwards stays
    under the byte bound, and each answer still decodes to exactly the file."""
    import os
    import tracemalloc

    from ota.repository import _serve

    meta = tmp_path / "metadata"
    meta.mkdir()
    size = 2 << 20  # random hex: compresses to about half
    names = [f"{v}.snapshot.json" for v in range(1, 41)]
    files = {}
    for name in names:
        files[name] = os.urandom(size // 2).hex().encode()
        (meta / name).write_bytes(files[name])
    _serve._gzip_cache_clear()
    pool = urllib3.PoolManager()
    with serve_dir(tmp_path) as url:
        tracemalloc.start()
        try:
            for name in names:
                r = pool.request("GET", f"{url}/metadata/{name}", decode_content=False,
                                 headers={"Accept-Encoding": "gzip"})  # fmt: skip
                assert r.status == 200 and r.headers["Content-Encoding"] == "gzip"
                assert gzip.decompress(r.data) == files[name]
                del r
            held, _peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert held < _serve.GZIP_CACHE_BYTES + (8 << 20), held  # about 40 MiB before the bound
