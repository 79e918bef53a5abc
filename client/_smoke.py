"""Sandboxed smoke inference of a staged bundle (DESIGN decision 6), device side.

:func:`run_smoke` runs :mod:`ota.client._smoke_child` in a subprocess: ``python -I`` with a
scrubbed environment, its own session (process group), and rlimits set before ``exec``:

* ``RLIMIT_AS``: derived per run from the model and the tier's memory budget
  (:func:`memory_limit_mb`, ADR 0008): a fixed reserve (interpreter, numpy, onnxruntime, thread
  stacks, margin) + the address space onnxruntime's loader reserves beyond the model's bytes
  (protobuf grows each initializer's buffer by doubling: up to ``model_as_factor`` x the model
  file while it parses, untouched pages included; external data is mapped, and prepacking
  copies each weight while its mapping is live: ``external_as_factor`` x the external data) +
  the memory the run may use: the tier's
  ``peak_mem_mb`` budget when the bundle sets one, else the model files and twice the smoke
  files;
* ``RLIMIT_CPU``: a backstop if this process dies and cannot kill the child;
* ``RLIMIT_FSIZE`` (the child writes nothing but its bounded stdout/stderr, which go to
  temporary files, so this also bounds them), ``RLIMIT_NOFILE``, ``RLIMIT_CORE = 0``.

A wall-clock timeout kills the whole process group. The child needs no network and receives no
credentials (its environment holds only a few allocator settings). The result is one JSON line,
parsed strictly; the figures are then compared with ``spec.budget_for(tier)``.

This module must not import onnx or onnxruntime: a device has onnxruntime and numpy only, and
onnxruntime runs only in the child.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from ota.bundle import FormatError, SmokeSpec, validate_bundle_path
from ota.client import _smoke_child as child
from ota.client._runtime import RuntimeBundleError, import_root, wheels
from ota.errors import LocalError, SmokeError

__all__ = ["SmokeFailed", "SmokeLimits", "SmokeReport", "measure", "memory_limit_mb", "run_smoke"]

_MB = 1024 * 1024
_STDERR_TAIL = 2000
_CHILD_ENV = {
    "MALLOC_ARENA_MAX": "2",  # glibc reserves 64 MB of address space per arena otherwise
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "LC_ALL": "C",
    "PATH": "/usr/bin:/bin",
}


@dataclass(frozen=True)
class SmokeLimits:
    """Bounds of one smoke run. ``None`` picks the derived default named in each comment."""

    timeout_s: float = 120.0
    cpu_s: int | None = None  # default: timeout x CPUs + 5 (threads add CPU time up)
    base_mem_mb: int = 300
    thread_mem_mb: int = 10  # per onnxruntime intra-op thread (8 MB stack, measured)
    mem_margin_mb: int = 256
    model_as_factor: float = 3.0  # address space per byte of the .onnx file while it parses
    # Address space per byte of external data (issue 13, measured at 4 GB): the data is mapped,
    # and prepacking allocates each weight's packed copy while that weight's mapping is live,
    # so up to the largest tensor is held twice (4 GB of 512 MB tensors: VmPeak 4.78 GiB, over
    # a limit that counted the data once). 2.0 covers one tensor as large as all the data.
    external_as_factor: float = 2.0
    mem_limit_mb: int | None = None  # overrides the derived RLIMIT_AS entirely
    # onnxruntime session options that cost memory (ADR 0008, measured). Prepacking keeps a
    # packed copy of Gemm/MatMul weights beside the originals (+0.6x a 256 MB model), but it
    # also changes the kernels, hence the outputs (0.6% relative on big_mlp): the publisher's
    # golden outputs and the app use it, so the smoke does too. The memory pattern only plans
    # allocations: one block the size of all initializers, never used when they are mapped
    # from external data (+1x the model in address space); off.
    prepack: bool = True
    mem_pattern: bool = False
    # Load a single-file model through its skeleton (large initializers read in place from
    # the file as external data): one copy of the weights instead of protobuf's.
    skeleton: bool = True
    fsize_bytes: int = 1 * _MB
    nofile: int = 256
    max_output_bytes: int = 64 * 1024
    max_npz_bytes: int = 1024 * _MB  # per smoke file, uncompressed
    max_model_files: int = 4096
    threads: int = 0  # onnxruntime intra-op threads; 0 keeps onnxruntime's default
    providers: tuple[str, ...] = ("CPUExecutionProvider",)


DEFAULT_SMOKE_LIMITS = SmokeLimits()


@dataclass(frozen=True)
class SmokeReport:
    """Figures of a passed smoke check. ``latency_ms_p95`` excludes the warm-up run when there
    were at least two; ``peak_mem_mb`` is the child's peak RSS (interpreter and runtime
    included); ``wall_ms`` covers the whole subprocess, start-up included."""

    latency_ms_p95: float
    peak_mem_mb: float
    runs: int
    max_abs_err: float | None
    latency_ms_first: float
    load_ms: float
    wall_ms: float
    runtime_version: str
    runtime_file: str
    tier: str
    mem_limit_mb: int = 0  # the child's RLIMIT_AS (memory_limit_mb)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SmokeFailed(SmokeError):
    """The smoke check failed. ``reason`` is a code of :data:`ota.client._smoke_child.REASONS`;
    ``report`` holds the partial figures (a dict: reason, message, tier, runs, latency, peak
    memory, max abs error, return code, stderr tail)."""

    def __init__(self, message: str, *, report: Mapping[str, Any], remedy: str | None = None):
        super().__init__(message, remedy=remedy)
        self.report: dict[str, Any] = dict(report)

    @property
    def reason(self) -> str:
        return str(self.report.get("reason", child.PROTOCOL))


def run_smoke(
    model_path: Path,
    bundle_dir: Path,
    spec: SmokeSpec,
    *,
    tier: str,
    limits: SmokeLimits = DEFAULT_SMOKE_LIMITS,
    runtime_path: Path | None = None,
) -> SmokeReport:
    """Smoke-test ``model_path`` with the bundle's reference inputs and golden outputs.

    ``spec.sets()`` are pairs of bundle paths under ``bundle_dir``; each pair runs in its own
    child, and the budgets judge the worst figures over all pairs. ``spec.check`` tells how
    outputs are compared (:data:`ota.bundle.SMOKE_CHECKS`). With
    ``runtime_path`` (a folder holding an ``onnxruntime`` package, or a runtime bundle's root
    whose ``runtime/`` folder does) the child imports onnxruntime from there, and the check
    fails with ``runtime_mismatch`` unless it really did.

    Raises:
        SmokeFailed: golden mismatch, I/O signature mismatch, crash or load failure, memory
            exhaustion, timeout, CPU limit, latency or memory over the tier's budget, a bad
            smoke file or an unparseable child result. ``.report`` has the figures.
        LocalError: the child process could not be started.
    """
    budget = spec.budget_for(tier)
    report: SmokeReport | None = None
    for inputs_rel, golden_rel in spec.sets():  # every reference set must pass; worst figures
        inputs = _bundle_file(bundle_dir, inputs_rel, tier)
        golden = _bundle_file(bundle_dir, golden_rel, tier)
        raw = _run_child(
            Path(model_path), inputs, golden,
            runs=max(1, spec.runs), rtol=spec.rtol, atol=spec.atol, limits=limits,
            runtime_path=runtime_path, check=spec.check,
            budget_mb=budget.peak_mem_mb if budget else None,
        )  # fmt: skip
        if raw["reason"] == child.MEMORY and raw.get("mem_limit_from") == "budget":
            raise _failed(
                {**raw, "reason": child.MEMORY_BUDGET, "tier": tier},
                f"ran out of memory under the {tier} budget's limit: {raw['message']}",
            )
        one = _report(raw, tier)
        report = one if report is None else _worst(report, one)
    assert report is not None  # spec.sets() is never empty
    if budget is not None:
        if budget.latency_ms_p95 is not None and report.latency_ms_p95 > budget.latency_ms_p95:
            raise _failed(
                {**raw, "reason": child.LATENCY_BUDGET, "tier": tier},
                f"latency p95 {report.latency_ms_p95:.3f} ms exceeds the {tier} budget of "
                f"{budget.latency_ms_p95:g} ms",
            )
        if budget.peak_mem_mb is not None and report.peak_mem_mb > budget.peak_mem_mb:
            raise _failed(
                {**raw, "reason": child.MEMORY_BUDGET, "tier": tier},
                f"peak memory {report.peak_mem_mb:.1f} MB exceeds the {tier} budget of "
                f"{budget.peak_mem_mb:g} MB",
            )
    return report


def measure(
    model_path: Path,
    inputs_path: Path,
    *,
    runs: int = 20,
    limits: SmokeLimits = DEFAULT_SMOKE_LIMITS,
    runtime_path: Path | None = None,
) -> SmokeReport:
    """Run the model on ``inputs_path`` in the same sandbox as :func:`run_smoke`, without golden
    outputs or budgets, and return the figures (the publisher's reference measurement).

    Raises:
        SmokeFailed: the model crashed, ran out of memory or time, or the inputs do not fit.
        LocalError: the child process could not be started.
    """
    raw = _run_child(
        Path(model_path), Path(inputs_path), None,
        runs=runs, rtol=0.0, atol=0.0, limits=limits, runtime_path=runtime_path,
    )  # fmt: skip
    return _report(raw, "reference")


def _bundle_file(bundle_dir: Path, rel: str, tier: str) -> Path:
    try:
        validate_bundle_path(rel)
    except FormatError as e:
        raise _failed({"reason": child.BAD_FILES, "tier": tier}, f"bad smoke path: {e}") from e
    path = Path(bundle_dir) / rel
    if not path.is_file():
        raise _failed({"reason": child.BAD_FILES, "tier": tier}, f"bundle lacks {rel}")
    return path


def _report(raw: Mapping[str, Any], tier: str) -> SmokeReport:
    if raw["reason"] != child.OK:
        raise _failed({**raw, "tier": tier}, str(raw["message"]) or str(raw["reason"]))
    for key in ("latency_ms_p95", "latency_ms_first", "load_ms", "peak_mem_mb"):
        if raw[key] is None:
            raise _failed(
                {**raw, "reason": child.PROTOCOL, "tier": tier}, f"child result lacks {key}"
            )
    return SmokeReport(
        latency_ms_p95=raw["latency_ms_p95"],
        peak_mem_mb=raw["peak_mem_mb"],
        runs=raw["runs"],
        max_abs_err=raw["max_abs_err"],
        latency_ms_first=raw["latency_ms_first"],
        load_ms=raw["load_ms"],
        wall_ms=raw["wall_ms"],
        runtime_version=raw["runtime_version"] or "",
        runtime_file=raw["runtime_file"] or "",
        tier=tier,
        mem_limit_mb=int(raw.get("mem_limit_mb") or 0),
    )


def _worst(a: SmokeReport, b: SmokeReport) -> SmokeReport:
    """The figures of two passed sets combined: the worse latency, memory and error."""
    errs = [e for e in (a.max_abs_err, b.max_abs_err) if e is not None]
    return SmokeReport(
        latency_ms_p95=max(a.latency_ms_p95, b.latency_ms_p95),
        peak_mem_mb=max(a.peak_mem_mb, b.peak_mem_mb),
        runs=a.runs + b.runs,
        max_abs_err=max(errs) if errs else None,
        latency_ms_first=max(a.latency_ms_first, b.latency_ms_first),
        load_ms=max(a.load_ms, b.load_ms),
        wall_ms=a.wall_ms + b.wall_ms,
        runtime_version=a.runtime_version,
        runtime_file=a.runtime_file,
        tier=a.tier,
        mem_limit_mb=max(a.mem_limit_mb, b.mem_limit_mb),
    )


def _failed(report: Mapping[str, Any], message: str) -> SmokeFailed:
    reason = str(report.get("reason", child.PROTOCOL))
    figures = []
    for key, unit in (
        ("latency_ms_p95", "ms p95"),
        ("peak_mem_mb", "MB peak"),
        ("max_abs_err", "max abs err"),
    ):
        value = report.get(key)
        if isinstance(value, int | float):
            figures.append(f"{value:.4g} {unit}")
    suffix = f" [{', '.join(figures)}]" if figures else ""
    return SmokeFailed(
        f"smoke test failed ({reason}): {message}{suffix}",
        report={"reason": reason, "message": message, **report},
        remedy=_REMEDIES.get(reason),
    )


_REMEDIES = {
    child.GOLDEN_MISMATCH: "the model computes different outputs on this device; check the "
    "runtime version and tolerances",
    child.MEMORY: "the model needs more memory than the sandbox allows on this device",
    child.TIMEOUT: "the model did not finish in time; check the device load or the budget",
    child.LATENCY_BUDGET: "the model is too slow for this hardware tier",
    child.MEMORY_BUDGET: "the model uses more memory than this hardware tier's budget",
}


def _run_child(  # noqa: PLR0911 - each early return is a distinct synthetic result
    model: Path,
    inputs: Path,
    golden: Path | None,
    *,
    runs: int,
    rtol: float,
    atol: float,
    limits: SmokeLimits,
    runtime_path: Path | None,
    check: str = "values",
    budget_mb: float | None = None,
) -> dict[str, Any]:
    """Run the child under limits and return its validated result dict (plus ``wall_ms``,
    ``returncode`` and ``stderr_tail``). Never raises for a child failure: that is a result."""
    model, inputs = model.absolute(), inputs.absolute()  # the child runs in "/"
    golden = golden.absolute() if golden else None
    model_file, other_bytes = _model_bytes(model, limits.max_model_files)
    try:
        smoke_bytes = inputs.stat().st_size + (golden.stat().st_size if golden else 0)
    except OSError as e:
        return _synthetic(child.BAD_FILES, f"cannot read the smoke files: {e}", {})
    mem_mb, mem_from = memory_limit_mb(
        model_file, other_bytes, smoke_bytes, limits=limits, budget_mb=budget_mb
    )
    cpu_s = limits.cpu_s
    if cpu_s is None:
        cpu_s = math.ceil(limits.timeout_s * (os.cpu_count() or 1)) + 5
    try:
        runtime = _runtime_dir(runtime_path).absolute() if runtime_path else ""
    except RuntimeBundleError as e:
        return _synthetic(child.RUNTIME_MISMATCH, str(e), {})
    except OSError as e:
        raise LocalError(f"cannot unpack the runtime bundle: {e.strerror or e}") from e
    argv = [
        sys.executable, "-I", child.__file__,
        f"--model={model}", f"--inputs={inputs}", f"--golden={golden or ''}",
        f"--runs={runs}", f"--rtol={rtol!r}", f"--atol={atol!r}",
        f"--threads={limits.threads}", f"--providers={','.join(limits.providers)}",
        f"--max-npz-bytes={limits.max_npz_bytes}", f"--runtime-path={runtime}",
        f"--check={check}",
        f"--prepack={int(limits.prepack)}", f"--mem-pattern={int(limits.mem_pattern)}",
        f"--skeleton={int(limits.skeleton)}",
    ]  # fmt: skip
    preexec = _limiter(mem_mb * _MB, cpu_s, limits.fsize_bytes, limits.nofile)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=dict(_CHILD_ENV),
                cwd="/", start_new_session=True, close_fds=True,
                preexec_fn=preexec,  # noqa: PLW1509 - it only calls setrlimit, takes no lock
            )  # fmt: skip
        except OSError as e:
            raise LocalError(f"cannot start the smoke child: {e.strerror or e}") from e
        timed_out = False
        try:
            proc.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        except BaseException:
            _kill_group(proc)
            raise
        wall_ms = (time.perf_counter() - start) * 1000.0
        stdout = _read_bounded(out, limits.max_output_bytes + 1)
        stderr = _read_tail(err, _STDERR_TAIL)
    extra: dict[str, Any] = {
        "wall_ms": wall_ms, "returncode": proc.returncode, "stderr_tail": stderr,
        "mem_limit_mb": mem_mb, "mem_limit_from": mem_from,
    }  # fmt: skip
    if timed_out:
        return _synthetic(child.TIMEOUT, f"no result within {limits.timeout_s:g} s", extra)
    code = proc.returncode
    if code < 0:
        return _synthetic(*_classify_signal(-code, stderr), extra)
    parsed = _parse_result(stdout, limits.max_output_bytes)
    if isinstance(parsed, str):
        return _synthetic(child.CRASH if code else child.PROTOCOL, parsed, extra)
    if (code == 0) != (parsed["reason"] == child.OK) or code not in (0, 1):
        return _synthetic(child.PROTOCOL, f"exit code {code} contradicts the result", extra)
    return {**parsed, **extra}


def _runtime_dir(runtime_path: Path) -> Path:
    """The folder to put first on the child's ``sys.path``: ``runtime_path`` itself when it
    holds an ``onnxruntime`` package, else its ``runtime/`` folder when that does (a runtime
    bundle's root, see :mod:`ota.bundle`), else the wheels of either unpacked beside the slot
    (:func:`ota.client._runtime.import_root`). Otherwise ``runtime_path``, and the child will
    report ``runtime_mismatch``.

    Raises:
        RuntimeBundleError: a wheel cannot be unpacked safely. OSError: nor written.
    """
    path = Path(runtime_path)
    if (path / "onnxruntime").is_dir():
        return path
    if (path / "runtime" / "onnxruntime").is_dir():
        return path / "runtime"
    for folder in (path / "runtime", path):
        if wheels(folder):
            return import_root(folder)
    return path


def _limiter(as_bytes: int, cpu_s: int, fsize: int, nofile: int) -> Callable[[], None]:
    def apply() -> None:  # runs between fork and exec: only async-signal-safe-ish calls
        resource.setrlimit(resource.RLIMIT_AS, (as_bytes, as_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child's process group (its session, started for it) and reap the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def _classify_signal(signum: int, stderr: str) -> tuple[str, str]:
    name = _signal_name(signum)
    if signum in (signal.SIGXCPU, signal.SIGKILL):
        # SIGKILL that we did not send comes from the CPU hard limit or the kernel's OOM killer.
        if signum == signal.SIGXCPU:
            return child.CPU_LIMIT, f"child exceeded its CPU time limit ({name})"
        return child.MEMORY, f"child was killed ({name}), likely by the out-of-memory killer"
    lowered = stderr.lower()
    if any(m in lowered for m in ("bad_alloc", "out of memory", "failed to allocate")):
        return child.MEMORY, f"child died of memory exhaustion ({name})"
    return child.CRASH, f"child died with {name}"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _synthetic(reason: str, message: str, extra: Mapping[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = dict.fromkeys(child.RESULT_KEYS)
    doc.update(format=child.RESULT_FORMAT, reason=reason, message=message, runs=0)
    return {**doc, **extra}


def _read_bounded(f: IO[bytes], limit: int) -> bytes:
    f.seek(0)
    return f.read(limit)


def _read_tail(f: IO[bytes], limit: int) -> str:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - limit))
    return f.read(limit).decode("utf-8", "replace")


def memory_limit_mb(
    model_file_bytes: int,
    other_bytes: int,
    smoke_bytes: int,
    *,
    limits: SmokeLimits = DEFAULT_SMOKE_LIMITS,
    budget_mb: float | None = None,
) -> tuple[int, str]:
    """The smoke child's ``RLIMIT_AS`` in MiB, and what set it: ``"override"``, ``"budget"``
    (the tier's ``peak_mem_mb``) or ``"model"``.

    ``reserve`` (interpreter, numpy, onnxruntime's mappings, thread stacks, margin) + ``slack``
    (address space the loader reserves but does not touch: protobuf grows an initializer's
    buffer by doubling, so parsing a ``.onnx`` file can map up to ``model_as_factor`` times its
    size, of which one is used; external data is mapped, and a weight's packed copy is made
    while its mapping is live: up to ``external_as_factor`` times the data, of which one is
    counted in the allowance) + ``allowance``: the tier's
    memory budget when there is one (a model that fits its budget is never cut short, and one
    far over it is stopped early), else the model files plus twice the smoke files (the bytes
    onnxruntime and numpy hold). Measured in ADR 0008: peak RSS 1.1-1.4x the model + 60 MB.

    The allowance never exceeds this machine's physical memory: a budget is a signed claim
    about a tier, not about this device, and a huge one (any finite number parses) must not
    lift the limit until the sandbox no longer bounds a runaway model.
    """
    if limits.mem_limit_mb is not None:
        return limits.mem_limit_mb, "override"
    threads = limits.threads or os.cpu_count() or 1
    reserve = limits.base_mem_mb + limits.mem_margin_mb + limits.thread_mem_mb * threads
    slack = (
        max(limits.model_as_factor - 1.0, 0.0) * model_file_bytes
        + max(limits.external_as_factor - 1.0, 0.0) * other_bytes
    ) / _MB
    if budget_mb is not None:
        allowance, source = max(budget_mb, 0.0), "budget"
    else:
        allowance, source = (model_file_bytes + other_bytes + 2 * smoke_bytes) / _MB, "model"
    return math.ceil(reserve + slack + min(allowance, _machine_mb())), source


def _machine_mb() -> float:
    """This machine's physical memory in MiB (a terabyte if the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / _MB
    except (OSError, ValueError):
        return 1024.0 * 1024.0


def _model_bytes(model: Path, max_files: int) -> tuple[int, int]:
    """Sizes of the model file, and of the regular files beside it (its external data),
    bounded in count."""
    try:
        size, others = model.stat().st_size, 0
        for n, entry in enumerate(os.scandir(model.parent)):
            if n >= max_files:
                break
            if entry.is_file(follow_symlinks=False) and entry.path != str(model):
                others += entry.stat(follow_symlinks=False).st_size
    except OSError as e:
        raise _failed({"reason": child.BAD_FILES}, f"cannot read the model: {e}") from e
    return size, others


_NUMBER_KEYS = ("latency_ms_p95", "latency_ms_first", "load_ms", "peak_mem_mb", "max_abs_err")


def _parse_result(data: bytes, limit: int) -> dict[str, Any] | str:
    """Validate the child's single result line; return it, or a reason why it is unusable."""
    try:
        return _validate_result(data, limit)
    except ValueError as e:
        return str(e)


def _validate_result(data: bytes, limit: int) -> dict[str, Any]:
    """Parse the result line strictly: one line, known fields only, typed and bounded values.

    Raises:
        ValueError: naming the first problem.
    """
    if not data or len(data) > limit:
        raise ValueError("child printed no result or more than the result limit")
    if not data.endswith(b"\n") or data.count(b"\n") != 1:
        raise ValueError("child result is not exactly one line")
    try:
        doc = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"child result is not JSON: {e}") from e
    if not isinstance(doc, dict) or set(doc) != child.RESULT_KEYS:
        raise ValueError("child result has unexpected fields")
    if doc["format"] != child.RESULT_FORMAT or doc["reason"] not in child.REASONS:
        raise ValueError("child result has an unknown format or reason")
    runs = doc["runs"]
    if isinstance(runs, bool) or not isinstance(runs, int) or not 0 <= runs <= 100_000:
        raise ValueError("child result has a bad run count")
    for key in _NUMBER_KEYS:
        value = doc[key]
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"child result has a bad {key}")
        doc[key] = float(value)
    for key in ("message", "runtime_version", "runtime_file"):
        if doc[key] is not None and (not isinstance(doc[key], str) or len(doc[key]) > 4096):
            raise ValueError(f"child result has a bad {key}")
    return doc


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")
