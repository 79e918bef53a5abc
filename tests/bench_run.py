"""Run a benchmark's ``main`` with ``--json`` and return its document (for the bench smoke
tests: they check the shape of the output, never a timing)."""

from __future__ import annotations

import json

import pytest


def run_json(
    capsys: pytest.CaptureFixture[str], main: object, argv: list[str]
) -> dict[str, object]:
    assert callable(main)
    main(argv)
    doc = json.loads(capsys.readouterr().out)
    assert isinstance(doc, dict)
    return doc
