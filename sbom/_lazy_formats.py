"""Defer the format libraries that jsonschema imports but the SBOM check never calls (issue 13).

When it is first imported, jsonschema's format module imports one library per format it can
check, if installed. The CycloneDX 1.6 schemas the SBOM is validated against (``bom``, ``spdx``,
``jsf``, ``cryptography-defs``) name four formats only: ``date-time``, ``iri-reference``,
``idn-email`` and ``uri``. Three of those libraries serve none of them and cost about 30 ms of
CPU in every fresh ``ota publish``:

* ``arrow`` (with ``dateutil``), which ``isoduration`` imports for ``duration`` (not a draft-7
  format: the CycloneDX validator is draft 7);
* ``webcolors``, for draft 3's ``color``;
* ``uri_template``, for ``uri-template``.

Both jsonschema and isoduration only ``import`` them at module level and read their attributes
when a value of such a format is checked. :func:`deferred_format_libraries` wraps the first
import of jsonschema: meanwhile, each of those libraries that is installed and not yet imported
is a stand-in module in ``sys.modules``, which the modules imported then keep a reference to.
On the first attribute read, a stand-in imports the real library and delegates every attribute
to it: the same functions, classes and exceptions, so every format check runs exactly as if the
library had been imported eagerly (the same checkers are registered, the same values pass and
fail, with the same errors). Nothing is weakened: jsonschema registers a checker for a format
because the import succeeded, whichever module object it got.

Invariants:

* stand-ins are in ``sys.modules`` only inside the ``with`` block, and only for libraries that
  are installed (``find_spec``) and not yet imported, and only while jsonschema's format module
  is not yet loaded; on exit every stand-in still there is removed, so any later ``import
  arrow`` anywhere gets the real module (a stand-in whose real library was loaded meanwhile
  has already been replaced by it);
* a stand-in carries the real spec and package path, so a submodule imported through it during
  the block is the real submodule, loaded once;
* each real library is imported at most once, under a lock, never by the block itself.

The IRI grammar (``rfc3987_syntax``) is deferred apart, by :mod:`ota.sbom._lazy_iri`: jsonschema
reads its function at import, so that stand-in must stay until first use.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import threading
import types
from collections.abc import Iterator
from typing import Any

__all__ = ["DEFERRED", "deferred_format_libraries"]

# Libraries of formats no CycloneDX schema names, read only when such a value is checked.
DEFERRED = ("arrow", "webcolors", "uri_template")

_lock = threading.RLock()  # re-entrant: a real import may read another stand-in's attribute
_real_modules: dict[str, types.ModuleType] = {}


class _StandIn(types.ModuleType):
    """A module that imports the real one on the first read of an attribute it lacks."""

    def __getattr__(self, attr: str) -> Any:
        return getattr(_real(self.__name__), attr)


def _real(name: str) -> types.ModuleType:
    with _lock:
        module = _real_modules.get(name)
        if module is None:
            if isinstance(sys.modules.get(name), _StandIn):
                del sys.modules[name]  # import the real one, not this stand-in again
            module = importlib.import_module(name)
            _real_modules[name] = module
        return module


@contextlib.contextmanager
def deferred_format_libraries() -> Iterator[list[str]]:
    """Within the block, stand-ins replace the :data:`DEFERRED` libraries (see the module
    docstring); yields the names replaced (empty once jsonschema's format module is loaded)."""
    installed: list[str] = []
    with _lock:
        if "jsonschema._format" not in sys.modules:
            for name in DEFERRED:
                if name in sys.modules:
                    continue
                try:
                    spec = importlib.util.find_spec(name)
                except (ImportError, ValueError):  # an import hook that refuses it
                    spec = None
                if spec is None:
                    continue  # not installed: jsonschema skips the format, as it would anyway
                stand_in = _StandIn(name, f"stand-in: imports {name} on first use")
                stand_in.__spec__ = spec
                if spec.submodule_search_locations is not None:
                    stand_in.__path__ = list(spec.submodule_search_locations)
                sys.modules[name] = stand_in
                installed.append(name)
    try:
        yield list(installed)
    finally:
        with _lock:
            for name in installed:
                if isinstance(sys.modules.get(name), _StandIn):
                    del sys.modules[name]
