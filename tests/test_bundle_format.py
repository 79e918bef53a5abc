"""The shared bundle format's validators: names, versions, paths and digests are matched whole.

Python's ``$`` also matches before a final newline, so ``re.match(r"^x$", "x\\n")`` succeeds;
every validator anchors with ``\\Z`` instead. These tests attack each with a trailing newline
and other near misses.
"""

from __future__ import annotations

import pytest

from ota.bundle import (
    Chunk,
    FileEntry,
    FormatError,
    Manifest,
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
