"""Reference inputs and golden outputs of a model bundle (publisher side).

:func:`make_smoke_files` writes ``smoke/inputs.npz`` and ``smoke/golden.npz`` (bundle layout of
:mod:`ota.bundle`) and returns the :class:`~ota.bundle.SmokeSpec` a device checks them with.

Invariants:

* the files are deterministic: the same model, inputs and seed give the same bytes (our own npz
  writer: members in signature order, stored, fixed zip timestamps and attributes, npy format
  without pickles);
* the inputs match the model's input signature as onnxruntime reports it (names, dtypes, ranks,
  fixed dims), which is exactly what the device-side child checks;
* the golden outputs are finite and reproducible: the model is run twice and must agree within
  the tolerances, else the release would fail on every device.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ota import _atomic
from ota.bundle import SMOKE_GOLDEN_FILE, SMOKE_INPUTS_FILE, Budget, SmokeSpec
from ota.client import _smoke_child as child
from ota.client._smoke import DEFAULT_SMOKE_LIMITS, SmokeLimits, measure
from ota.errors import InputError
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
    inputs_npz: Path | None = None,
    seed: int = 0,
    batch: int = 1,
    runs: int = 5,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    budgets: Mapping[str, Budget] | None = None,
    max_bytes: int = DEFAULT_MAX_SMOKE_BYTES,
) -> SmokeSpec:
    """Write the smoke files of a bundle under ``out_dir`` and return their spec.

    Without ``inputs_npz``, inputs are generated from the signature with ``seed``: the first
    axis, when symbolic, becomes ``batch`` and every other symbolic axis 1; floats are standard
    normal, integers uniform in ``[0, 10)``, bools fair coins. onnxruntime (CPU provider) computes
    the golden outputs.

    Raises:
        GoldenError: the given inputs do not match the signature (names, dtypes, ranks, fixed
            dims), an input or output type is not a numpy-representable tensor, the files would
            exceed ``max_bytes``, the model fails on the inputs, outputs NaN or infinity, or
            gives different outputs on two runs.
        LocalError: the files cannot be written.
    """
    if batch < 1 or runs < 1:
        raise GoldenError("batch and runs must be at least 1")
    session = _session(model_path)
    sig_in = [(i.name, i.type, list(i.shape)) for i in session.get_inputs()]
    sig_out = [(o.name, o.type, list(o.shape)) for o in session.get_outputs()]
    for what, sig in (("input", sig_in), ("output", sig_out)):
        for name, ort_type, _ in sig:
            if child.ORT_DTYPES.get(ort_type) not in _SUPPORTED:
                raise GoldenError(f"{what} {name!r} has unsupported type {ort_type}")
    if inputs_npz is None:
        inputs = generate_inputs(sig_in, seed=seed, batch=batch)
    else:
        inputs = read_npz(Path(inputs_npz), max_bytes=max_bytes)
        try:
            child.check_signature(sig_in, [], inputs, None)
        except child.Failure as e:
            raise GoldenError(f"reference inputs do not fit the model: {e}") from e
    _check_size(inputs, max_bytes, "inputs")
    names = [name for name, _, _ in sig_out]
    golden = _run(session, names, inputs)
    for name, arr in golden.items():
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            raise GoldenError(f"output {name!r} is not finite (NaN or infinity) on the inputs")
    try:
        child.compare(_run(session, names, inputs), golden, rtol, atol)
    except child.Failure as e:
        raise GoldenError(f"model is not deterministic on the reference inputs: {e}") from e
    _check_size(golden, max_bytes, "golden outputs")
    _atomic.write_bytes(Path(out_dir) / SMOKE_INPUTS_FILE, npz_bytes(inputs))
    _atomic.write_bytes(Path(out_dir) / SMOKE_GOLDEN_FILE, npz_bytes(golden))
    return SmokeSpec(
        inputs=SMOKE_INPUTS_FILE,
        golden=SMOKE_GOLDEN_FILE,
        rtol=rtol,
        atol=atol,
        runs=runs,
        budgets=dict(budgets or {}),
    )


def generate_inputs(signature: Signature, *, seed: int = 0, batch: int = 1) -> dict[str, Any]:
    """Deterministic reference inputs for a (name, ort type, shape) signature.

    Raises:
        GoldenError: an input type numpy cannot represent.
    """
    rng = np.random.default_rng(seed)
    arrays: dict[str, NDArray[Any]] = {}
    for name, ort_type, shape in signature:
        dtype_name = child.ORT_DTYPES.get(ort_type)
        if dtype_name is None:
            raise GoldenError(f"input {name!r} has unsupported type {ort_type}")
        dims = tuple(
            d if isinstance(d, int) and d >= 0 else (batch if axis == 0 else 1)
            for axis, d in enumerate(shape)
        )
        dtype = np.dtype(dtype_name)
        if dtype.kind == "f":
            arr: NDArray[Any] = rng.standard_normal(dims).astype(dtype)
        elif dtype.kind in "iu":
            arr = rng.integers(0, 10, size=dims).astype(dtype)
        else:
            arr = rng.random(dims) < 0.5
        arrays[name] = arr
    return arrays


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
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
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
