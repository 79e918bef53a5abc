"""The publisher side: TUF repository, content-addressed bundles, storage backends.

Importing this package imports nothing else: each name below is imported from its module on
first use (PEP 562). A fresh ``ota publish`` starts its chunking child process
(``ota.repository._chunkjob``) before python-tuf and the signers are imported, and that child
imports only the chunker (issue 13). Devices never import this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ota.repository._index import UnknownRelease
    from ota.repository._ops import (
        BelowFloor,
        GcResult,
        ReleaseRow,
        gc,
        model_index,
        pause,
        promote,
        releases,
        rollback,
        yank,
    )
    from ota.repository._project import InitResult, Project, ProjectConfig, init_project
    from ota.repository._publish import (
        DuplicateVersion,
        LowerVersion,
        PublishRequest,
        PublishResult,
        publish,
    )
    from ota.repository._storage import (
        FileStorage,
        NotFound,
        PreconditionFailed,
        Storage,
        StorageError,
        open_storage,
    )

# public name -> the module that defines it
_LAZY: dict[str, str] = {
    "BelowFloor": "ota.repository._ops",
    "DuplicateVersion": "ota.repository._publish",
    "FileStorage": "ota.repository._storage",
    "GcResult": "ota.repository._ops",
    "InitResult": "ota.repository._project",
    "Project": "ota.repository._project",
    "ProjectConfig": "ota.repository._project",
    "init_project": "ota.repository._project",
    "LowerVersion": "ota.repository._publish",
    "NotFound": "ota.repository._storage",
    "PreconditionFailed": "ota.repository._storage",
    "PublishRequest": "ota.repository._publish",
    "PublishResult": "ota.repository._publish",
    "ReleaseRow": "ota.repository._ops",
    "Storage": "ota.repository._storage",
    "StorageError": "ota.repository._storage",
    "UnknownRelease": "ota.repository._index",
    "gc": "ota.repository._ops",
    "model_index": "ota.repository._ops",
    "open_storage": "ota.repository._storage",
    "pause": "ota.repository._ops",
    "promote": "ota.repository._ops",
    "publish": "ota.repository._publish",
    "releases": "ota.repository._ops",
    "rollback": "ota.repository._ops",
    "yank": "ota.repository._ops",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BelowFloor",
    "DuplicateVersion",
    "FileStorage",
    "GcResult",
    "InitResult",
    "LowerVersion",
    "NotFound",
    "PreconditionFailed",
    "Project",
    "ProjectConfig",
    "PublishRequest",
    "PublishResult",
    "ReleaseRow",
    "Storage",
    "StorageError",
    "UnknownRelease",
    "gc",
    "init_project",
    "model_index",
    "open_storage",
    "pause",
    "promote",
    "publish",
    "releases",
    "rollback",
    "yank",
]
