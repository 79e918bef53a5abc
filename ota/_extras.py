"""Which pip extra a command needs, and the clear error when it is not installed.

A device installs ``edge-ota[client]``; the publisher ``edge-ota[repository]``; ``ota serve``
in production and the fleet service ``edge-ota[server]``. Device commands (``ota device …``,
``ota verify``, ``ota audit --repo-url``) import only what the client extra brings. A command
that needs more exits 9 (configuration) naming the extra to install, never with a traceback.
"""

from __future__ import annotations

import importlib.util

from ota.errors import ConfigError

# Top-level modules that only a larger extra installs -> that extra.
_EXTRA_OF: dict[str, str] = {
    "fastcdc": "repository",
    "onnx": "repository",
    "boto3": "repository",
    "botocore": "repository",
    "cyclonedx": "repository",
    "packageurl": "repository",
    "jsonschema": "repository",
    "flask": "server",
    "werkzeug": "server",
    "sqlalchemy": "server",
    "gunicorn": "server",
    "prometheus_client": "server",
}
_NEEDS = {"repository": ("fastcdc", "onnx", "cyclonedx", "packageurl"), "server": ("flask",)}


class MissingExtra(ConfigError):
    """The command needs a pip extra that this installation lacks (exit 9)."""


def _missing_error(extra: str, what: str, module: str) -> MissingExtra:
    return MissingExtra(
        f"{what} needs edge-ota[{extra}] (module {module!r} is not installed: "
        "this looks like a device-only install, edge-ota[client])",
        remedy=f"pip install 'edge-ota[{extra}]'",
    )


def from_import_error(e: ModuleNotFoundError, what: str = "this command") -> MissingExtra | None:
    """The :class:`MissingExtra` for a failed import of a module of a larger extra, else None
    (a missing module that no extra provides is a bug and must surface as such)."""
    top = (e.name or "").split(".")[0]
    extra = _EXTRA_OF.get(top)
    return _missing_error(extra, what, top) if extra else None


def require(extra: str, what: str) -> None:
    """Check, before anything is written, that ``extra``'s modules can be imported.

    Raises:
        MissingExtra: one is missing.
    """
    for module in _NEEDS[extra]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise _missing_error(extra, what, module)
