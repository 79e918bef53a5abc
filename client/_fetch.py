"""Network IO of the device: one urllib3 pool, a TUF fetcher, and a verifying blob fetcher.

Nothing here decides trust beyond "these bytes hash to the digest a verified manifest named":
TUF metadata trust is python-tuf's; this module only moves bytes, bounded and timed.

Error mapping (who must react):

* network failures (connection refused or reset, 5xx, truncated bodies, timeouts) are retried
  with exponential backoff a bounded number of times, resuming with HTTP ``Range`` where
  possible, then raise :class:`~ota.errors.TransientError` (a streamed span counts only the
  attempts that moved it on by less than ``max_span`` bytes);
* a transfer slower than ``FetchConfig.min_rate`` raises :class:`SlowRetrievalError` (a
  TransientError that the updater also reports as a security event: it is the "slow retrieval"
  attack of the TUF spec);
* more bytes than announced, or bytes that do not hash to the expected digest, raise
  :class:`~ota.errors.SecurityError` at once (never retried with the same data).
"""

from __future__ import annotations

import hashlib
import http.client
import io
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import urllib3
from tuf.api import exceptions as tuf_exc
from tuf.ngclient.fetcher import FetcherInterface

from ota.bundle import blob_key
from ota.errors import SecurityError, TransientError

from ._spans import check_partial, range_header

_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class SlowRetrievalError(TransientError):
    """A server sent data below the minimum rate (slow retrieval / drip attack)."""


@dataclass(frozen=True)
class FetchConfig:
    """Bounds of every network operation. Defaults suit flaky edge links."""

    connect_timeout: float = 10.0
    read_timeout: float = 30.0  # longest silence between two reads
    min_rate: float = 8 * 1024.0  # bytes/s: an attempt may last grace + size / min_rate
    grace: float = 20.0
    retries: int = 4  # extra attempts per object after the first
    backoff: float = 0.25
    backoff_max: float = 8.0
    parallel: int = 4  # concurrent chunk or span fetches
    max_inflight_bytes: int = 12 * 1024 * 1024  # bytes buffered at once (peak memory)
    max_span: int = 4 * 1024 * 1024  # a run of missing chunks up to this: one buffered Range
    # A longer run is one Range of up to this many bytes, streamed straight into the staging
    # file through a ring of ``stream_buffers`` buffers of ``stream_buffer`` bytes (ADR 0014)
    max_stream: int = 1 << 30
    stream_buffer: int = 1 << 20
    stream_buffers: int = 4
    spans: bool = True  # fetch runs of missing chunks as ranges of the file blob (ADR 0014)
    read_size: int = 256 * 1024
    user_agent: str = "edge-ota-client"

    def deadline_for(self, size: int) -> float:
        return self.grace + size / self.min_rate


@dataclass
class FetchStats:
    """Counters for benchmarks and reports (thread-safe)."""

    requests: int = 0
    bytes: int = 0
    retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, *, requests: int = 0, nbytes: int = 0, retries: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.bytes += nbytes
            self.retries += retries


def make_pool(cfg: FetchConfig) -> urllib3.PoolManager:
    """One connection pool for metadata and blobs; redirects and urllib3 retries are off
    (retries are ours, bounded and logged)."""
    return urllib3.PoolManager(
        num_pools=4,
        maxsize=max(cfg.parallel, 1),
        block=False,
        retries=False,
        timeout=urllib3.Timeout(connect=cfg.connect_timeout, read=cfg.read_timeout),
        headers={"User-Agent": cfg.user_agent},
    )


def backoff_delay(cfg: FetchConfig, attempt: int) -> float:
    """Full-jitter exponential backoff for ``attempt`` (1-based)."""
    cap = min(cfg.backoff_max, cfg.backoff * 2 ** (attempt - 1))
    return random.uniform(cap / 2, cap)  # noqa: S311 - jitter, not crypto


class TufFetcher(FetcherInterface):
    """python-tuf fetcher over our pool. Implements only ``_fetch``: python-tuf enforces the
    length bounds and decides trust. Connection failures and retryable statuses before the
    body starts are retried; an HTTP error status raises ``DownloadHTTPError``; a stream
    slower than the configured rate raises ``SlowRetrievalError``."""

    def __init__(self, pool: urllib3.PoolManager, cfg: FetchConfig,
                 stats: FetchStats | None = None, max_seconds: float = 60.0) -> None:
        self._pool = pool
        self._cfg = cfg
        self._max_seconds = max_seconds
        self.stats = stats or FetchStats()

    def _fetch(self, url: str) -> Iterator[bytes]:
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = self._pool.request("GET", url, preload_content=False, redirect=False)
            except urllib3.exceptions.NewConnectionError as e:
                # urllib3 derives it from ConnectTimeoutError: a refusal is no timeout
                err: Exception = tuf_exc.DownloadError(f"cannot connect to {url}: {e}")
                err.__cause__ = e
            except urllib3.exceptions.TimeoutError as e:
                err = tuf_exc.SlowRetrievalError(f"timeout connecting to {url}")
                err.__cause__ = e
            except urllib3.exceptions.HTTPError as e:
                err = tuf_exc.DownloadError(f"cannot reach {url}: {e}")
                err.__cause__ = e
            else:
                self.stats.add(requests=1)
                if resp.status in _RETRY_STATUS and attempt <= self._cfg.retries:
                    resp.drain_conn()
                    resp.release_conn()
                    self.stats.add(retries=1)
                    time.sleep(backoff_delay(self._cfg, attempt))
                    continue
                if resp.status >= 300:
                    resp.drain_conn()
                    resp.release_conn()
                    raise tuf_exc.DownloadHTTPError(f"HTTP {resp.status} for {url}", resp.status)
                return self._stream(resp, url)
            if attempt > self._cfg.retries:
                raise err
            self.stats.add(retries=1)
            time.sleep(backoff_delay(self._cfg, attempt))

    def _stream(self, resp: Any, url: str) -> Iterator[bytes]:
        deadline = time.monotonic() + self._max_seconds
        try:
            for data in _pieces(resp, self._cfg.read_size):
                self.stats.add(nbytes=len(data))
                if time.monotonic() > deadline:
                    raise tuf_exc.SlowRetrievalError(f"{url} took over {self._max_seconds:g} s")
                yield data
        except urllib3.exceptions.TimeoutError as e:
            raise tuf_exc.SlowRetrievalError(f"read timeout on {url}") from e
        except urllib3.exceptions.HTTPError as e:
            raise tuf_exc.DownloadError(f"transfer of {url} failed: {e}") from e
        finally:
            _release(resp)


class SpanSink(Protocol):
    """Where :meth:`BlobFetcher.stream_span` puts a span's bytes, in order, without holding
    them: it lends the fetcher a buffer to read into, then takes the bytes read."""

    def buffer(self) -> memoryview:
        """A free buffer (of at least one byte) to read the next bytes into."""
        ...

    def commit(self, data: memoryview) -> None:
        """The next bytes of the span (a prefix of the last :meth:`buffer`)."""
        ...


class BlobFetcher:
    """Fetch content-addressed chunks (``<base>/blobs/sha256/<hh>/<hex>``) and verify them while
    they stream.

    Invariant: :meth:`fetch` returns exactly ``size`` bytes whose sha256 is ``sha256``, or
    raises. At most ``size + read_size`` bytes are read per attempt (endless data is cut),
    and at most ``1 + retries`` attempts are made, each resuming where the last stopped.
    """

    def __init__(self, pool: urllib3.PoolManager, base_url: str, cfg: FetchConfig,
                 stats: FetchStats | None = None) -> None:
        self._pool = pool
        self._base = base_url.rstrip("/") + "/"
        self._cfg = cfg
        self.stats = stats or FetchStats()
        self._no_ranges: set[str] = set()  # file digests whose blob is absent or not rangeable
        self._lock = threading.Lock()

    def ranges_usable(self, file_sha256: str) -> bool:
        """False once the file blob of ``file_sha256`` proved absent or not served by range
        (an old release, a mirror without file blobs, a server ignoring ``Range``)."""
        with self._lock:
            return file_sha256 not in self._no_ranges

    def _give_up_ranges(self, file_sha256: str) -> None:
        with self._lock:
            self._no_ranges.add(file_sha256)

    def fetch_span(self, file_sha256: str, total: int, start: int, size: int,
                   out: memoryview | None = None) -> bytearray | memoryview | None:
        """Bytes ``[start, start + size)`` of the file blob of ``file_sha256`` (a file of
        ``total`` bytes), **not verified here**: the caller hashes them as part of the file,
        whose sha256 the verified manifest names, and keeps them under a temp name until it
        matches (ADR 0014).

        Returns None, having read no body, when the store has no usable such blob (404,
        410, 403 as S3 answers for a missing key, another non-retryable status, or a 200
        answering a range with the whole blob): the caller then fetches the span's chunk
        blobs, each verified. A 200 is kept only when the span *is* the whole file, read
        to at most ``size`` bytes. ``out`` (exactly ``size`` bytes), if given, receives the
        bytes and is returned (a reused buffer: no allocation, no page faults per span).

        Invariant: returns exactly ``size`` bytes that the server labelled as exactly the
        asked range of a ``total``-byte blob, read in at most ``1 + retries`` attempts, each
        resuming where the last stopped and reading no more than asked.

        Raises:
            SecurityError: a ``Content-Range``/``Content-Length`` other than asked, more bytes
                than asked, or 416 (the blob is shorter than the file it is named after).
            SlowRetrievalError: every attempt ran below the minimum rate.
            TransientError: the network failed on every attempt.
        """
        if size <= 0 or start < 0 or start + size > total:
            raise ValueError(f"bad span {start}+{size} of {total}")
        if not self.ranges_usable(file_sha256):
            return None
        url = self.url(file_sha256)
        if out is not None and len(out) != size:
            raise ValueError(f"buffer of {len(out)} bytes for a span of {size}")
        buf = out if out is not None else memoryview(bytearray(size))
        prog = _Span(buf)
        attempt = 0
        while True:
            attempt += 1
            try:
                done = self._span_attempt(url, file_sha256, total, start, prog)
                if done is None:
                    return None
                if done:
                    return buf
                why: TransientError = TransientError(f"truncated range of {url}")
            except TransientError as e:
                why = e
            if attempt > self._cfg.retries:
                raise why
            self.stats.add(retries=1)
            time.sleep(backoff_delay(self._cfg, attempt))

    def _span_attempt(self, url: str, file_sha256: str, total: int, start: int,
                      prog: _Span) -> bool | None:
        """One ranged GET from ``start + prog.n``. True when complete, False when cut short
        (resume), None when ranges cannot be used for this file."""
        size = len(prog.buf)
        first, left = start + prog.n, size - prog.n
        headers = {"Range": range_header(first, left)}
        deadline = time.monotonic() + self._cfg.deadline_for(left)
        try:
            resp = self._pool.request("GET", url, headers=headers, preload_content=False,
                                      redirect=False)
        except urllib3.exceptions.HTTPError as e:
            raise TransientError(f"cannot reach {url}: {e}") from e
        self.stats.add(requests=1)
        try:
            if not self._range_answer(resp, url, file_sha256, first, left, total):
                return None  # _release closes the connection: the body is never read
            view = prog.buf
            # read_size pieces stay below malloc's pinned mmap threshold (ota._lean): reused
            # heap memory, not a fresh mapping to fault in for every piece
            for data in _pieces(resp, self._cfg.read_size):
                end = prog.n + len(data)
                if end > size:
                    raise SecurityError(f"{url} sent more than the {left} bytes asked")
                view[prog.n:end] = data
                prog.n = end
                self.stats.add(nbytes=len(data))
                if time.monotonic() > deadline and prog.n < size:
                    raise SlowRetrievalError(f"{url} is slower than {self._cfg.min_rate:g} B/s")
        except urllib3.exceptions.TimeoutError as e:
            raise SlowRetrievalError(f"read timeout on {url}") from e
        except urllib3.exceptions.HTTPError:
            return False  # reset or truncated: resume from prog.n
        finally:
            _release(resp)
        return prog.n == size

    def _range_answer(self, resp: Any, url: str, file_sha256: str, first: int, left: int,
                      total: int) -> bool:
        """Judge the status and headers of an answer to ``Range`` ``[first, first + left)``
        of a ``total``-byte file blob: True to read its body, False (nothing to read) when
        the store has no usable such blob.

        Raises:
            TransientError: a retryable status. SecurityError: 416 (a blob shorter than its
                file), or a 206 labelled other than asked (:func:`check_partial`).
        """
        status = resp.status
        if status in _RETRY_STATUS:
            raise TransientError(f"HTTP {status} for {url}")
        if status == 416:
            raise SecurityError(f"{url} is shorter than the {total}-byte file it names")
        if status == 206:
            check_partial(url, resp.headers.get("Content-Range"),
                          resp.headers.get("Content-Length"), first, left, total)
            return True
        if status == 200 and first == 0 and left == total:
            return True  # the whole file asked: read to at most its size
        # No usable file blob: absent (404/410; 403 from an S3 bucket that does not let anyone
        # list it), a redirect, a server ignoring Range (200), or refusing it. The chunk
        # blobs, each verified, are the way; nothing here is trusted.
        self._give_up_ranges(file_sha256)
        return False

    def stream_span(self, file_sha256: str, total: int, start: int, size: int,
                    sink: SpanSink) -> bool:
        """Stream bytes ``[start, start + size)`` of the file blob of ``file_sha256`` (a file
        of ``total`` bytes) into ``sink``, in order, as they arrive: one ranged GET (resumed
        where it stopped if cut), no buffer of the span's size. **Not verified here**, as for
        :meth:`fetch_span`: the sink hashes them into the file, which keeps its temp name
        until its sha256 matches (ADR 0014).

        Returns False, having read no body and given the sink nothing, when the store has no
        usable such blob (the cases of :meth:`fetch_span`): the caller then fetches the
        span's chunk blobs, each verified.

        Invariant: on True the sink was given exactly ``size`` bytes, each labelled by the
        server as part of exactly the asked range of a ``total``-byte blob; a body framed by
        its length is read to that length only, any other is read one byte past it, and that
        byte, if any, is a SecurityError. An attempt that moves the span on by less than
        ``max_span`` bytes counts against ``retries`` (one that moves it further starts the
        count again: a long stream survives as many cuts as its ``max_span`` pieces would);
        every attempt is bounded by the minimum rate.

        Raises:
            SecurityError, SlowRetrievalError, TransientError: as :meth:`fetch_span`.
        """
        if size <= 0 or start < 0 or start + size > total:
            raise ValueError(f"bad span {start}+{size} of {total}")
        if not self.ranges_usable(file_sha256):
            return False
        url = self.url(file_sha256)
        done = failed = 0
        while True:
            got, why = self._stream_attempt(url, file_sha256, total, start + done,
                                            size - done, sink)
            if got == 0 and why is None and not self.ranges_usable(file_sha256):
                if done:  # a blob that served ranges stopped: the next cycle resumes
                    raise TransientError(f"{url} stopped answering ranges mid-span")
                return False  # no usable blob: nothing read, nothing given
            done += got
            if done == size:
                return True
            why = why or TransientError(f"truncated range of {url}")
            failed = 0 if got >= self._cfg.max_span else failed + 1
            if failed > self._cfg.retries:
                raise why
            self.stats.add(retries=1)
            time.sleep(backoff_delay(self._cfg, failed))

    def _stream_attempt(self, url: str, file_sha256: str, total: int, first: int, left: int,
                        sink: SpanSink) -> tuple[int, TransientError | None]:
        """One ranged GET of ``[first, first + left)`` into ``sink``: the bytes given to the
        sink (kept whatever happens next: a resume starts after them), and why it stopped
        short (None with 0 bytes: ranges are unusable for this file, or the body was cut:
        resume)."""
        deadline = time.monotonic() + self._cfg.deadline_for(left)
        try:
            resp = self._pool.request("GET", url, headers={"Range": range_header(first, left)},
                                      preload_content=False, redirect=False)
        except urllib3.exceptions.HTTPError as e:
            return 0, TransientError(f"cannot reach {url}: {e}")
        self.stats.add(requests=1)
        try:
            try:
                if not self._range_answer(resp, url, file_sha256, first, left, total):
                    return 0, None
            except TransientError as e:  # a retryable status (a SecurityError propagates)
                return 0, e
            return self._pump(_Body(resp, left), url, left, sink, deadline)
        finally:
            _release(resp)

    def _pump(self, body: _Body, url: str, left: int, sink: SpanSink,
              deadline: float) -> tuple[int, TransientError | None]:
        """Move ``left`` body bytes into ``sink``: the bytes given, and why it stopped short
        (None: the body was cut, resume)."""
        n = 0
        while n < left:
            view = sink.buffer()[: left - n]
            try:
                k = body.readinto(view)
            except (urllib3.exceptions.TimeoutError, TimeoutError):
                return n, SlowRetrievalError(f"read timeout on {url}")
            except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError):
                return n, None  # reset or truncated: resume after the bytes given
            if k > len(view):
                raise SecurityError(f"{url} sent more than the {left} bytes asked")
            if k == 0:
                return n, None
            sink.commit(view[:k])
            n += k
            self.stats.add(nbytes=k)
            if time.monotonic() > deadline and n < left:
                return n, SlowRetrievalError(f"{url} is slower than {self._cfg.min_rate:g} B/s")
        if body.overlong():
            raise SecurityError(f"{url} sent more than the {left} bytes asked")
        return n, None

    def url(self, sha256: str) -> str:
        return self._base + blob_key(sha256)

    def fetch(self, sha256: str, size: int) -> bytearray:
        """Download and verify one chunk.

        Raises:
            SecurityError: more bytes than ``size``, a wrong digest, or a blob the server
                says does not exist (a verified manifest named it).
            SlowRetrievalError: every attempt ran below the minimum rate.
            TransientError: the network failed on every attempt.
        """
        url = self.url(sha256)
        prog = _Progress(size)
        attempt = 0
        while True:
            attempt += 1
            try:
                if self._attempt(url, size, prog):
                    break
                why: TransientError = TransientError(f"truncated body for {url}")
            except TransientError as e:
                why = e
            if attempt > self._cfg.retries:
                raise why
            self.stats.add(retries=1)
            time.sleep(backoff_delay(self._cfg, attempt))
        if prog.n != size or prog.h.hexdigest() != sha256:
            raise SecurityError(f"chunk {sha256[:16]}... failed verification")
        return prog.buf

    def _attempt(self, url: str, size: int, prog: _Progress) -> bool:
        """One GET (ranged if resuming), appending to ``prog``. True when complete."""
        headers = {"Range": f"bytes={prog.n}-"} if prog.n else {}
        deadline = time.monotonic() + self._cfg.deadline_for(size - prog.n)
        try:
            resp = self._pool.request("GET", url, headers=headers, preload_content=False,
                                      redirect=False)
        except urllib3.exceptions.HTTPError as e:
            raise TransientError(f"cannot reach {url}: {e}") from e
        self.stats.add(requests=1)
        try:
            self._check_status(resp, url, prog)
            for data in _pieces(resp, self._cfg.read_size):
                end = prog.n + len(data)
                if end > size:
                    raise SecurityError(f"{url} sent more than the {size} bytes announced")
                prog.buf[prog.n:end] = data
                prog.n = end
                prog.h.update(data)
                self.stats.add(nbytes=len(data))
                if time.monotonic() > deadline and prog.n < size:
                    raise SlowRetrievalError(f"{url} is slower than {self._cfg.min_rate:g} B/s")
        except urllib3.exceptions.TimeoutError as e:
            raise SlowRetrievalError(f"read timeout on {url}") from e
        except urllib3.exceptions.HTTPError:
            return False  # reset or truncated: resume from prog.n
        finally:
            _release(resp)
        return prog.n == size

    @staticmethod
    def _check_status(resp: Any, url: str, prog: _Progress) -> None:
        status = resp.status
        if status == 206 and prog.n:
            start = _content_range_start(resp.headers.get("Content-Range", ""))
            if start != prog.n:
                raise TransientError(f"{url}: server resumed at {start}, not {prog.n}")
            return
        if status == 200:
            if prog.n:  # the server ignored Range: start over
                prog.reset()
            return
        if status in (404, 410):
            raise SecurityError(f"blob named by a verified manifest is missing: {url}")
        raise TransientError(f"HTTP {status} for {url}")


def _release(resp: Any) -> None:
    """Return a fully read connection to the pool; close one abandoned mid-body (a reused
    half-read connection would feed the rest of the old body to the next request)."""
    if not resp.isclosed():
        resp.close()
    resp.release_conn()


def _pieces(resp: Any, size: int) -> Iterator[bytes]:
    """Yield the body as it arrives (``read1``), so deadlines are checked during a slow drip
    rather than after a full buffer."""
    while data := resp.read1(size):
        yield data


class _Body:
    """A response body read into the caller's buffers.

    When the body is exactly the ``expected`` bytes framed by their ``Content-Length``
    (no chunked coding, no content coding: what nginx, S3 and ``ota serve`` send for a
    range), each read is one ``recv`` straight into the buffer through http.client's
    buffered socket reader (``readinto1``, under urllib3's response): no copy, no
    allocation, and, like ``read1``, it returns what has arrived, so deadlines are checked
    during a slow drip. The connection is then closed after the body (:func:`_release`),
    never reused, since http.client did not count the bytes. Any other response (the
    offline medium's, a 200 without a length) goes through urllib3's ``read1`` and a copy;
    one more byte after the expected ones is then an overlong body.
    """

    def __init__(self, resp: Any, expected: int) -> None:
        self._resp = resp
        self._raw: io.BufferedReader | None = None
        fp = getattr(resp, "_fp", None)  # urllib3's http.client response
        coding = str(resp.headers.get("Content-Encoding", "identity")).strip().lower()
        if (
            isinstance(fp, http.client.HTTPResponse)
            and isinstance(fp.fp, io.BufferedReader)
            and not fp.chunked
            and fp.length == expected
            and coding in ("", "identity")
        ):
            self._raw = fp.fp

    def readinto(self, view: memoryview) -> int:
        if self._raw is not None:
            return self._raw.readinto1(view)
        data = self._resp.read1(len(view))
        if len(data) > len(view):
            return len(data)  # the caller refuses it
        view[: len(data)] = data
        return len(data)

    def overlong(self) -> bool:
        """Whether the server sent more than ``expected`` (bounded by its own framing)."""
        if self._raw is not None:
            return False  # framed by its length: nothing more is read
        try:
            return bool(self._resp.read1(1))
        except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError):
            return False  # a connection ending after the whole body adds nothing


class _Progress:
    """One chunk's buffer, allocated once at its announced size (no regrowth while it
    streams: peak memory is the chunk, not a doubling of it), the bytes received so far and
    their running sha256."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        self.n = 0
        self.h = hashlib.sha256()

    def reset(self) -> None:
        self.n = 0
        self.h = hashlib.sha256()


class _Span:
    """One span's buffer, exactly its size, and the bytes received so far."""

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.n = 0


def _content_range_start(value: str) -> int | None:
    # "bytes <start>-<end>/<total>"
    try:
        unit, rng = value.split(" ", 1)
        if unit != "bytes":
            return None
        return int(rng.split("-", 1)[0])
    except ValueError:
        return None
