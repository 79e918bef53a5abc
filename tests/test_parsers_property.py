"""Property tests of every parser a device feeds with remote or on-disk data: for any input,
a parser returns a valid value or raises its one documented error class (so the caller maps it
to the right exit code and event), never anything else; and a parsed value round-trips.

Inputs are random bytes, random JSON, and valid documents with one part replaced by random JSON
(the mutations most likely to reach deep into a parser).
"""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ota.bundle import (
    MAX_SMOKE_SETS,
    SMOKE_CHECKS,
    Budget,
    Chunk,
    Compat,
    FileEntry,
    FormatError,
    Manifest,
    ModelIndex,
    Release,
    RolloutState,
    SignerEntry,
    SmokeSpec,
    TargetFacts,
    parse_signers,
    signers_document,
    validate_bundle_path,
)
from ota.client import _smoke_child as child
from ota.client._events import EventQueue
from ota.client._journal import JournalError, JournalState, _dump, parse

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HEX = "ab" * 32

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=5),
    max_leaves=20,
)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def _replace(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    copy = json.loads(json.dumps(doc))
    node = copy
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return copy


def mutations(valid: Any) -> st.SearchStrategy[Any]:
    """``valid`` with one node (any depth, the root included) replaced by random JSON."""
    paths = _paths(valid)
    return st.tuples(st.sampled_from(paths), json_values).map(lambda pv: _replace(valid, *pv))


deep = st.integers(1, 200_000).map(lambda n: b"[" * n + b"]" * n) | st.integers(1, 50_000).map(
    lambda n: b'{"a":' * n + b"1" + b"}" * n)
raw = st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()) | deep


def documents(valid: Any) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=200),
        json_values.map(lambda v: json.dumps(v).encode()),
        mutations(valid).map(lambda v: json.dumps(v).encode()),
        deep,
    )


_MANIFEST = Manifest(
    name="det", version="1.0.0",
    files=(FileEntry("model/model.onnx", HEX, 3, (Chunk(HEX, 3),)),
           FileEntry("release.json", "cd" * 32, 2, (Chunk("cd" * 32, 2),))),
)


@SETTINGS
@given(documents(json.loads(_MANIFEST.to_bytes())))
def test_manifest_parser_only_raises_format_error(data: bytes) -> None:
    try:
        m = Manifest.from_bytes(data)
    except FormatError:
        return
    assert Manifest.from_bytes(m.to_bytes()) == m


_RELEASE = Release(
    name="det", version="1.0.0", counter=1,
    compat=Compat(arch=("x86_64",), tiers=("cam-v1",), runtime=">=1.16",
                  providers=("CPUExecutionProvider",)),
    smoke=SmokeSpec(budgets={"*": Budget(5.0, 100.0)}),
)


@SETTINGS
@given(documents(json.loads(_RELEASE.to_bytes())))
def test_release_parser_only_raises_format_error(data: bytes) -> None:
    try:
        rel = Release.from_bytes(data)
    except FormatError:
        return
    assert Release.from_bytes(rel.to_bytes()) == rel


_RELEASE_SETS = Release(
    name="det", version="1.0.0", counter=1,
    smoke=SmokeSpec(check="shapes", extra_sets=(("smoke/inputs-2.npz", "smoke/golden-2.npz"),
                                                ("smoke/inputs-3.npz", "smoke/golden-3.npz"))),
)


@SETTINGS
@given(documents(json.loads(_RELEASE_SETS.to_bytes())))
def test_smoke_check_and_extra_sets_parse_only_raises_format_error(data: bytes) -> None:
    """The issue-12 smoke keys (``check``, ``extra_sets``) reached deep by mutations: a parsed
    spec names only safe, distinct bundle paths, at most MAX_SMOKE_SETS sets, a known check."""
    try:
        rel = Release.from_bytes(data)
    except FormatError:
        return
    assert Release.from_bytes(rel.to_bytes()) == rel
    if rel.smoke is not None:
        files = rel.smoke.files()
        assert len(set(files)) == len(files) and len(rel.smoke.sets()) <= MAX_SMOKE_SETS
        assert all(validate_bundle_path(f) == f for f in files)
        assert rel.smoke.check in SMOKE_CHECKS


_INDEX = ModelIndex(name="det", releases=(RolloutState("1.0.0", 1, "canary", 10.0),))
_SIGNER = SignerEntry(HEX, "-----BEGIN PUBLIC KEY-----\n...\n", ("cam-*", "det"))
_SIGNERS = json.loads(signers_document([_SIGNER]))


def test_the_valid_fixtures_parse_so_the_properties_are_not_vacuous() -> None:
    assert Manifest.from_bytes(_MANIFEST.to_bytes()) == _MANIFEST
    assert Release.from_bytes(_RELEASE.to_bytes()) == _RELEASE
    assert Release.from_bytes(_RELEASE_SETS.to_bytes()) == _RELEASE_SETS
    assert ModelIndex.from_custom(_INDEX.to_custom()) == _INDEX
    assert parse_signers(signers_document([_SIGNER])) == [_SIGNER]


@SETTINGS
@given(mutations(_INDEX.to_custom()))
def test_index_parser_only_raises_format_error(custom: Any) -> None:
    if not isinstance(custom, dict):
        custom = {"edge-ota": custom}
    try:
        idx = ModelIndex.from_custom(custom)
    except FormatError:
        return
    assert ModelIndex.from_custom(idx.to_custom()) == idx


@SETTINGS
@given(json_values)
def test_target_facts_parser_only_raises_format_error(custom: Any) -> None:
    try:
        TargetFacts.from_custom(custom if isinstance(custom, dict) else {"edge-ota": custom})
    except FormatError:
        return


@SETTINGS
@given(documents(_SIGNERS))
def test_signers_parser_only_raises_format_error(data: bytes) -> None:
    try:
        parse_signers(data)
    except FormatError:
        return


@SETTINGS
@given(raw | mutations(json.loads(_dump(JournalState()))).map(lambda v: json.dumps(v).encode()))
def test_journal_parser_only_raises_journal_error(data: bytes) -> None:
    try:
        parse(data)
    except JournalError:
        return


@SETTINGS
@given(raw)
def test_a_corrupt_event_queue_starts_over_and_says_so(data: bytes) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.json"
        path.write_bytes(data)
        q = EventQueue(path)
        pending = q.pending()
        q.append("checked")
        assert [e.kind for e in q.pending()][-1] == "checked"
        assert len(q.pending()) == len(pending) + 1 or q.dropped >= 1


def _npy_heads() -> list[bytes]:
    """Real .npy headers (so the loader's header checks are reached), then mutated ones."""
    import io

    import numpy as np

    heads = []
    for arr in (np.zeros(4, np.float32), np.zeros((2, 3), np.int64), np.array(["ab"])):
        buf = io.BytesIO()
        np.save(buf, arr)
        heads.append(buf.getvalue())
    heads.append(heads[0].replace(b"(4,)", b"(99999999999,)"))
    heads.append(heads[0].replace(b"'<f4'", b"'|O'"))
    return heads


_NPY_HEADS = _npy_heads()


@SETTINGS
@given(st.lists(st.tuples(
    st.sampled_from(["x.npy", "y.npy", "x", ".npy", "../x.npy"])
    | st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=20),
    st.binary(max_size=200) | st.sampled_from(_NPY_HEADS).map(lambda h: h + b"\0" * 64),
), max_size=4))
def test_npz_loader_only_raises_bad_files(members: list[tuple[str, bytes]]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.npz"
        with zipfile.ZipFile(path, "w") as z, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # duplicate names are part of the attack
            for name, data in members:
                z.writestr(name, data)
        reason = child.OK
        try:
            child.load_npz(str(path), max_bytes=1 << 20)
        except child.Failure as e:
            reason = e.reason
        assert reason in (child.OK, child.BAD_FILES)
