"""The publisher side: TUF repository, content-addressed bundles, storage backends.

Importing this package imports nothing else: each name below is imported from its module on
first use (PEP 562). A fresh ``ota publish`` starts its chunking child process
(``ota.repository._chunkjob``) before python-tuf and the signers are imported, and that child
imports only the chunker (issue 13). Devices never import this package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ota._lazy import exports

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
    "BelowFloor": "_ops",
    "DuplicateVersion": "_publish",
    "FileStorage": "_storage",
    "GcResult": "_ops",
    "InitResult": "_project",
    "Project": "_project",
    "ProjectConfig": "_project",
    "init_project": "_project",
    "LowerVersion": "_publish",
    "NotFound": "_storage",
    "PreconditionFailed": "_storage",
    "PublishRequest": "_publish",
    "PublishResult": "_publish",
    "ReleaseRow": "_ops",
    "Storage": "_storage",
    "StorageError": "_storage",
    "UnknownRelease": "_index",
    "gc": "_ops",
    "model_index": "_ops",
    "open_storage": "_storage",
    "pause": "_ops",
    "promote": "_ops",
    "publish": "_publish",
    "releases": "_ops",
    "rollback": "_ops",
    "yank": "_ops",
}


__getattr__, __dir__ = exports(__name__, _LAZY, globals())


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
