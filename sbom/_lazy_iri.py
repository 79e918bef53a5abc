"""Defer the IRI grammar that jsonschema compiles when it is imported (issue 13).

jsonschema's format checker imports ``rfc3987_syntax`` (when installed) to check the ``iri``
and ``iri-reference`` formats, and that import compiles an Earley grammar with lark: 2.5-3.3 s
of a cold ``ota publish`` here, paid by every process that validates an SBOM, although the
ML-BOMs we build carry no field of those formats (measured: zero IRI checks per publish).

:func:`install`, called before jsonschema is first imported, puts a stand-in module under that
name whose ``is_valid_syntax`` imports the real module on its first call and delegates to it.
Validation is unchanged: a document that has an IRI field gets the real check (and pays the
grammar then); one that has none never compiles it.

Invariants: the stand-in is installed only while neither the real module nor jsonschema's
format module is loaded, and only when the real module is installed (otherwise jsonschema
skips IRI checks, as it would anyway); the real module is imported at most once, under a lock.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from typing import Any

__all__ = ["install"]

_NAME = "rfc3987_syntax"
_MARK = "__ota_lazy_stand_in__"
_lock = threading.Lock()


def install() -> None:
    """Install the stand-in if it can still take effect (see the module docstring)."""
    with _lock:
        if _NAME in sys.modules or "jsonschema._format" in sys.modules:
            return
        try:
            if importlib.util.find_spec(_NAME) is None:
                return
        except (ImportError, ValueError):  # an import hook that refuses it: not installed
            return
        stand_in = types.ModuleType(_NAME, "stand-in: imports rfc3987_syntax on first use")
        stand_in.is_valid_syntax = _is_valid_syntax  # type: ignore[attr-defined]
        setattr(stand_in, _MARK, True)
        sys.modules[_NAME] = stand_in


def _is_valid_syntax(term: str, value: str) -> Any:
    return _real().is_valid_syntax(term, value)


def _real() -> Any:
    with _lock:
        module = sys.modules.get(_NAME)
        if module is None or getattr(module, _MARK, False):
            sys.modules.pop(_NAME, None)
            module = importlib.import_module(_NAME)
        return module
