"""The smoke-inference child: the only code of edge-ota that runs onnxruntime on a device.

Run by :mod:`ota.client._smoke` as ``python -I <this file> …`` inside rlimits, in its own
process group, with a scrubbed environment. It depends on the standard library, numpy and
onnxruntime only (never on the rest of ``ota``), so that a *runtime bundle* can be tested by
putting its folder first on ``sys.path`` (``--runtime-path``) before onnxruntime is imported.

Protocol: the child writes exactly ONE line to its original stdout: a JSON object
(:data:`RESULT_FORMAT`, at most :data:`MAX_RESULT_BYTES`), then exits 0 when the check passed
and 1 when it failed for a reason it could name. File descriptor 1 is redirected to stderr at
start, so that native code printing to stdout cannot corrupt the result line. Any other exit
(a signal, an uncaught error, no line) is for the parent to classify.

What it checks, in order: the inputs and golden files are bounded, pickle-free npz archives;
the model loads; the session's inputs match the inputs file (names, dtypes, ranks, fixed dims)
and its outputs match the golden file (names, dtypes, ranks); then ``runs`` inferences, each
compared with the golden outputs (``np.allclose`` semantics with ``equal_nan=False``; exact for
integer and bool outputs; shapes must be equal), or with ``--check=shapes`` (outputs that vary
by design) only their shapes, dtypes and finiteness. It measures per-run latency and the peak RSS of
the process (``ru_maxrss``). The first run is a warm-up: latency figures use the others when
there are any.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
import zipfile
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from numpy.typing import NDArray

RESULT_FORMAT = "edge-ota.smoke-result/1"
MAX_RESULT_BYTES = 16 * 1024
MAX_MESSAGE_CHARS = 1000

# Reason codes shared with the parent.
OK = "ok"
GOLDEN_MISMATCH = "golden_mismatch"
SIGNATURE_MISMATCH = "signature_mismatch"
CRASH = "crash"
MEMORY = "memory"
TIMEOUT = "timeout"
CPU_LIMIT = "cpu_limit"
LATENCY_BUDGET = "latency_budget"
MEMORY_BUDGET = "memory_budget"
BAD_FILES = "bad_files"
RUNTIME_MISMATCH = "runtime_mismatch"
PROTOCOL = "protocol"
REASONS = (
    OK, GOLDEN_MISMATCH, SIGNATURE_MISMATCH, CRASH, MEMORY, TIMEOUT, CPU_LIMIT, LATENCY_BUDGET,
    MEMORY_BUDGET, BAD_FILES, RUNTIME_MISMATCH, PROTOCOL,
)  # fmt: skip
RESULT_KEYS = frozenset(
    {
        "format", "reason", "message", "runs", "latency_ms_p95", "latency_ms_first", "load_ms",
        "peak_mem_mb", "max_abs_err", "runtime_version", "runtime_file",
    }
)  # fmt: skip

# onnxruntime's type strings for the element types numpy can hold.
ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}
_MEMORY_MARKERS = ("failed to allocate memory", "bad_alloc", "out of memory", "cannot allocate")


class Failure(Exception):
    """A named reason why the smoke check failed, with the figures gathered so far."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def p95(samples: Sequence[float]) -> float:
    """Nearest-rank 95th percentile of a non-empty sequence."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def load_npz(path: str, *, max_bytes: int, max_arrays: int = 256) -> dict[str, NDArray[Any]]:
    """Load a pickle-free npz archive with bounded sizes, without trusting its headers.

    Every member must be ``<name>.npy``, stored or deflated, its declared uncompressed size
    within the remaining budget, and its array header must describe at most that many bytes of
    a non-object dtype; reading never allocates more than the member's declared size.

    Raises:
        Failure: ``bad_files`` for any violation or unreadable archive.
    """
    import numpy as np

    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise Failure(BAD_FILES, f"cannot open {os.path.basename(path)}: {e}") from e
    arrays: dict[str, NDArray[Any]] = {}
    budget = max_bytes
    with archive:
        infos = archive.infolist()
        if len(infos) > max_arrays:
            raise Failure(BAD_FILES, f"{os.path.basename(path)} holds over {max_arrays} arrays")
        for info in infos:
            name = info.filename.removesuffix(".npy")
            if (
                name == info.filename
                or not 0 < len(name) <= 256
                or name in arrays
                or info.file_size > budget
                or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
            ):
                raise Failure(BAD_FILES, f"bad or oversized member {info.filename[:80]!r}")
            budget -= info.file_size
            try:
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    if version == (1, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
                    elif version == (2, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
                    else:
                        raise Failure(BAD_FILES, f"array {name[:80]!r}: npy version {version}")
                    if dtype.hasobject or math.prod(shape) * dtype.itemsize > info.file_size:
                        raise Failure(BAD_FILES, f"array {name[:80]!r} has a bad header")
                    raw = member.read(math.prod(shape) * dtype.itemsize)
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
                raise Failure(BAD_FILES, f"unreadable array {name[:80]!r}: {e}") from e
            if len(raw) != math.prod(shape) * dtype.itemsize:
                raise Failure(BAD_FILES, f"array {name[:80]!r} is truncated")
            flat = np.frombuffer(raw, dtype=dtype)
            arrays[name] = flat.reshape(shape, order="F" if fortran else "C")
    return arrays


def check_signature(
    session_inputs: Sequence[tuple[str, str, Sequence[object]]],
    session_outputs: Sequence[tuple[str, str, Sequence[object]]],
    inputs: Mapping[str, NDArray[Any]],
    golden: Mapping[str, NDArray[Any]] | None,
) -> None:
    """Compare the session's (name, ort type, shape) lists with the arrays.

    Raises:
        Failure: ``signature_mismatch`` naming the first difference.
    """
    _match("input", session_inputs, inputs, fixed_dims=True)
    if golden is not None:
        _match("output", session_outputs, golden, fixed_dims=False)


def _match(
    what: str,
    declared: Sequence[tuple[str, str, Sequence[object]]],
    arrays: Mapping[str, NDArray[Any]],
    *,
    fixed_dims: bool,
) -> None:
    names = {n for n, _, _ in declared}
    if names != set(arrays):
        missing, extra = sorted(names - set(arrays)), sorted(set(arrays) - names)
        raise Failure(
            SIGNATURE_MISMATCH, f"{what} names differ: model lacks {extra}, file lacks {missing}"
        )
    for name, ort_type, shape in declared:
        arr = arrays[name]
        want = ORT_DTYPES.get(ort_type)
        if want is None or arr.dtype.name != want:
            raise Failure(
                SIGNATURE_MISMATCH,
                f"{what} {name!r}: model declares {ort_type}, file holds {arr.dtype.name}",
            )
        if len(shape) != arr.ndim:
            raise Failure(
                SIGNATURE_MISMATCH,
                f"{what} {name!r}: model declares rank {len(shape)}, file holds rank {arr.ndim}",
            )
        for axis, dim in enumerate(shape):
            if fixed_dims and isinstance(dim, int) and dim != arr.shape[axis]:
                raise Failure(
                    SIGNATURE_MISMATCH,
                    f"{what} {name!r}: axis {axis} is {dim} in the model, "
                    f"{arr.shape[axis]} in the file",
                )


def compare(
    outputs: Mapping[str, NDArray[Any]],
    golden: Mapping[str, NDArray[Any]],
    rtol: float,
    atol: float,
) -> float:
    """Return the largest absolute error over float outputs (0.0 when there are none).

    Raises:
        Failure: ``golden_mismatch`` for a shape or dtype change, a NaN, an integer or bool
            difference, or a float difference beyond ``atol + rtol * |golden|``.
    """
    import numpy as np

    worst = 0.0
    for name, want in golden.items():
        got = np.asarray(outputs[name])
        if got.shape != want.shape or got.dtype != want.dtype:
            raise Failure(
                GOLDEN_MISMATCH,
                f"output {name!r} is {got.dtype.name}{list(got.shape)}, "
                f"golden is {want.dtype.name}{list(want.shape)}",
            )
        if got.dtype.kind in "fc":
            if not np.all(np.isclose(got, want, rtol=rtol, atol=atol, equal_nan=False)):
                err = _max_abs_err(got, want)
                raise Failure(
                    GOLDEN_MISMATCH,
                    f"output {name!r} differs from golden: max abs error {err:.6g} "
                    f"(rtol {rtol:g}, atol {atol:g})",
                )
            worst = max(worst, _max_abs_err(got, want))
        elif not np.array_equal(got, want):
            raise Failure(GOLDEN_MISMATCH, f"output {name!r} differs from golden (exact dtype)")
    return worst


def compare_shapes(outputs: Mapping[str, NDArray[Any]], golden: Mapping[str, NDArray[Any]]) -> None:
    """The ``shapes`` check (outputs that vary from run to run): each output has the golden
    output's shape and dtype, and float outputs are finite; values are not compared.

    Raises:
        Failure: ``golden_mismatch`` naming the first difference or the non-finite output.
    """
    import numpy as np

    for name, want in golden.items():
        got = np.asarray(outputs[name])
        if got.shape != want.shape or got.dtype != want.dtype:
            raise Failure(
                GOLDEN_MISMATCH,
                f"output {name!r} is {got.dtype.name}{list(got.shape)}, "
                f"golden is {want.dtype.name}{list(want.shape)}",
            )
        if got.dtype.kind in "fc" and not np.all(np.isfinite(got)):
            raise Failure(GOLDEN_MISMATCH, f"output {name!r} is not finite (NaN or infinity)")


def _max_abs_err(got: NDArray[Any], want: NDArray[Any]) -> float:
    import numpy as np

    if got.size == 0:
        return 0.0
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    return math.inf if np.isnan(diff).any() else float(diff.max())


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB.

    On Linux, ``VmHWM`` of ``/proc/self/status``: the high-water mark of this program's own
    address space. Not ``ru_maxrss``: Linux carries the forking parent's high-water mark across
    ``exec`` into it, so a child forked from a 500 MiB process reported >= 500 MiB whatever
    the model used (the updater's own RSS, or a test runner's, counted as the model's)."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmHWM:"):
                        return int(line.split()[1]) / 1024  # kB
        except (OSError, ValueError, IndexError):
            pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _is_memory_error(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    text = str(e).lower()
    return any(marker in text for marker in _MEMORY_MARKERS)


def run(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Perform the check, filling ``result`` as figures become known.

    Raises:
        Failure: any named reason.
    """
    ort = _import_runtime(args.runtime_path, result)
    inputs = load_npz(args.inputs, max_bytes=args.max_npz_bytes)
    golden = load_npz(args.golden, max_bytes=args.max_npz_bytes) if args.golden else None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if args.threads:
        options.intra_op_num_threads = args.threads
    _memory_options(options, args)
    start = time.perf_counter()
    session = _load_session(ort, args, options)
    result["load_ms"] = (time.perf_counter() - start) * 1000.0
    sig_in = [(i.name, i.type, list(i.shape)) for i in session.get_inputs()]
    sig_out = [(o.name, o.type, list(o.shape)) for o in session.get_outputs()]
    check_signature(sig_in, sig_out, inputs, golden)
    names = [name for name, _, _ in sig_out]
    _infer(session, names, inputs=inputs, golden=golden, args=args, result=result)


def _memory_options(options: Any, args: argparse.Namespace) -> None:
    """Session options that decide how many copies of the weights onnxruntime holds (ADR
    0008): by default no planned block for the initializers (which external data, mapped
    from its file, never uses); prepacking stays on unless the parent turns it off (it
    changes the outputs' rounding: golden outputs are computed with it)."""
    if not args.prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if not args.mem_pattern:
        options.enable_mem_pattern = False


def _load_session(ort: Any, args: argparse.Namespace, options: Any) -> Any:
    """The session, from the model's skeleton (:func:`skeleton`: its large initializers read
    in place from the model file, one copy instead of protobuf's) when it has one, else by
    path; a skeleton onnxruntime refuses for any reason but memory falls back to the path.

    Raises:
        Failure: ``memory`` or ``crash`` when the model cannot be loaded.
    """
    providers = args.providers.split(",")
    skel = skeleton(args.model) if args.skeleton else None
    if skel is not None:
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path",
            os.path.dirname(os.path.abspath(args.model)),
        )
        try:
            return ort.InferenceSession(skel, options, providers=providers)
        except Exception as e:
            if _is_memory_error(e):
                raise Failure(MEMORY, f"model failed to load: {type(e).__name__}: {e}") from e
    try:
        return ort.InferenceSession(args.model, options, providers=providers)
    except Exception as e:
        reason = MEMORY if _is_memory_error(e) else CRASH
        raise Failure(reason, f"model failed to load: {type(e).__name__}: {e}") from e


# -- the model's skeleton: initializers as external data at their offsets in the model file --
#
# onnxruntime parses a single-file model's initializers into protobuf strings (one copy, plus
# up to as much again of untouched buffer growth) and, at some sizes, keeps them beside their
# prepacked copies: 1.8-2.1x a 256 MB model (ADR 0008). Given the same graph whose large
# initializers say "external data: this file, this offset, this length", it maps them from the
# file instead (1.4x, outputs bit-identical). The walk below reads only field headers of the
# ONNX protobuf (ModelProto.graph = 7, GraphProto.initializer = 5, TensorProto.raw_data = 9,
# .external_data = 13, .data_location = 14); anything unexpected returns None (load by path).

_SKELETON_MIN_BYTES = 64 * 1024  # smaller initializers stay inline
_SKELETON_MAX_BYTES = 1024 * 1024  # or 1/16 of the model: else the path is as good
_SKELETON_MAX_FIELDS = 4_000_000  # fields walked in all: a few seconds at most, then the path
_TENSOR_MAX_FIELDS = 64  # a TensorProto has ~15 kinds of field: more is not one we rewrite
_LEN, _VARINT, _I64, _I32 = 2, 0, 1, 5


class _GiveUp(Exception):
    """The walk stops: the skeleton would be too large or the model has too many fields."""


def skeleton(path: str, min_bytes: int = _SKELETON_MIN_BYTES) -> bytes | None:
    """The ModelProto at ``path`` with every top-level graph initializer of at least
    ``min_bytes`` of ``raw_data`` turned into an external-data reference to its own bytes in
    ``path``; None when there is none, or the file is not a plain protobuf we can walk.

    Bounded whatever the file holds (signed is not well-formed): it reads only inside the
    file, walks at most :data:`_SKELETON_MAX_FIELDS` fields and never builds more than the
    skeleton's size cap (it gives up as soon as the output would pass it, before copying);
    any failure, memory included, is None."""
    import mmap

    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            size = len(buf)
            # big tensors elsewhere (Constant nodes...): a skeleton would save little
            walk = _Walk(
                buf, os.path.basename(path), min_bytes, max(_SKELETON_MAX_BYTES, size // 16)
            )
            return walk.model()
    except (OSError, ValueError, MemoryError, _GiveUp):
        return None


class _Walk:
    """One skeleton walk: the file's bytes, and the budgets it spends (fields, output)."""

    def __init__(self, buf: Any, location: str, min_bytes: int, max_out: int) -> None:
        self.buf, self.location, self.min_bytes = buf, location, min_bytes
        self.max_out, self.fields_left, self.written = max_out, _SKELETON_MAX_FIELDS, 0

    def fields(self, pos: int, stop: int) -> Any:
        for f in _fields(self.buf, pos, stop):
            self.fields_left -= 1
            if self.fields_left < 0:
                raise _GiveUp("too many fields")
            yield f

    def spend(self, size: int) -> None:
        """Count ``size`` more bytes of skeleton; give up before passing the output cap."""
        self.written += size
        if self.written > self.max_out:
            raise _GiveUp("skeleton too large")

    def copy(self, out: bytearray, head: int, end: int) -> None:
        self.spend(end - head)
        out += self.buf[head:end]

    def model(self) -> bytes | None:
        out, graphs, changed = bytearray(), 0, False
        for field, wire, head, start, end in self.fields(0, len(self.buf)):
            if field == 7 and wire == _LEN:
                graphs += 1
                if graphs > 1:
                    return None  # protobuf would merge them: not ours to decide
                graph, changed = self.graph(start, end)
                out += _tag(7, _LEN) + _varint(len(graph)) + graph
            else:
                self.copy(out, head, end)
        return bytes(out) if graphs == 1 and changed else None

    def graph(self, begin: int, stop: int) -> tuple[bytes, bool]:
        out, changed = bytearray(), False
        for field, wire, head, start, end in self.fields(begin, stop):
            if field == 5 and wire == _LEN and end - start >= self.min_bytes:
                tensor = self.tensor(start, end)
                if tensor is not None:
                    out += _tag(5, _LEN) + _varint(len(tensor)) + tensor
                    changed = True
                    continue
            self.copy(out, head, end)
        return bytes(out), changed

    def tensor(self, begin: int, stop: int) -> bytes | None:
        fields = []
        for f in self.fields(begin, stop):
            fields.append(f)
            if len(fields) > _TENSOR_MAX_FIELDS:
                return None  # unpacked repeated data...: left as it is
        kept = sum(end - head for field, _, head, _, end in fields if field != 9)
        if self.written + kept > self.max_out:  # copied or rewritten, these bytes stay
            raise _GiveUp("skeleton too large")
        tensor = _skeleton_tensor(self.buf, fields, self.location, self.min_bytes)
        if tensor is not None:
            self.spend(kept)
        return tensor


def _skeleton_tensor(
    buf: Any, fields: list[tuple[int, int, int, int, int]], location: str, min_bytes: int
) -> bytes | None:
    raw = [f for f in fields if f[0] == 9]
    if len(raw) != 1 or raw[0][1] != _LEN or any(f[0] in (13, 14) for f in fields):
        return None  # already external, no raw bytes, or a repeated raw_data: left as it is
    _, _, _, start, end = raw[0]
    if end - start < min_bytes:
        return None
    out = bytearray()
    for field, _, head, _, fend in fields:
        if field != 9:
            out += buf[head:fend]
    for key, value in (
        ("location", location),
        ("offset", str(start)),
        ("length", str(end - start)),
    ):
        entry = _string(1, key) + _string(2, value)
        out += _tag(13, _LEN) + _varint(len(entry)) + entry
    return bytes(out + _tag(14, _VARINT) + _varint(1))  # data_location = EXTERNAL


def _fields(buf: Any, pos: int, stop: int) -> Any:
    """Yield (field number, wire type, header start, value start, value end) of a message in
    ``buf[pos:stop]``. Raises ValueError on groups, bad lengths or a truncated message."""
    while pos < stop:
        head = pos
        key, pos = _read_varint(buf, pos, stop)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ValueError("field number 0")
        if wire == _VARINT:
            _, end = _read_varint(buf, pos, stop)
        elif wire == _LEN:
            size, pos = _read_varint(buf, pos, stop)
            end = pos + size
        elif wire in (_I64, _I32):
            end = pos + (8 if wire == _I64 else 4)
        else:
            raise ValueError(f"wire type {wire}")
        if end > stop:
            raise ValueError("truncated message")
        yield field, wire, head, pos, end
        pos = end


def _read_varint(buf: Any, pos: int, stop: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= stop or shift > 63:
            raise ValueError("bad varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


encode_varint = _varint  # public: the publisher's skeleton writer (repository/_stream.py) too


def _tag(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _string(field: int, text: str) -> bytes:
    data = text.encode()
    return _tag(field, _LEN) + _varint(len(data)) + data


def _import_runtime(runtime_path: str, result: dict[str, Any]) -> Any:
    """Import onnxruntime, from ``runtime_path`` first when given, and record which one.

    Raises:
        Failure: ``crash`` if it cannot be imported, ``runtime_mismatch`` if it came from
            elsewhere than ``runtime_path``.
    """
    if runtime_path:
        if "onnxruntime" in sys.modules:
            raise Failure(RUNTIME_MISMATCH, "onnxruntime was imported before the runtime path")
        sys.path.insert(0, runtime_path)
    try:
        import onnxruntime as ort
    except Exception as e:
        raise Failure(CRASH, f"cannot import the runtime: {type(e).__name__}: {e}") from e
    result["runtime_version"] = str(getattr(ort, "__version__", ""))[:64]
    runtime_file = os.path.realpath(str(getattr(ort, "__file__", "") or ""))
    result["runtime_file"] = runtime_file[:512]
    if runtime_path:
        root = os.path.realpath(runtime_path)
        if os.path.commonpath([root, runtime_file]) != root:
            raise Failure(RUNTIME_MISMATCH, f"onnxruntime was loaded from outside {root}")
    return ort


def _infer(
    session: Any,
    names: list[str],
    *,
    inputs: Mapping[str, NDArray[Any]],
    golden: Mapping[str, NDArray[Any]] | None,
    args: argparse.Namespace,
    result: dict[str, Any],
) -> None:
    """Run ``args.runs`` inferences, timing each and comparing each with ``golden``.

    Raises:
        Failure: ``memory`` or ``crash`` when a run raises, ``golden_mismatch`` from
            :func:`compare`.
    """
    import numpy as np

    latencies: list[float] = []
    worst = 0.0
    for _ in range(args.runs):
        start = time.perf_counter()
        try:
            values = session.run(names, dict(inputs))
        except Exception as e:
            reason = MEMORY if _is_memory_error(e) else CRASH
            raise Failure(reason, f"inference failed: {type(e).__name__}: {e}") from e
        latencies.append((time.perf_counter() - start) * 1000.0)
        result["runs"] = len(latencies)
        result["latency_ms_first"] = latencies[0]
        result["latency_ms_p95"] = p95(latencies[1:] or latencies)
        result["peak_mem_mb"] = peak_rss_mb()
        if golden is not None:
            outputs = {n: np.asarray(v) for n, v in zip(names, values, strict=True)}
            try:
                if args.check == "shapes":
                    compare_shapes(outputs, golden)
                else:
                    worst = max(worst, compare(outputs, golden, args.rtol, args.atol))
            except Failure:
                result["max_abs_err"] = _worst_err(outputs, golden)
                raise
            # the shapes check compares no value: no error was measured (never a false 0.0)
            result["max_abs_err"] = worst if args.check == "values" else None


def _worst_err(outputs: Mapping[str, NDArray[Any]], golden: Mapping[str, NDArray[Any]]) -> float:
    worst = 0.0
    for name, want in golden.items():
        got = outputs[name]
        if got.shape == want.shape and want.dtype.kind in "fciub" and got.dtype.kind in "fciub":
            worst = max(worst, _max_abs_err(got, want))
    return worst


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ota-smoke-child")
    parser.add_argument("--model", required=True)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--golden", default="")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rtol", type=float, default=1e-3)
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument("--runtime-path", default="")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--providers", default="CPUExecutionProvider")
    parser.add_argument("--max-npz-bytes", type=int, default=1 << 30)
    parser.add_argument("--check", choices=("values", "shapes"), default="values")
    parser.add_argument("--prepack", type=int, choices=(0, 1), default=1)
    parser.add_argument("--mem-pattern", type=int, choices=(0, 1), default=0)
    parser.add_argument("--skeleton", type=int, choices=(0, 1), default=1)
    return parser.parse_args(list(argv))


def _finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check and write the one result line; return the exit code (0 pass, 1 fail)."""
    out_fd = os.dup(1)
    os.dup2(2, 1)  # anything else printed to stdout lands on stderr
    result: dict[str, Any] = dict.fromkeys(RESULT_KEYS)
    result.update(format=RESULT_FORMAT, reason=OK, message="", runs=0)
    try:
        run(_parse_args(sys.argv[1:] if argv is None else argv), result)
    except Failure as e:
        result["reason"], result["message"] = e.reason, str(e)
    except MemoryError:
        result["reason"], result["message"] = MEMORY, "out of memory in the smoke child"
    except Exception as e:  # the child reports every failure; the parent decides what it means
        reason = MEMORY if _is_memory_error(e) else CRASH
        result["reason"], result["message"] = reason, f"{type(e).__name__}: {e}"
    if result["peak_mem_mb"] is None:
        result["peak_mem_mb"] = peak_rss_mb()
    result["message"] = " ".join(str(result["message"]).split())[:MAX_MESSAGE_CHARS]
    if result["max_abs_err"] is not None and not math.isfinite(result["max_abs_err"]):
        result["message"] += " (NaN in outputs)"
    line = json.dumps({k: _finite(v) for k, v in result.items()}, allow_nan=False) + "\n"
    with os.fdopen(out_fd, "w", encoding="utf-8") as out:
        out.write(line)
    return 0 if result["reason"] == OK else 1


if __name__ == "__main__":
    sys.exit(main())
