"""A published repository (two states) and a device, shared by the updater tests.

The module-scoped :func:`base` publishes ``det 1.0.0`` (state ``v1``) then ``det 1.1.0``
(state ``v2``), both at ring canary, 100 %. Each test gets a private copy (project + repository)
through :class:`World`, served over real HTTP by :mod:`tests.http_faults`, so tests may tamper
with or publish into their copy without affecting others.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ota.client import current_model, init_device, update_once
from ota.client._fetch import FetchConfig
from ota.repository import Project
from tests.http_faults import FaultServer

FAST = FetchConfig(connect_timeout=2.0, read_timeout=2.0, retries=2, backoff=0.01,
                   backoff_max=0.05)


@dataclass
class Base:
    root: Path  # holds proj/, repo_v1/, repo_v2/

    @property
    def trusted_root(self) -> bytes:
        return (self.root / "repo_v1" / "metadata" / "1.root.json").read_bytes()


@dataclass
class World:
    tmp: Path
    base: Base
    fs: FaultServer

    @property
    def repo(self) -> Path:
        return self.tmp / "repo"

    @property
    def device(self) -> Path:
        return self.tmp / "dev"

    def use(self, state: str) -> None:
        """Serve a fresh copy of repository state ``v1`` or ``v2``."""
        shutil.rmtree(self.repo, ignore_errors=True)
        shutil.copytree(self.base.root / f"repo_{state}", self.repo)
        self.fs.root = self.repo

    def project(self) -> Project:
        proj = self.tmp / "proj"
        if not proj.exists():
            shutil.copytree(self.base.root / "proj", proj)
        return Project.open(proj, storage_override=str(self.repo))

    def init(self, **kw: Any) -> None:
        opts: dict[str, Any] = {"ring": "canary", "health_timeout_s": 0}
        opts.update(kw)
        init_device(self.device, self.fs.url, self.base.trusted_root, "dev-1", ["det"], **opts)

    def update(self, **kw: Any) -> Any:
        kw.setdefault("fetch_config", FAST)
        return update_once(self.device, **kw)

    def committed_at(self, state: str) -> None:
        """Init the device and commit the newest release of ``state``."""
        self.use(state)
        self.init()
        res = self.update()
        assert res.status == "updated", res.to_dict()

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        doc = json.loads((self.device / "events.json").read_bytes())
        return [e for e in doc["events"] if kind is None or e["kind"] == kind]


def current_version(device: Path) -> str | None:
    """Version of the committed model, after checking that every file matches its manifest."""
    try:
        model = current_model(device, "det")
    except Exception:
        return None
    slot = model.parent.parent
    manifest = json.loads(slot.with_name(f"{slot.name}.manifest.json").read_bytes())
    for f in manifest["files"]:
        data = (slot / f["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == f["sha256"], f["path"]
    release = json.loads((slot / "release.json").read_bytes())
    return str(release["version"])
