"""Streaming a long run of missing chunks as one ``Range`` straight into the staging file
(ADR 0014, "streamed spans"), attacked: a cut body, a cut on every attempt, a drip, an
overlong or endless body, a wrong ``Content-Range``, a server ignoring ``Range``, a blob that
stops answering ranges mid-span, tampered bytes; and the zero-copy reader it relies on."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import pytest

from ota.client._chunks import ChunkIndex, _FileWriter, _Ring, stage
from ota.client._fetch import (
    BlobFetcher,
    FetchConfig,
    FetchStats,
    SlowRetrievalError,
    _Body,
    make_pool,
)
from ota.errors import SecurityError, TransientError
from tests import http_faults
from tests.http_faults import FaultServer
from tests.test_fetch_ranges import CHUNK, DATA, ENTRY, MANIFEST, _store

CFG = FetchConfig(
    retries=2,
    backoff=0.001,
    backoff_max=0.01,
    connect_timeout=2,
    read_timeout=2,
    read_size=4096,
    max_span=CHUNK,  # anything longer than one chunk is streamed
    stream_buffer=16 * 1024,
    stream_buffers=3,
    parallel=2,
)


class Sink:
    """A SpanSink keeping what it is given (one reused buffer, as the ring lends)."""

    def __init__(self, size: int = 16 * 1024) -> None:
        self.buf = memoryview(bytearray(size))
        self.got = bytearray()
        self.commits = 0

    def buffer(self) -> memoryview:
        return self.buf

    def commit(self, data: memoryview) -> None:
        assert data.obj is self.buf.obj  # a prefix of the lent buffer, not a copy
        self.got += data
        self.commits += 1


@pytest.fixture
def server(tmp_path: Path) -> Iterator[FaultServer]:
    _store(tmp_path / "srv")
    with http_faults.serve(tmp_path / "srv") as fs:
        yield fs


def _fetcher(fs: FaultServer, cfg: FetchConfig = CFG) -> BlobFetcher:
    return BlobFetcher(make_pool(cfg), fs.url, cfg, FetchStats())


def _stream(f: BlobFetcher, start: int, size: int) -> Sink:
    sink = Sink()
    assert f.stream_span(ENTRY.sha256, ENTRY.size, start, size, sink)
    return sink


def test_stream_gives_exactly_the_span_in_order(server: FaultServer) -> None:
    f = _fetcher(server)
    sink = _stream(f, CHUNK + 5, 5 * CHUNK)
    assert bytes(sink.got) == DATA[CHUNK + 5 : 6 * CHUNK + 5]
    assert sink.commits >= 5 * CHUNK // len(sink.buf)  # the buffer was reused, not grown
    assert f.stats.requests == 1 and f.stats.bytes == 5 * CHUNK


@pytest.mark.parametrize("kind", ["reset", "truncate"])
def test_cut_stream_resumes_after_the_bytes_given(server: FaultServer, kind: str) -> None:
    server.add(kind, ENTRY.sha256, after=100_000)
    f = _fetcher(server)
    sink = _stream(f, 0, ENTRY.size)
    assert bytes(sink.got) == DATA
    log = server.requests(ENTRY.sha256)
    assert len(log) == 2 and log[1][1] is not None
    resumed_at = int(log[1][1][6:].split("-")[0])
    assert 0 < resumed_at <= 100_000
    assert f.stats.bytes == ENTRY.size  # no byte given twice


def test_cuts_after_real_progress_do_not_exhaust_the_retries(server: FaultServer) -> None:
    for _ in range(CFG.retries + 2):  # more cuts than retries, each after >= max_span bytes
        server.add("truncate", ENTRY.sha256, after=CHUNK + 1000)
    sink = _stream(_fetcher(server), 0, ENTRY.size)
    assert bytes(sink.got) == DATA


def test_stream_cut_without_progress_is_transient(server: FaultServer) -> None:
    server.add("truncate", ENTRY.sha256, after=10, times=100)
    with pytest.raises(TransientError):
        _fetcher(server).stream_span(ENTRY.sha256, ENTRY.size, 0, ENTRY.size, Sink())
    assert len(server.requests(ENTRY.sha256)) == 1 + CFG.retries


def test_drip_is_slow_retrieval(server: FaultServer) -> None:
    server.add("drip", ENTRY.sha256, step=512, delay=0.02, times=100)
    cfg = dataclasses.replace(CFG, min_rate=1_000_000, grace=0.05, retries=1)
    with pytest.raises(SlowRetrievalError):
        _fetcher(server, cfg).stream_span(ENTRY.sha256, ENTRY.size, 0, 4 * CHUNK, Sink())


@pytest.mark.parametrize(
    "content_range", ["bytes 0-131071/524288", f"bytes {CHUNK}-{3 * CHUNK - 1}/999999", ""]
)
def test_wrong_content_range_fails_closed_before_any_byte(
    server: FaultServer, content_range: str
) -> None:
    server.add("badrange", ENTRY.sha256, content_range=content_range)
    sink = Sink()
    with pytest.raises(SecurityError):
        _fetcher(server).stream_span(ENTRY.sha256, ENTRY.size, CHUNK, 2 * CHUNK, sink)
    assert sink.commits == 0


def test_overlong_range_fails_closed(server: FaultServer) -> None:
    server.add("overlong", ENTRY.sha256, after=5)
    with pytest.raises(SecurityError):
        _fetcher(server).stream_span(ENTRY.sha256, ENTRY.size, CHUNK, 2 * CHUNK, Sink())


@pytest.mark.parametrize("kind", ["norange", "endless"])
def test_whole_file_answered_with_more_than_the_file_fails_closed(
    server: FaultServer, kind: str
) -> None:
    if kind == "norange":
        server.add("norange", ENTRY.sha256, body=DATA + b"tail")  # 200, announced length
    else:
        server.add("endless", ENTRY.sha256)  # 200, no length, no end
    with pytest.raises(SecurityError, match="more than"):
        _fetcher(server).stream_span(ENTRY.sha256, ENTRY.size, 0, ENTRY.size, Sink())


def test_whole_file_answered_with_200_is_accepted_to_its_size(server: FaultServer) -> None:
    server.add("norange", ENTRY.sha256)
    assert bytes(_stream(_fetcher(server), 0, ENTRY.size).got) == DATA


def test_server_ignoring_range_gives_nothing_and_chunks_are_used(
    server: FaultServer, tmp_path: Path
) -> None:
    server.add("norange", ENTRY.sha256, times=100)
    f = _fetcher(server)
    sink = Sink()
    assert not f.stream_span(ENTRY.sha256, ENTRY.size, CHUNK, 3 * CHUNK, sink)
    assert sink.commits == 0 and not f.ranges_usable(ENTRY.sha256)
    dest = tmp_path / "dest"
    dest.mkdir()
    stage(MANIFEST, dest, ChunkIndex(), f, CFG)
    assert (dest / ENTRY.path).read_bytes() == DATA
    assert all(len(server.requests(c.sha256)) == 1 for c in ENTRY.chunks)


def test_blob_shorter_than_its_file_fails_closed(server: FaultServer) -> None:
    server.add("replace", ENTRY.sha256, body=DATA[: 2 * CHUNK])
    with pytest.raises(SecurityError, match="shorter"):
        _fetcher(server).stream_span(ENTRY.sha256, ENTRY.size, 5 * CHUNK, 2 * CHUNK, Sink())


def test_blob_that_stops_answering_ranges_mid_span_is_transient(
    server: FaultServer, tmp_path: Path
) -> None:
    server.add("truncate", ENTRY.sha256, after=100_000)
    server.add("status", ENTRY.sha256, status=404, times=100)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(TransientError, match="stopped"):
        stage(MANIFEST, dest, ChunkIndex(), _fetcher(server), CFG)
    assert not (dest / ENTRY.path).exists()


def test_tampered_streamed_bytes_never_reach_the_final_name(
    server: FaultServer, tmp_path: Path
) -> None:
    evil = bytearray(DATA)
    evil[len(DATA) - 3] ^= 0x40  # in the last buffer of the stream
    server.add("replace", ENTRY.sha256, body=bytes(evil), times=100)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(SecurityError, match="does not match"):
        stage(MANIFEST, dest, ChunkIndex(), _fetcher(server), CFG)
    assert not (dest / ENTRY.path).exists()


def test_stream_with_reset_stages_the_file_and_reports_progress(
    server: FaultServer, tmp_path: Path
) -> None:
    server.add("reset", ENTRY.sha256, after=3 * CHUNK + 17)
    seen: list[int] = []
    dest = tmp_path / "dest"
    dest.mkdir()
    st = stage(MANIFEST, dest, ChunkIndex(), _fetcher(server), CFG,
               on_bytes=lambda done, _total: seen.append(done))  # fmt: skip
    assert (dest / ENTRY.path).read_bytes() == DATA
    assert st.bytes_downloaded == ENTRY.size and st.chunks_downloaded == len(ENTRY.chunks)
    assert seen and seen[-1] == ENTRY.size and seen == sorted(seen)


def test_a_range_with_its_length_is_read_without_copies(server: FaultServer) -> None:
    pool = make_pool(CFG)
    url = _fetcher(server).url(ENTRY.sha256)
    resp = pool.request("GET", url, headers={"Range": "bytes=0-99"}, preload_content=False)
    try:
        body = _Body(resp, 100)
        assert body._raw is not None  # one recv straight into the caller's buffer
        view = memoryview(bytearray(100))
        got = 0
        while got < 100 and (k := body.readinto(view[got:])):
            got += k
        assert bytes(view) == DATA[:100] and not body.overlong()
    finally:
        resp.close()
        resp.release_conn()
    resp = pool.request("GET", url, headers={"Range": "bytes=0-99"}, preload_content=False)
    try:
        assert _Body(resp, 99)._raw is None  # a length other than expected: the slow path
    finally:
        resp.close()
        resp.release_conn()


class _Deferred(Future[Any]):
    def __init__(self, ex: DeferredHasher) -> None:
        super().__init__()
        self.ex = ex

    def result(self, timeout: float | None = None) -> Any:
        self.ex.drain()
        return super().result(timeout)


class DeferredHasher:
    """An executor that runs the queued hashes, in order, only when some result is awaited:
    the slowest legal hash thread (a real one may lag as far behind)."""

    def __init__(self) -> None:
        self.queue: list[tuple[_Deferred, Callable[..., Any], tuple[Any, ...]]] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> _Deferred:
        fut = _Deferred(self)
        self.queue.append((fut, fn, args))
        return fut

    def drain(self) -> None:
        while self.queue:
            fut, fn, args = self.queue.pop(0)
            fut.set_result(fn(*args))


def test_a_file_is_judged_only_after_every_queued_hash(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    hasher = DeferredHasher()
    w = _FileWriter(tmp_path, ENTRY, cast(ThreadPoolExecutor, hasher), _Ring(16 * 1024, 2))
    done = 0
    while done < len(DATA):
        view = w.buffer()
        n = min(len(view), len(DATA) - done)
        view[:n] = DATA[done : done + n]
        w.commit(view[:n])
        done += n
    assert hasher.queue  # the last buffers' hashes are still queued
    w.finish()  # awaits them, then judges the file
    assert (tmp_path / ENTRY.path).read_bytes() == DATA
