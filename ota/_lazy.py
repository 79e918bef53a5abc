"""Packages whose public names are imported from their modules on first use (PEP 562).

``ota.client``, ``ota.repository``, ``ota.sbom`` and ``ota.signing`` each list their public
names and the submodule that defines each; importing the package imports none of them, so a
process pays only for what it uses (issue 13: a fresh ``ota publish``). Type checkers see the
real imports under ``TYPE_CHECKING`` in each package.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def exports(
    package: str, table: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of ``package``, whose ``table`` maps each
    public name to the submodule (relative, e.g. ``"_install"``) that defines it. A name
    once imported is stored in ``namespace`` (the package's ``globals()``), so later
    look-ups skip ``__getattr__``."""

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted([*namespace, *table])

    return __getattr__, __dir__
