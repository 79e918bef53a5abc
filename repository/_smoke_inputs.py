"""Generated reference inputs that a model accepts (publisher side).

A model's input signature rarely says everything: symbolic dimensions (``batch``,
``sequence``, ``height``) and integer inputs that select a mode (silero-vad's sample rate
``sr``) must take values the graph accepts, or the model fails or computes nothing useful.
:func:`candidates` turns the signature, and what the graph tells, into a bounded, deterministic
list of candidate input sets, best guess first; the caller runs the model on each until one
passes (it runs, its outputs are finite and not degenerate, see :func:`degenerate_outputs`).

What the graph tells (hints):

* a symbolic dimension has one value everywhere it appears (``state[2, batch, 128]`` and
  ``input[batch, sequence]`` share ``batch``);
* axis 0, the symbols found there, and the only free axis of an input whose other axes are
  fixed (a recurrent state such as ``[2, ?, 128]``) are batch-like: they take ``batch``;
* every other free dimension takes one size of :data:`SIZE_LADDER` per candidate (image sides
  and sequence lengths that common models accept: multiples of 32 first, then small sizes);
* an integer input of at most :data:`_MAX_HINT_ELEMENTS` elements that the graph compares with
  a constant (``Equal(sr, 16000)``, possibly through Cast/Reshape/Squeeze/Unsqueeze, also in
  If/Loop bodies) is first given that constant; other integers are uniform in ``[0, 10)``
  (valid indices for any embedding), bools fair coins, floats standard normal.

Invariants: the candidates are deterministic for a given model, seed and batch; there are at
most :data:`MAX_CANDIDATES`, no two alike; one over ``max_bytes`` of inputs carries only
its ``error``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    import onnx

__all__ = ["SIZE_LADDER", "Candidate", "candidates", "degenerate_outputs", "int_hints"]

SIZE_LADDER = (224, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1)
MAX_CANDIDATES = 32
_MAX_HINT_ELEMENTS = 16
_MAX_HINTS = 4
_PASS_THROUGH = frozenset({"Cast", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten"})
_COMPARE = frozenset({"Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual"})

Signature = Sequence[tuple[str, str, Sequence[Any]]]
_Var = tuple[str, ...]  # ("sym", name) or ("anon", input, axis)


@dataclass(frozen=True)
class Candidate:
    """One set of generated inputs and how it was chosen (for messages). ``error`` says why a
    candidate was not generated (its inputs would exceed ``max_bytes``); ``inputs`` is empty
    then."""

    inputs: dict[str, NDArray[Any]]
    description: str
    error: str = ""


def candidates(
    signature: Signature,
    dtypes: Mapping[str, str],
    *,
    hints: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    batch: int = 1,
    max_bytes: int,
) -> Iterator[Candidate]:
    """Yield candidate input sets for a ``(name, ort type, shape)`` signature, best first.

    ``dtypes`` maps each input name to its numpy dtype name; ``hints`` maps integer inputs to
    the constants the graph compares them with (:func:`int_hints`).
    """
    hints = hints or {}
    shapes = [(name, list(shape)) for name, _, shape in signature]
    variables, batch_like, first_axis = _variables(shapes)
    int_choices = [True, False] if any(hints.get(n) for n, _ in shapes) else [False]
    seen: set[tuple[Any, ...]] = set()
    count = 0
    for use_batch_hint in (True, False):
        for size in SIZE_LADDER:
            for use_int_hints in int_choices:
                batchy = batch_like if use_batch_hint else first_axis
                values = {v: (batch if v in batchy else size) for v in variables}
                dims = {n: tuple(_dim_value(n, a, d, values) for a, d in enumerate(s))
                        for n, s in shapes}  # fmt: skip
                key = (tuple(sorted(dims.items())), use_int_hints)
                if key in seen:
                    continue
                seen.add(key)
                nbytes = sum(math.prod(d) * np.dtype(dtypes[n]).itemsize for n, d in dims.items())
                shown = ", ".join(f"{n}{list(d)}" for n, d in dims.items())
                if use_int_hints:
                    shown += " with " + ", ".join(
                        f"{n}={hints[n][0]}" for n in dims if hints.get(n)
                    )
                if nbytes > max_bytes:
                    yield Candidate({}, shown, f"inputs are {nbytes} bytes, over the "
                                    f"{max_bytes} limit")  # fmt: skip
                else:
                    arrays = _arrays(dims, dtypes, hints if use_int_hints else {}, seed)
                    yield Candidate(arrays, shown)
                count += 1
                if count >= MAX_CANDIDATES:
                    return


def _variables(shapes: list[tuple[str, list[Any]]]) -> tuple[set[_Var], set[_Var], set[_Var]]:
    """All free dimensions as variables, the batch-like ones, and those on axis 0."""
    variables: set[_Var] = set()
    batch_like: set[_Var] = set()
    first_axis: set[_Var] = set()
    for name, shape in shapes:
        free = [(a, _var(name, a, d)) for a, d in enumerate(shape) if not _fixed(d)]
        for axis, var in free:
            variables.add(var)
            if axis == 0:
                first_axis.add(var)
        if len(shape) >= 2 and len(free) == 1:
            batch_like.add(free[0][1])  # a state-like input: one free axis, the batch
    batch_like |= first_axis
    return variables, batch_like, first_axis


def _fixed(d: object) -> bool:
    return isinstance(d, int) and not isinstance(d, bool) and d >= 0


def _var(name: str, axis: int, d: object) -> _Var:
    return ("sym", d) if isinstance(d, str) and d else ("anon", name, str(axis))


def _dim_value(name: str, axis: int, d: object, values: Mapping[_Var, int]) -> int:
    return int(d) if _fixed(d) else values[_var(name, axis, d)]  # type: ignore[call-overload]


def _arrays(
    dims: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, str],
    hints: Mapping[str, Sequence[int]],
    seed: int,
) -> dict[str, NDArray[Any]]:
    rng = np.random.default_rng(seed)
    arrays: dict[str, NDArray[Any]] = {}
    for name, shape in dims.items():
        dtype = np.dtype(dtypes[name])
        if dtype.kind in "iu" and hints.get(name):
            arr: NDArray[Any] = np.full(shape, hints[name][0], dtype=dtype)
        elif dtype.kind == "f":
            arr = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            arr = rng.integers(0, 10, size=shape).astype(dtype)
        else:
            arr = rng.random(shape) < 0.5
        arrays[name] = arr
    return arrays


def int_hints(
    model_path: Path, signature: Signature, dtypes: Mapping[str, str]
) -> dict[str, list[int]]:
    """Constants the graph compares each small integer input with (see the module docstring).

    Only parses the model when it has such an input; a model onnx cannot parse gives no hints
    (onnxruntime loaded it, so the golden run decides).
    """
    wanted = {
        name
        for name, _, shape in signature
        if np.dtype(dtypes[name]).kind in "iu"
        and all(_fixed(d) for d in shape)
        and math.prod(int(d) for d in shape) <= _MAX_HINT_ELEMENTS
    }
    if not wanted:
        return {}
    import onnx

    try:
        model = onnx.load_model(str(model_path), load_external_data=False)
    except Exception:  # protobuf errors share no useful base class; hints are optional
        return {}
    nodes, consts = _nodes_and_constants(model)
    found: dict[str, list[int]] = {}
    for name in sorted(wanted):
        values = _compared_with(_aliases(name, nodes), nodes, consts)
        if values:
            found[name] = values[:_MAX_HINTS]
    return found


def _nodes_and_constants(
    model: onnx.ModelProto,
) -> tuple[list[onnx.NodeProto], dict[str, NDArray[Any]]]:
    """Every node (subgraphs included) and every small constant (initializer or Constant)."""
    import onnx
    from onnx import numpy_helper

    consts: dict[str, NDArray[Any]] = {}
    nodes: list[onnx.NodeProto] = []
    stack = [model.graph]
    while stack:
        graph = stack.pop()
        consts.update((t.name, numpy_helper.to_array(t)) for t in graph.initializer
                      if _small(t.dims))  # fmt: skip
        for node in graph.node:
            nodes.append(node)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(attr.graphs)
                elif node.op_type == "Constant" and attr.name == "value" and _small(attr.t.dims):
                    consts[node.output[0]] = numpy_helper.to_array(attr.t)
    return nodes, consts


def _aliases(name: str, nodes: Sequence[onnx.NodeProto]) -> set[str]:
    """Names that carry the value of ``name``: through casts, reshapes and identities."""
    aliases = {name}
    changed = True
    while changed:
        changed = False
        for node in nodes:
            if node.op_type in _PASS_THROUGH and node.input and node.input[0] in aliases:
                new = set(node.output) - aliases
                if new:
                    aliases |= new
                    changed = True
    return aliases


def _compared_with(
    aliases: set[str], nodes: Sequence[onnx.NodeProto], consts: Mapping[str, NDArray[Any]]
) -> list[int]:
    """Integral constants that a comparison node compares one of ``aliases`` with."""
    values: list[int] = []
    for node in nodes:
        if node.op_type not in _COMPARE or len(node.input) != 2:
            continue
        a, b = node.input
        other = b if a in aliases else a if b in aliases else None
        if other is None or other not in consts:
            continue
        for v in consts[other].reshape(-1).tolist():
            if isinstance(v, int | float) and float(v).is_integer() and int(v) not in values:
                values.append(int(v))
    return values


def _small(dims: Sequence[int]) -> bool:
    return math.prod(dims) <= _MAX_HINT_ELEMENTS


def degenerate_outputs(outputs: Mapping[str, NDArray[Any]], rtol: float, atol: float) -> list[str]:
    """Why each degenerate output is degenerate (empty list: none is).

    An output is degenerate when it is empty, or when it has two or more elements and the
    golden comparison (``|x - c| <= atol + rtol * |c|``) cannot tell it from the constant
    ``c`` of its first element: an all-zero detector map passes on a device whose model
    outputs nothing. One-element outputs are not judged (a score of a batch of one).
    """
    found: list[str] = []
    for name, arr in outputs.items():
        if arr.size == 0:
            found.append(f"{name!r} is empty")
            continue
        if arr.size < 2:
            continue
        first = arr.reshape(-1)[0]
        if arr.dtype.kind in "fc":
            if not np.all(np.isfinite(arr)):
                continue  # reported as non-finite elsewhere
            c = float(np.abs(first))
            if float(np.max(np.abs(arr - first))) <= atol + rtol * c:
                what = "all zero" if c <= atol and not np.any(arr) else "constant"
                if what == "constant" and float(np.max(np.abs(arr))) <= atol:
                    what = "zero within atol"
                found.append(f"{name!r} is {what}")
        elif np.all(arr == first):
            found.append(f"{name!r} is constant")
    return found
