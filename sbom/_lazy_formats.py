"""Defer the format libraries that jsonschema imports but the SBOM check rarely calls (issue 13).

When it is first imported, jsonschema's format module imports one library per format it can
check, if installed. The CycloneDX 1.6 schemas the SBOM is validated against (``bom``, ``spdx``,
``jsf``, ``cryptography-defs``) name four formats only: ``date-time``, ``iri-reference``,
``idn-email`` and ``uri``. Importing these libraries costs about 40 ms of CPU in every fresh
``ota publish``, and an ML-BOM as ``ota publish`` builds it has no value of their formats:

* ``arrow`` (with ``dateutil``), which ``isoduration`` imports for ``duration`` (not a draft-7
  format: the CycloneDX validator is draft 7);
* ``webcolors``, for draft 3's ``color``;
* ``uri_template``, for ``uri-template``;
* ``rfc3986_validator`` (``uri``, ``uri-reference``) and ``rfc3339_validator`` (``date-time``,
  ``time``): formats CycloneDX names, checked whenever an SBOM has such a value.

jsonschema and isoduration only ``import`` the first three at module level, and take one
function of each of the last two (``from rfc3986_validator import validate_rfc3986``); they read
everything else when a value of such a format is checked. :func:`deferred_format_libraries`
wraps the first import of jsonschema: meanwhile, each of those libraries that is installed and
not yet imported is a stand-in module in ``sys.modules``, which the modules imported then keep a
reference to; the functions taken at import are stand-ins too, which call the real function.
On the first attribute read or call, a stand-in imports the real library and delegates to it:
the same functions, classes and exceptions, so every format check runs exactly as if the
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

The IRI grammar (``rfc3987_syntax``) is deferred apart, by :mod:`ota.sbom._lazy_iri`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["DEFERRED", "deferred_format_libraries"]

# Library -> the functions jsonschema takes from it at import (stand-ins that call the real
# ones); everything else is read only when a value of its format is checked.
DEFERRED: dict[str, tuple[str, ...]] = {
    "arrow": (),
    "webcolors": (),
    "uri_template": (),
    "rfc3986_validator": ("validate_rfc3986",),
    "rfc3339_validator": ("validate_rfc3339",),
}

_lock = threading.RLock()  # re-entrant: a real import may read another stand-in's attribute
_real_modules: dict[str, types.ModuleType] = {}


class _StandIn(types.ModuleType):
    """A module that imports the real one on the first read of an attribute it lacks."""

    def __getattr__(self, attr: str) -> Any:
        if attr == "__path__":  # a package's stand-in has it (from the spec): a plain module
            raise AttributeError(attr)  # has none, and `from m import f` asks for it
        return getattr(_real(self.__name__), attr)


def _delegate(name: str, attr: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(_real(name), attr)(*args, **kwargs)

    call.__name__ = call.__qualname__ = attr
    call.__doc__ = f"{name}.{attr}, imported on the first call"
    return call


def _real(name: str) -> types.ModuleType:
    module = _real_modules.get(name)
    if module is not None:  # the common case, once loaded: no lock
        return module
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
            for name, attrs in DEFERRED.items():
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
                for attr in attrs:
                    setattr(stand_in, attr, _delegate(name, attr))
                sys.modules[name] = stand_in
                installed.append(name)
    try:
        yield list(installed)
    finally:
        with _lock:
            for name in installed:
                if isinstance(sys.modules.get(name), _StandIn):
                    del sys.modules[name]
