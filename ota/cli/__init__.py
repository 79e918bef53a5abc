"""The ``ota`` command line: thin click commands over the packages."""

from ota.cli._main import main

__all__ = ["main"]
