"""The shared bundle format's validators: names, versions, paths and digests are matched whole.

Python's ``$`` also matches before a final newline, so ``re.match(r"^x$", "x\\n")`` succeeds;
every validator anchors with ``\\Z`` instead. These tests attack each with a trailing newline
and other near misses.
"""

from __future__ import annotations

import json

import pytest

from ota.bundle import (
    Chunk,
    FileEntry,
    FormatError,
    Manifest,
    ModelIndex,
    RolloutState,
    TargetFacts,
    validate_bundle_path,
    validate_name,
    validate_version,
)
from ota.errors import OtaError

HEX = "ab" * 32


@pytest.mark.parametrize("name", ["det", "a.b_c-1"])
def test_good_names_and_versions_pass(name: str) -> None:
    assert validate_name(name) == name
    assert validate_version("1.2.3-rc.1+build.5") == "1.2.3-rc.1+build.5"
    assert validate_bundle_path("model/model.onnx") == "model/model.onnx"


@pytest.mark.parametrize("bad", ["det\n", "det\r\n", "\ndet", "Det", "det/x", ""])
def test_names_with_a_trailing_newline_or_other_junk_are_refused(bad: str) -> None:
    with pytest.raises(OtaError):
        validate_name(bad)


@pytest.mark.parametrize("bad", ["1.0.0\n", "1.0.0-rc\n", "1.0.0+b\n", "01.0.0", "1.0"])
def test_versions_with_a_trailing_newline_are_refused(bad: str) -> None:
    with pytest.raises(OtaError):
        validate_version(bad)


@pytest.mark.parametrize("bad", ["model.onnx\n", "model/model.onnx\n", "a\n/b", "../x", "/abs"])
def test_bundle_paths_with_a_newline_are_refused(bad: str) -> None:
    with pytest.raises(OtaError):
        validate_bundle_path(bad)


def _manifest() -> bytes:
    files = tuple(
        FileEntry(path, digest, 1, (Chunk(digest, 1),))
        for path, digest in (("model.onnx", HEX), ("release.json", "cd" * 32))
    )
    return Manifest(name="det", version="1.0.0", files=files).to_bytes()


def test_manifest_refuses_digests_and_paths_with_a_trailing_newline() -> None:
    good = _manifest()
    Manifest.from_bytes(good)  # the well-formed one parses
    for old, new in ((f'"{HEX}"', f'"{HEX}\\n"'), ('"model.onnx"', '"model.onnx\\n"')):
        assert good.count(old.encode()) >= 1
        with pytest.raises(FormatError):
            Manifest.from_bytes(good.replace(old.encode(), new.encode()))


@pytest.mark.parametrize("custom", [None, "not an object", [1, 2], 7])
def test_target_custom_data_that_is_not_an_object_is_a_format_error(custom: object) -> None:
    """python-tuf hands over whatever a target's ``custom`` holds (review finding: a string
    crashed the updater with AttributeError instead of a security refusal)."""
    with pytest.raises(FormatError):
        TargetFacts.from_custom(custom)  # type: ignore[arg-type]
    with pytest.raises(FormatError):
        ModelIndex.from_custom(custom)  # type: ignore[arg-type]


def test_error_messages_do_not_echo_huge_remote_values() -> None:
    """Messages end up in events and reports: a remote value is quoted, never in full."""
    huge = "x" * 4_000_000
    doc = {"version": "1.0.0", "counter": 1, "ring": huge, "percent": "1", "paused": False,
           "yanked": False}
    with pytest.raises(FormatError) as info:
        RolloutState.from_dict(doc)
    assert len(str(info.value)) < 400
    manifest = json.loads(_manifest())
    manifest.update({f"k{i}": i for i in range(300_000)})
    with pytest.raises(FormatError) as info:
        Manifest.from_bytes(json.dumps(manifest).encode())
    assert len(str(info.value)) < 400


def test_a_manifest_made_of_json_structure_is_refused_before_parsing() -> None:
    """8 MiB of ``[],`` (within the size limit) cost ~200 MiB to parse (review finding)."""
    import resource

    data = b"[" + b"[]," * (2_796_000) + b"[]]"
    assert len(data) <= 8 * 1024 * 1024
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(FormatError, match="more JSON structure"):
        Manifest.from_bytes(data)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024  # KiB
    Manifest.from_bytes(_manifest())  # a real one still parses
