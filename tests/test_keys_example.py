"""The checked-in example keys are exactly what their script generates, and `ota init` uses them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ota.repository import Project, init_project

KEYS = Path(__file__).resolve().parent.parent / "keys-example"


def _generator() -> object:
    spec = importlib.util.spec_from_file_location("keys_example_generate", KEYS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_keys_have_not_drifted(tmp_path: Path) -> None:
    written = _generator().generate(tmp_path)  # type: ignore[attr-defined]
    assert len(written) == 7
    for path in written:
        rel = path.relative_to(tmp_path)
        assert (KEYS / rel).read_bytes() == path.read_bytes(), f"{rel} drifted: rerun generate.py"


def test_init_reuses_example_keys(tmp_path: Path) -> None:
    first = init_project(tmp_path / "a", str(tmp_path / "ra"), keys_dir=KEYS, bins=4)
    second = init_project(tmp_path / "b", str(tmp_path / "rb"), keys_dir=KEYS, bins=4)
    # Same keys, so the same key ids in both roots: reproducible docs and demos.
    root_a = Project.open(first.project).config.signers
    root_b = Project.open(second.project).config.signers
    assert set(root_a) == set(root_b)
    assert len(root_a) == 5
