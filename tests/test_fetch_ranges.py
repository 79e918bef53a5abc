"""Fetching runs of adjacent missing chunks as ``Range`` requests of a file blob (ADR 0014),
attacked: tampered span bytes, a server ignoring ``Range``, a wrong ``Content-Range``, a
truncated span, an overlong one, a blob shorter than its file; and the layouts it must keep
working on (old releases without file blobs, ``ota serve``, nginx, S3)."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from ota.bundle import Chunk, FileEntry, Manifest, blob_key
from ota.client._chunks import ChunkIndex, stage
from ota.client._fetch import BlobFetcher, FetchConfig, FetchStats, make_pool
from ota.client._spans import check_partial, parse_content_range, plan
from ota.errors import SecurityError, TransientError
from tests import http_faults
from tests.http_faults import FaultServer

CFG = FetchConfig(
    retries=2,
    backoff=0.001,
    backoff_max=0.01,
    connect_timeout=2,
    read_timeout=2,
    read_size=4096,
    max_span=3 * 64 * 1024,
    parallel=2,
)
CHUNK = 64 * 1024
N_CHUNKS = 8
DATA = random.Random(13).randbytes(CHUNK * N_CHUNKS)  # 512 KiB, 8 distinct chunks
PARTS = [DATA[i : i + CHUNK] for i in range(0, len(DATA), CHUNK)]
ENTRY = FileEntry(
    "model/model.onnx",
    hashlib.sha256(DATA).hexdigest(),
    len(DATA),
    tuple(Chunk(hashlib.sha256(p).hexdigest(), len(p)) for p in PARTS),
)
MANIFEST = Manifest("m", "1.0.0", (ENTRY,))


def _store(root: Path, *, file_blob: bool = True, chunk_blobs: bool = True) -> None:
    for c, part in zip(ENTRY.chunks, PARTS, strict=True):
        path = root / blob_key(c.sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        if chunk_blobs:
            path.write_bytes(part)
    if file_blob:
        path = root / blob_key(ENTRY.sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(DATA)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FaultServer]:
    _store(tmp_path / "srv")
    with http_faults.serve(tmp_path / "srv") as fs:
        yield fs


def _fetcher(fs: FaultServer | str, cfg: FetchConfig = CFG) -> BlobFetcher:
    url = fs if isinstance(fs, str) else fs.url
    return BlobFetcher(make_pool(cfg), url, cfg, FetchStats())


def _stage(
    fetcher: BlobFetcher, dest: Path, index: ChunkIndex | None = None, cfg: FetchConfig = CFG
) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    stage(MANIFEST, dest, index or ChunkIndex(), fetcher, cfg)


def _ranges(fs: FaultServer) -> list[str | None]:
    return [r[1] for r in fs.requests(ENTRY.sha256)]


# -- pure planning and response checks ---------------------------------------------------------


def test_plan_merges_adjacent_missing_chunks_up_to_max_span() -> None:
    held = {ENTRY.chunks[2].sha256, ENTRY.chunks[3].sha256}
    pieces = plan(ENTRY, held.__contains__, 3 * CHUNK)
    assert [(p.offset // CHUNK, len(p.chunks), p.local) for p in pieces] == [
        (0, 2, False),
        (2, 1, True),
        (3, 1, True),
        (4, 3, False),
        (7, 1, False),
    ]
    assert sum(p.size for p in pieces) == ENTRY.size
    assert all(a.offset + a.size == b.offset for a, b in itertools.pairwise(pieces))


@pytest.mark.parametrize(
    "value",
    [
        "bytes 0-9/100",
        "bytes 0-9/*",
        "bytes 9-0/100",
        "bytes 0-100/100",
        "bytes=0-9/100",
        "0-9/100",
        "",
        "bytes 0-9/100, bytes 20-29/100",
        "bytes -1-9/100",
    ],
)
def test_content_range_parser_is_strict(value: str) -> None:
    assert (parse_content_range(value) == (0, 9, 100)) == (value == "bytes 0-9/100")


@pytest.mark.parametrize(
    ("content_range", "length"),
    [
        ("bytes 10-19/100", "11"),  # length announced other than asked
        ("bytes 11-20/100", "10"),  # another start
        ("bytes 10-18/100", "9"),  # another end (short)
        ("bytes 10-19/101", "10"),  # a blob of another size: not the manifest's file
        (None, "10"),  # no Content-Range at all
    ],
)
def test_partial_answer_must_be_exactly_the_range_asked(
    content_range: str | None, length: str
) -> None:
    check_partial("u", "bytes 10-19/100", "10", 10, 10, 100)  # the one right answer
    with pytest.raises(SecurityError):
        check_partial("u", content_range, length, 10, 10, 100)


# -- the span fetcher against a real HTTP server with faults -----------------------------------


def test_a_span_is_one_ranged_request_for_exactly_its_bytes(server: FaultServer) -> None:
    f = _fetcher(server)
    got = f.fetch_span(ENTRY.sha256, ENTRY.size, CHUNK, 3 * CHUNK)
    assert got is not None and bytes(got) == DATA[CHUNK : 4 * CHUNK]
    assert _ranges(server) == [f"bytes={CHUNK}-{4 * CHUNK - 1}"]
    assert f.stats.requests == 1 and f.stats.bytes == 3 * CHUNK


def test_truncated_span_resumes_where_it_stopped(server: FaultServer) -> None:
    server.add("truncate", ENTRY.sha256, after=10_000)
    server.add("reset", ENTRY.sha256, after=20_000)
    f = _fetcher(server)
    got = f.fetch_span(ENTRY.sha256, ENTRY.size, CHUNK, 3 * CHUNK)
    assert got is not None and bytes(got) == DATA[CHUNK : 4 * CHUNK]
    ranges = _ranges(server)
    assert len(ranges) == 3 and ranges[0] == f"bytes={CHUNK}-{4 * CHUNK - 1}"
    assert ranges[1] == f"bytes={CHUNK + 10_000}-{4 * CHUNK - 1}"
    assert f.stats.bytes == 3 * CHUNK  # no byte downloaded twice


def test_span_truncated_on_every_attempt_is_transient(server: FaultServer) -> None:
    server.add("truncate", ENTRY.sha256, after=100, times=10)
    with pytest.raises(TransientError):
        _fetcher(server).fetch_span(ENTRY.sha256, ENTRY.size, 0, 2 * CHUNK)
    assert len(_ranges(server)) == 1 + CFG.retries


def test_server_ignoring_range_is_not_read_and_chunks_are_used(
    server: FaultServer, tmp_path: Path
) -> None:
    server.add("norange", ENTRY.sha256, times=100)
    f = _fetcher(server)
    assert f.fetch_span(ENTRY.sha256, ENTRY.size, CHUNK, 2 * CHUNK) is None
    assert f.stats.bytes == 0  # the whole body it offered was not read
    assert not f.ranges_usable(ENTRY.sha256)
    _stage(f, tmp_path / "dest")  # the install still completes, from verified chunk blobs
    assert (tmp_path / "dest" / ENTRY.path).read_bytes() == DATA
    assert len(_ranges(server)) == 1  # given up after the first 200: no further probes
    assert f.stats.bytes == len(DATA)


@pytest.mark.parametrize(
    "content_range",
    [
        f"bytes {CHUNK + 1}-{3 * CHUNK}/{len(DATA)}",  # shifted by one byte, same length
        f"bytes {CHUNK}-{3 * CHUNK - 1}/{len(DATA) + 1}",  # a blob of another size
        "bytes */524288",
        "garbage",
    ],
)
def test_wrong_content_range_fails_closed(server: FaultServer, content_range: str) -> None:
    server.add("badrange", ENTRY.sha256, content_range=content_range)
    f = _fetcher(server)
    with pytest.raises(SecurityError, match="Content-Range"):
        f.fetch_span(ENTRY.sha256, ENTRY.size, CHUNK, 2 * CHUNK)
    assert f.stats.bytes == 0


def test_overlong_span_fails_closed(server: FaultServer) -> None:
    server.add("overlong", ENTRY.sha256, after=5)
    with pytest.raises(SecurityError):
        _fetcher(server).fetch_span(ENTRY.sha256, ENTRY.size, CHUNK, 2 * CHUNK)


def test_whole_file_answered_with_200_is_bounded(server: FaultServer) -> None:
    server.add("norange", ENTRY.sha256, body=DATA + b"tail")  # 200, whole body and more
    f = _fetcher(server)
    with pytest.raises(SecurityError, match="more than"):
        # the span is the whole file: a 200 may answer it, but never with more bytes
        f.fetch_span(ENTRY.sha256, ENTRY.size, 0, ENTRY.size)


def test_file_blob_shorter_than_its_file_fails_closed(server: FaultServer) -> None:
    server.add("replace", ENTRY.sha256, body=DATA[: 2 * CHUNK])
    with pytest.raises(SecurityError, match="shorter"):
        _fetcher(server).fetch_span(ENTRY.sha256, ENTRY.size, 5 * CHUNK, CHUNK)


# -- staging: every span verified by the file hash, delta kept ----------------------------------


def test_tampered_span_bytes_never_reach_the_final_name(
    server: FaultServer, tmp_path: Path
) -> None:
    evil = bytearray(DATA)
    evil[5 * CHUNK + 7] ^= 1  # one bit, inside a span, same length
    server.add("replace", ENTRY.sha256, body=bytes(evil), times=100)
    dest = tmp_path / "dest"
    with pytest.raises(SecurityError, match="does not match"):
        _stage(_fetcher(server), dest)
    assert not (dest / ENTRY.path).exists()


def test_full_fetch_is_one_streamed_range(server: FaultServer, tmp_path: Path) -> None:
    f = _fetcher(server)
    _stage(f, tmp_path / "dest")
    assert (tmp_path / "dest" / ENTRY.path).read_bytes() == DATA
    assert _ranges(server) == [f"bytes=0-{len(DATA) - 1}"]
    assert f.stats.requests == 1 and f.stats.bytes == len(DATA)


@pytest.mark.parametrize("max_span", [CHUNK, 3 * CHUNK])  # streamed / buffered
def test_full_fetch_is_few_ranges_bounded_by_max_stream(
    server: FaultServer, tmp_path: Path, max_span: int
) -> None:
    cfg = dataclasses.replace(CFG, max_span=max_span, max_stream=3 * CHUNK)
    f = _fetcher(server, cfg)
    _stage(f, tmp_path / "dest", cfg=cfg)
    assert (tmp_path / "dest" / ENTRY.path).read_bytes() == DATA
    ranges = sorted(_ranges(server), key=lambda r: int(str(r)[6:].split("-")[0]))
    assert ranges == ["bytes=0-196607", "bytes=196608-393215", "bytes=393216-524287"]
    assert f.stats.requests == 3 and f.stats.bytes == len(DATA)


def test_delta_fetches_only_the_missing_runs(server: FaultServer, tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    (old / "f").write_bytes(DATA[: 2 * CHUNK] + b"x" * CHUNK + DATA[3 * CHUNK : 6 * CHUNK])
    index = ChunkIndex()
    held = Manifest(
        "m",
        "0.9.0",
        (
            FileEntry(
                "f",
                "0" * 64,
                6 * CHUNK,
                (*ENTRY.chunks[:2], Chunk("1" * 64, CHUNK), *ENTRY.chunks[3:6]),
            ),
        ),
    )
    index.add_tree(old, held)
    f = _fetcher(server)
    _stage(f, tmp_path / "dest", index)
    assert (tmp_path / "dest" / ENTRY.path).read_bytes() == DATA
    assert sorted(str(r) for r in _ranges(server)) == [
        f"bytes={2 * CHUNK}-{3 * CHUNK - 1}",
        f"bytes={6 * CHUNK}-{8 * CHUNK - 1}",
    ]
    assert f.stats.bytes == 3 * CHUNK


def test_old_layout_without_file_blob_installs_from_chunks(tmp_path: Path) -> None:
    _store(tmp_path / "srv", file_blob=False)
    with http_faults.serve(tmp_path / "srv") as fs:
        f = _fetcher(fs)
        _stage(f, tmp_path / "dest")
        assert (tmp_path / "dest" / ENTRY.path).read_bytes() == DATA
        probes = fs.requests(ENTRY.sha256)
        assert 1 <= len(probes) <= CFG.parallel and {p[2] for p in probes} == {404}
        assert all(len(fs.requests(c.sha256)) == 1 for c in ENTRY.chunks)


def test_corrupt_local_chunk_is_fetched_instead(server: FaultServer, tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    (old / "f").write_bytes(b"\0" * CHUNK)  # indexed as chunk 0, but its bytes are wrong
    index = ChunkIndex()
    index.add_tree(
        old, Manifest("m", "0.9.0", (FileEntry("f", "0" * 64, CHUNK, ENTRY.chunks[:1]),))
    )
    _stage(_fetcher(server), tmp_path / "dest", index)
    assert (tmp_path / "dest" / ENTRY.path).read_bytes() == DATA
    # ADR 0017: that chunk is asked as its range of the file blob (verified as a chunk), since
    # a release may store it nowhere else; its chunk blob is not needed
    assert f"bytes=0-{CHUNK - 1}" in _ranges(server)
    assert server.requests(ENTRY.chunks[0].sha256) == []


# -- ADR 0017: multi-chunk files stored only as their file blob ---------------------------------


def _bad_local_chunk(tmp_path: Path) -> ChunkIndex:
    old = tmp_path / "old"
    old.mkdir()
    (old / "f").write_bytes(b"\0" * CHUNK)  # indexed as chunk 0, but its bytes are wrong
    index = ChunkIndex()
    index.add_tree(
        old, Manifest("m", "0.9.0", (FileEntry("f", "0" * 64, CHUNK, ENTRY.chunks[:1]),))
    )
    return index


def test_file_blob_alone_installs_without_chunk_blobs(tmp_path: Path) -> None:
    _store(tmp_path / "srv", chunk_blobs=False)
    with http_faults.serve(tmp_path / "srv") as fs:
        _stage(_fetcher(fs), tmp_path / "dest", _bad_local_chunk(tmp_path))
        assert (tmp_path / "dest" / ENTRY.path).read_bytes() == DATA
        assert all(fs.requests(c.sha256) == [] for c in ENTRY.chunks)


def test_file_blob_alone_missing_is_refused_and_nothing_staged(tmp_path: Path) -> None:
    _store(tmp_path / "srv", file_blob=False, chunk_blobs=False)
    with http_faults.serve(tmp_path / "srv") as fs, pytest.raises(SecurityError, match="missing"):
        _stage(_fetcher(fs), tmp_path / "dest")
    assert not (tmp_path / "dest" / ENTRY.path).exists()


@pytest.mark.parametrize("how", ["tampered", "short", "long"])
def test_file_blob_alone_altered_is_refused(tmp_path: Path, how: str) -> None:
    _store(tmp_path / "srv", chunk_blobs=False)
    blob = tmp_path / "srv" / blob_key(ENTRY.sha256)
    bad = {"tampered": DATA[:-5] + b"EVIL!", "short": DATA[: -CHUNK // 2],
           "long": DATA + b"x" * 100}[how]  # fmt: skip
    blob.write_bytes(bad)
    with http_faults.serve(tmp_path / "srv") as fs, pytest.raises(SecurityError):
        _stage(_fetcher(fs), tmp_path / "dest")
    assert not (tmp_path / "dest" / ENTRY.path).exists()


def test_file_blob_alone_tampered_range_for_a_local_chunk_is_refused(tmp_path: Path) -> None:
    """The one chunk re-fetched for a bad local copy is verified as a chunk at once."""
    _store(tmp_path / "srv", chunk_blobs=False)
    blob = tmp_path / "srv" / blob_key(ENTRY.sha256)
    blob.write_bytes(b"X" * CHUNK + DATA[CHUNK:])
    with http_faults.serve(tmp_path / "srv") as fs, pytest.raises(SecurityError):
        _stage(_fetcher(fs), tmp_path / "dest", _bad_local_chunk(tmp_path))
    assert not (tmp_path / "dest" / ENTRY.path).exists()


# -- real layouts: ota serve, nginx, S3 --------------------------------------------------------


def _publish_big(
    tmp_path: Path,
    storage_url: str | None = None,
    s3_endpoint: str | None = None,
    *,
    chunk_blobs: bool = False,
) -> tuple[Path, FileEntry]:
    from ota.repository import Project, PublishRequest, publish
    from tests.onnx_models import big_mlp, save
    from tests.repo_helpers import make_project

    project = make_project(tmp_path, storage_url, s3_endpoint=s3_endpoint)
    if chunk_blobs:  # ADR 0017's option: chunk blobs beside the file blob, as before it
        toml = tmp_path / "proj" / "ota.toml"
        toml.write_text(toml.read_text().replace("chunk_blobs = false", "chunk_blobs = true"))
        project = Project.open(tmp_path / "proj")
        assert project.config.chunk_blobs
    model = save(big_mlp(4, layers=4), tmp_path / "models" / "big.onnx")
    publish(project, PublishRequest(source=model, name="det", version="1.0.0", ring="ga"))
    return model, FileEntry("", hashlib.sha256(model.read_bytes()).hexdigest(), 0, ())


def _update(tmp_path: Path, base: str) -> dict[str, object]:
    from ota.client import init_device, update_once

    root = (tmp_path / "proj" / "root.json").read_bytes()
    state = tmp_path / "dev"
    init_device(state, base, root, "cam-1", ["det"], health_timeout_s=0)
    result = update_once(state)  # the real smoke run too
    assert result.status == "updated", result.to_dict()
    stage_figures: dict[str, object] = result.outcomes[0].figures["stage"]
    return stage_figures


def _check_installed(tmp_path: Path, model: Path, stage_figures: dict[str, object]) -> None:
    installed = list((tmp_path / "dev").rglob("model.onnx"))
    assert installed and all(p.read_bytes() == model.read_bytes() for p in installed)
    assert stage_figures["bytes_downloaded"] == stage_figures["bytes_total"]


def test_publish_keeps_the_file_blob_and_ota_serve_serves_ranges(tmp_path: Path) -> None:
    from tests.repo_helpers import serve_dir

    model, whole = _publish_big(tmp_path)
    blob = tmp_path / "repo" / blob_key(whole.sha256)
    assert blob.read_bytes() == model.read_bytes()
    with serve_dir(tmp_path / "repo") as base:
        f = _fetcher(base)
        got = f.fetch_span(whole.sha256, blob.stat().st_size, 1000, 5000)
        assert got is not None and bytes(got) == model.read_bytes()[1000:6000]
        stage_figures = _update(tmp_path, base)
    _check_installed(tmp_path, model, stage_figures)


def test_nginx_serves_spans(tmp_path: Path) -> None:
    from tests import nginx

    if not nginx.available():
        pytest.skip("nginx is not installed")
    model, whole = _publish_big(tmp_path)
    size = model.stat().st_size
    with nginx.serve_static(tmp_path / "repo") as base:
        f = _fetcher(base)
        got = f.fetch_span(whole.sha256, size, size - 4096, 4096)
        assert got is not None and bytes(got) == model.read_bytes()[-4096:]
        stage_figures = _update(tmp_path, base)
    _check_installed(tmp_path, model, stage_figures)


def test_s3_serves_the_file_blob_by_range(tmp_path: Path, s3_url: str, s3_endpoint: str) -> None:
    """moto refuses anonymous GETs (a device reads a public bucket), so the answer is read
    with boto3 and judged by the device's own check."""
    import boto3

    model, whole = _publish_big(tmp_path, s3_url, s3_endpoint)
    bucket, prefix = s3_url.removeprefix("s3://").split("/", 1)
    key = f"{prefix}/{blob_key(whole.sha256)}"
    data = model.read_bytes()
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    got = client.get_object(Bucket=bucket, Key=key, Range=f"bytes=77-{77 + 3 * CHUNK - 1}")
    assert got["Body"].read() == data[77 : 77 + 3 * CHUNK]
    check_partial(key, got["ContentRange"], str(got["ContentLength"]), 77, 3 * CHUNK, len(data))
    with pytest.raises(SecurityError):  # S3 reports the blob's true size: not another one
        check_partial(
            key, got["ContentRange"], str(got["ContentLength"]), 77, 3 * CHUNK, len(data) + 1
        )


def test_gc_keeps_the_file_blob_of_a_live_release(tmp_path: Path) -> None:
    from ota.repository import Project
    from ota.repository._ops import gc

    model, whole = _publish_big(tmp_path)
    blob = tmp_path / "repo" / blob_key(whole.sha256)
    gc(Project.open(tmp_path / "proj"), grace_seconds=0)
    assert blob.read_bytes() == model.read_bytes()


def test_publisher_refuses_a_source_changed_before_its_file_blob(tmp_path: Path) -> None:
    from ota.repository._fileblob import store_file_blob
    from ota.repository._storage import FileStorage

    src = tmp_path / "src.bin"
    src.write_bytes(DATA)
    store = FileStorage(tmp_path / "store")
    src.write_bytes(b"\1" + DATA[1:])  # changed after the chunker hashed it
    with pytest.raises(OSError, match="changed"):
        store_file_blob(store, src, ENTRY, tmp_path / "scratch")
    assert not (tmp_path / "store" / blob_key(ENTRY.sha256)).exists()
    assert not [p for p in (tmp_path / "store").rglob("*") if p.is_file()]  # no temp left
    src.write_bytes(DATA)
    assert store_file_blob(store, src, ENTRY, tmp_path / "scratch")
    assert (tmp_path / "store" / blob_key(ENTRY.sha256)).read_bytes() == DATA
    assert not store_file_blob(store, src, ENTRY, tmp_path / "scratch")  # already there


def test_update_fails_closed_on_a_tampered_file_blob_and_installs_nothing(
    tmp_path: Path,
) -> None:
    """A repository whose file blob was altered (same size): the device refuses the release
    as a security failure, keeps nothing staged, and commits no slot."""
    from ota.client import init_device, update_once
    from tests.repo_helpers import serve_dir

    _, whole = _publish_big(tmp_path)
    blob = tmp_path / "repo" / blob_key(whole.sha256)
    evil = bytearray(blob.read_bytes())
    evil[len(evil) // 2] ^= 0xFF
    blob.chmod(0o644)
    blob.write_bytes(bytes(evil))
    state = tmp_path / "dev"
    with serve_dir(tmp_path / "repo") as base:
        root = (tmp_path / "proj" / "root.json").read_bytes()
        init_device(state, base, root, "cam-1", ["det"], health_timeout_s=0)
        result = update_once(state)
    assert result.status == "security", result.to_dict()
    assert not list(state.rglob("model.onnx"))
    assert not list(state.rglob("*.part"))


def test_release_published_before_file_blobs_still_installs(tmp_path: Path) -> None:
    """An old repository layout (no file blob): the device probes once, then uses chunks."""
    from tests.repo_helpers import serve_dir

    model, whole = _publish_big(tmp_path, chunk_blobs=True)
    (tmp_path / "repo" / blob_key(whole.sha256)).unlink()
    with serve_dir(tmp_path / "repo") as base:
        stage_figures = _update(tmp_path, base)
    _check_installed(tmp_path, model, stage_figures)


@pytest.mark.parametrize("status", [403, 404, 410, 301, 400, 501])
def test_no_usable_file_blob_falls_back_to_verified_chunks(
    server: FaultServer, tmp_path: Path, status: int
) -> None:
    """403 is what S3 answers for a missing key in a bucket nobody may list: an old release
    there must install from its chunks, as with a 404."""
    server.add("status", ENTRY.sha256, status=status, times=100)
    f = _fetcher(server)
    _stage(f, tmp_path / "dest")
    assert (tmp_path / "dest" / ENTRY.path).read_bytes() == DATA
    assert not f.ranges_usable(ENTRY.sha256)
    assert 1 <= len(server.requests(ENTRY.sha256)) <= CFG.parallel


def test_retryable_status_on_a_span_is_retried(server: FaultServer) -> None:
    server.add("status", ENTRY.sha256, status=503, times=2)
    f = _fetcher(server)
    got = f.fetch_span(ENTRY.sha256, ENTRY.size, 0, CHUNK)
    assert got is not None and bytes(got) == DATA[:CHUNK]
    assert [r[2] for r in server.requests(ENTRY.sha256)] == [503, 503, 206]
