"""Reference inputs and golden outputs of a model bundle (publisher side).

:func:`make_smoke_files` writes ``smoke/inputs.npz`` and ``smoke/golden.npz`` (bundle layout of
:mod:`ota.bundle`) and returns the :class:`~ota.bundle.SmokeSpec` a device checks them with.

Invariants:

* the files are deterministic: the same model, inputs and seed give the same bytes (our own npz
  writer: members in signature order, stored, fixed zip timestamps and attributes, npy format
  without pickles);
* the inputs match the model's input signature as onnxruntime reports it (names, dtypes, ranks,
  fixed dims), which is exactly what the device-side child checks; generated inputs are ones
  the model ran on (:mod:`ota.repository._smoke_inputs`), else publish stops and asks for
  ``--inputs``;
* the golden outputs are finite; with the ``values`` check they are reproducible (the model is
  run twice and must agree within the tolerances, else the release would fail on every
  device); they are not degenerate (empty, or indistinguishable from a constant within the
  tolerances) unless the operator explicitly allowed it;
* onnxruntime's own error log is silenced here (severity 4): every failure is one
  :class:`GoldenError` line with a remedy, never a raw runtime message on stderr.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ota import _atomic
from ota.bundle import (
    MAX_SMOKE_SETS,
    SMOKE_CHECKS,
    SMOKE_GOLDEN_FILE,
    SMOKE_INPUTS_FILE,
    Budget,
    SmokeSpec,
)
from ota.client import _smoke_child as child
from ota.client._smoke import DEFAULT_SMOKE_LIMITS, SmokeLimits, measure
from ota.errors import InputError, LocalError
from ota.repository._smoke_inputs import Candidate, candidates, degenerate_outputs, int_hints
from ota.repository._stream import ort_session

__all__ = ["GoldenError", "make_smoke_files", "measure_reference", "read_npz", "write_npz"]

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_SUPPORTED = frozenset(child.ORT_DTYPES.values())
DEFAULT_MAX_SMOKE_BYTES = 256 * 1024 * 1024
Signature = list[tuple[str, str, list[Any]]]


class GoldenError(InputError):
    """Reference inputs or golden outputs cannot be made for this model with these inputs."""


def make_smoke_files(
    model_path: Path,
    out_dir: Path,
    *,
    inputs_npz: Path | Sequence[Path] | None = None,
    seed: int = 0,
    batch: int = 1,
    runs: int = 5,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    budgets: Mapping[str, Budget] | None = None,
    max_bytes: int = DEFAULT_MAX_SMOKE_BYTES,
    check: str = "values",
    allow_degenerate: bool = False,
    accepted: list[str] | None = None,
    durable: bool = True,
) -> SmokeSpec:
    """Write the smoke files of a bundle under ``out_dir`` and return their spec.

    ``inputs_npz`` is one reference input file or several (each becomes a reference set the
    device checks). Without it, inputs are generated: candidates from the signature and the
    graph (:mod:`ota.repository._smoke_inputs`: sizes for symbolic axes, the values an integer
    input is compared with), the first on which the model runs and gives finite,
    non-degenerate outputs wins. onnxruntime (CPU provider) computes the golden outputs.

    ``check`` is ``values`` (the device compares outputs with the golden ones; the model must
    give the same outputs twice here) or ``shapes`` (models whose outputs vary: the device
    checks names, dtypes, shapes and finiteness). Degenerate golden outputs (empty, or
    indistinguishable from a constant within the tolerances) are refused unless
    ``allow_degenerate``; then the reasons are appended to ``accepted`` for the record.

    ``durable=False`` writes the files without an fsync each: for a staging folder whose
    files are then copied into the store, whose own barrier makes them durable before any
    metadata names them (``ota publish``, issue 13; the staging folder is private to the
    publish and removed after it).

    Raises:
        GoldenError: the given inputs do not match the signature (names, dtypes, ranks, fixed
            dims), an input or output type is not a numpy-representable tensor, the files would
            exceed ``max_bytes``, the model fails on the inputs (or on every generated
            candidate: the message names ``--inputs``), outputs NaN or infinity, gives
            different outputs on two runs (``values``), or degenerate outputs.
        LocalError: the files cannot be written.
    """
    if batch < 1 or runs < 1:
        raise GoldenError("batch and runs must be at least 1")
    if check not in SMOKE_CHECKS:
        raise GoldenError(f"unknown golden check {check!r}", remedy=f"use one of {SMOKE_CHECKS}")
    paths = (
        []
        if inputs_npz is None
        else [inputs_npz]
        if isinstance(inputs_npz, str | Path)
        else list(inputs_npz)
    )
    if len(paths) > MAX_SMOKE_SETS:
        raise GoldenError(f"at most {MAX_SMOKE_SETS} reference input files")
    session = _session(model_path)
    sig_in = [(i.name, i.type, list(i.shape)) for i in session.get_inputs()]
    sig_out = [(o.name, o.type, list(o.shape)) for o in session.get_outputs()]
    for what, sig in (("input", sig_in), ("output", sig_out)):
        for name, ort_type, _ in sig:
            if child.ORT_DTYPES.get(ort_type) not in _SUPPORTED:
                raise GoldenError(f"{what} {name!r} has unsupported type {ort_type}")
    names = [name for name, _, _ in sig_out]
    sets: list[tuple[dict[str, NDArray[Any]], dict[str, NDArray[Any]]]] = []
    if not paths:
        sets.append(
            _search(session, model_path, sig_in, names, seed=seed, batch=batch, rtol=rtol,
                    atol=atol, check=check, max_bytes=max_bytes,
                    allow_degenerate=allow_degenerate, accepted=accepted)
        )  # fmt: skip
    sets.extend(
        _given_set(session, Path(p), sig_in, names, rtol=rtol, atol=atol, check=check,
                   max_bytes=max_bytes, allow_degenerate=allow_degenerate, accepted=accepted)
        for p in paths
    )  # fmt: skip
    rels: list[tuple[str, str]] = []
    for n, (inputs, golden) in enumerate(sets):
        _check_size(golden, max_bytes, "golden outputs")
        pair = _set_paths(n)
        for rel, arrays in ((pair[0], inputs), (pair[1], golden)):
            _write(Path(out_dir) / rel, npz_bytes(arrays), durable=durable)
        rels.append(pair)
    return SmokeSpec(
        inputs=rels[0][0],
        golden=rels[0][1],
        rtol=rtol,
        atol=atol,
        runs=runs,
        budgets=dict(budgets or {}),
        check=check,
        extra_sets=tuple(rels[1:]),
    )


def _write(path: Path, data: bytes, *, durable: bool) -> None:
    """Write one smoke file: atomically and durably, or (``durable=False``) plainly.

    Raises:
        LocalError: the file cannot be written.
    """
    if durable:
        _atomic.write_bytes(path, data)
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as e:
        raise LocalError(f"cannot write {path}: {e.strerror or e}") from e


_DEGENERATE_REMEDY = (
    "pass real samples with --inputs FILE.npz (one array per input name), or publish anyway "
    "with --allow-degenerate-golden (recorded in the audit log and provenance)"
)


def _set_paths(n: int) -> tuple[str, str]:
    if n == 0:
        return SMOKE_INPUTS_FILE, SMOKE_GOLDEN_FILE
    return f"smoke/inputs-{n + 1}.npz", f"smoke/golden-{n + 1}.npz"


class _NotDeterministic(GoldenError):
    """The same inputs gave different outputs: no other inputs will help."""


def _golden(
    session: Any,
    names: list[str],
    inputs: Mapping[str, Any],
    rtol: float,
    atol: float,
    check: str,
) -> dict[str, NDArray[Any]]:
    """Golden outputs: finite, and (``values``) the same on a second run."""
    golden = _run(session, names, inputs)
    for name, arr in golden.items():
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            raise GoldenError(f"output {name!r} is not finite (NaN or infinity) on the inputs")
    if check == "values":
        try:
            child.compare(_run(session, names, inputs), golden, rtol, atol)
        except child.Failure as e:
            raise _NotDeterministic(
                f"model is not deterministic on the reference inputs: {e}",
                remedy="if its outputs vary by design, publish with --golden-check shapes",
            ) from e
    return golden


def _given_set(
    session: Any,
    path: Path,
    sig_in: Signature,
    names: list[str],
    *,
    rtol: float,
    atol: float,
    check: str,
    max_bytes: int,
    allow_degenerate: bool,
    accepted: list[str] | None,
) -> tuple[dict[str, NDArray[Any]], dict[str, NDArray[Any]]]:
    """One reference set from an operator's inputs file, checked like a generated one."""
    inputs = read_npz(path, max_bytes=max_bytes)
    try:
        child.check_signature(sig_in, [], inputs, None)
    except child.Failure as e:
        raise GoldenError(f"reference inputs {path.name} do not fit the model: {e}") from e
    _check_size(inputs, max_bytes, "inputs")
    golden = _golden(session, names, inputs, rtol, atol, check)
    bad = degenerate_outputs(golden, *((rtol, atol) if check == "values" else (0.0, 0.0)))
    if bad and not allow_degenerate:
        raise GoldenError(
            f"golden outputs on {path.name} are degenerate: {'; '.join(bad)}",
            remedy=_DEGENERATE_REMEDY,
        )
    if accepted is not None:
        accepted.extend(f"{path.name}: {b}" for b in bad)
    return inputs, golden


def _search(
    session: Any,
    model_path: Path,
    sig_in: Signature,
    names: list[str],
    *,
    seed: int,
    batch: int,
    rtol: float,
    atol: float,
    check: str,
    max_bytes: int,
    allow_degenerate: bool,
    accepted: list[str] | None,
) -> tuple[dict[str, NDArray[Any]], dict[str, NDArray[Any]]]:
    """The first generated candidate the model accepts with non-degenerate outputs."""
    dtypes = {name: str(child.ORT_DTYPES[t]) for name, t, _ in sig_in}
    hints = int_hints(model_path, sig_in, dtypes)
    tol = (rtol, atol) if check == "values" else (0.0, 0.0)
    errors: list[str] = []
    degenerate: tuple[Candidate, dict[str, NDArray[Any]], list[str]] | None = None
    tried = 0
    for cand in candidates(sig_in, dtypes, hints=hints, seed=seed, batch=batch,
                           max_bytes=max_bytes):  # fmt: skip
        tried += 1
        if cand.error:
            errors.append(f"{cand.description}: {cand.error}")
            continue
        try:
            golden = _golden(session, names, cand.inputs, rtol, atol, check)
        except _NotDeterministic:
            raise
        except GoldenError as e:
            errors.append(f"{cand.description}: {str(e)[:160]}")
            continue
        bad = degenerate_outputs(golden, *tol)
        if not bad:
            return cand.inputs, golden
        if degenerate is None:
            degenerate = (cand, golden, bad)
    if degenerate is not None:
        cand, golden, bad = degenerate
        if allow_degenerate:
            if accepted is not None:
                accepted.extend(f"generated {cand.description}: {b}" for b in bad)
            return cand.inputs, golden
        raise GoldenError(
            f"generated inputs give degenerate golden outputs for every candidate tried "
            f"({tried}); on {cand.description}: {'; '.join(bad)}",
            remedy=_DEGENERATE_REMEDY,
        )
    shown = errors[0] if len(errors) < 2 else f"{errors[0]}; ...; {errors[-1]}"
    raise GoldenError(
        f"the model rejects every generated input ({tried} candidates tried; {shown[:600]})",
        remedy="pass reference inputs the model accepts with --inputs FILE.npz "
        "(one array per input name; --inputs may be given several times)",
    )


def generate_inputs(signature: Signature, *, seed: int = 0, batch: int = 1) -> dict[str, Any]:
    """The first candidate of :func:`~ota.repository._smoke_inputs.candidates` for a
    ``(name, ort type, shape)`` signature, without graph hints.

    Raises:
        GoldenError: an input type numpy cannot represent.
    """
    dtypes: dict[str, str] = {}
    for name, ort_type, _ in signature:
        dtype_name = child.ORT_DTYPES.get(ort_type)
        if dtype_name is None:
            raise GoldenError(f"input {name!r} has unsupported type {ort_type}")
        dtypes[name] = dtype_name
    for cand in candidates(signature, dtypes, seed=seed, batch=batch, max_bytes=1 << 62):
        return cand.inputs
    return {}


def npz_bytes(arrays: Mapping[str, NDArray[Any]]) -> bytes:
    """A deterministic npz archive (readable by ``np.load``): one stored ``<name>.npy`` member
    per array in mapping order, fixed timestamps and attributes, no pickles.

    Raises:
        GoldenError: an object array (it would need pickling).
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_STORED
            info.create_system = 3
            info.external_attr = 0o644 << 16
            try:
                with archive.open(info, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(arr), allow_pickle=False)
            except ValueError as e:
                raise GoldenError(f"array {name!r} cannot be stored without pickle") from e
    return buf.getvalue()


def write_npz(path: Path, arrays: Mapping[str, NDArray[Any]]) -> None:
    """Atomically write :func:`npz_bytes` of ``arrays`` to ``path``.

    Raises:
        GoldenError: an object array. LocalError: the file cannot be written.
    """
    _atomic.write_bytes(Path(path), npz_bytes(arrays))


def read_npz(path: Path, *, max_bytes: int = DEFAULT_MAX_SMOKE_BYTES) -> dict[str, NDArray[Any]]:
    """Read an npz archive without pickles and with bounded sizes (the device's reader).

    Raises:
        GoldenError: the file is missing, not an npz, holds object arrays or is too large.
    """
    try:
        return child.load_npz(str(path), max_bytes=max_bytes)
    except child.Failure as e:
        raise GoldenError(f"bad npz file {Path(path).name}: {e}") from e


def measure_reference(
    model_path: Path,
    inputs: Path,
    *,
    runs: int = 20,
    limits: SmokeLimits = DEFAULT_SMOKE_LIMITS,
) -> tuple[float, float]:
    """Measure ``(latency_ms_p95, peak_mem_mb)`` of the model on an inputs npz, in the same
    sandboxed child a device uses, so the figures are comparable with device budgets.

    Raises:
        SmokeFailed: the model fails in the sandbox. LocalError: the child cannot start.
    """
    report = measure(Path(model_path), Path(inputs), runs=runs, limits=limits)
    return report.latency_ms_p95, report.peak_mem_mb


def _session(model_path: Path) -> Any:
    """The golden session of the model: the one :mod:`ota.repository._early` built for this
    file after its checks passed (a fresh ``ota publish``), else a new one."""
    from ota.repository import _early

    early = _early.session(model_path)
    return early if early is not None else new_session(model_path)


def new_session(model_path: Path) -> Any:
    """A new onnxruntime session of the model for the golden run.

    Raises:
        GoldenError: onnxruntime cannot load the model.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # errors become GoldenError; nothing raw on stderr
    # One thread, no spinning (issue 13): the publish chunks the payload on the other core
    # meanwhile, so a second intra-op thread only spun and waited for a core (0.06 s of CPU
    # per 256 MiB publish, measured); a batch-1 golden run has little to split. The golden
    # outputs are the same bits (measured on the bench MLP); devices compare them within
    # rtol/atol under their own thread settings in any case.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # The weights are mapped from the file, not copied (issue 13: _stream.ort_session). Weight
    # prepacking stays on, as on devices: without it outputs differ by up to 0.3% (measured).
    try:
        return ort_session(Path(model_path), options)
    except Exception as e:  # onnxruntime's errors do not share a useful base class
        raise GoldenError(f"onnxruntime cannot load {Path(model_path).name}: {_line(e)}") from e


def _run(session: Any, names: list[str], inputs: Mapping[str, Any]) -> dict[str, NDArray[Any]]:
    try:
        values = session.run(names, dict(inputs))
    except Exception as e:  # onnxruntime's errors do not share a useful base class
        raise GoldenError(f"model failed on the reference inputs: {_line(e)}") from e
    return {n: np.asarray(v) for n, v in zip(names, values, strict=True)}


def _check_size(arrays: Mapping[str, NDArray[Any]], max_bytes: int, what: str) -> None:
    total = sum(int(a.nbytes) for a in arrays.values())
    if total > max_bytes:
        raise GoldenError(f"{what} are {total} bytes, over the {max_bytes} limit")


def _line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__
