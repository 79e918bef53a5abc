"""The publisher side: TUF repository, content-addressed bundles, storage backends.

Importing this package pulls in the publisher's dependencies lazily; devices never import it.
"""

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
