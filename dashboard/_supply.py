"""The repository side of the dashboard: a release's audit (the same code as ``ota audit``),
its SBOM and the diff against the previous release (``ota sbom diff``), and the hash-chained
audit log with its verification (``ota log verify``).

Invariant: a failed check is shown as failed, never hidden: any error reading the repository
is reported on the page with its message (fail closed: nothing is shown as verified that was
not verified just now).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from ota.errors import OtaError
from ota.repository import Project

from ._security import project_dir


@functools.lru_cache(maxsize=1)
def _open(path: str) -> Project:
    return Project.open(Path(path))


def project() -> tuple[Project | None, str]:
    """The project (``$OTA_PROJECT``), or ``None`` and why not."""
    try:
        return _open(str(project_dir().resolve())), ""
    except (OtaError, OSError) as e:
        return None, f"no repository project at {project_dir()}: {e} (set OTA_PROJECT)"


def releases(p: Project, model: str) -> list[dict[str, Any]]:
    from ota.repository._ops import model_index

    index = model_index(p, model)
    if index is None:
        return []
    return [
        {
            "version": r.version,
            "counter": r.counter,
            "ring": r.ring,
            "percent": r.percent,
            "paused": r.paused,
            "yanked": r.yanked,
        }
        for r in sorted(index.releases, key=lambda r: -r.counter)
    ]


def release(p: Project, model: str, version: str) -> dict[str, Any]:
    """Everything the Release page shows from the repository; errors become messages."""
    from ota.repository._audit import audit, read_release_file
    from ota.repository._tufview import StorageSource
    from ota.sbom import diff_sboms, load_sbom

    out: dict[str, Any] = {"errors": []}
    rel = releases(p, model)
    me = next((r for r in rel if r["version"] == version), None)
    out["state"] = me
    below = [r for r in rel if me is not None and r["counter"] < me["counter"]]
    out["previous"] = below[0]["version"] if below else ""
    try:
        root = (p.root_dir / "root.json").read_bytes()
        report = audit(StorageSource(p.storage), root, model, version)
        doc = report.to_dict()
        out["audit"] = doc
        checks = {c["name"]: c for c in doc["checks"]}
        out["signature"] = checks.get("signature")
        out["provenance"] = checks.get("provenance")
        out["vulns"] = checks.get("vulns")
        out["tuf"] = checks.get("tuf")
    except (OtaError, OSError) as e:
        out["errors"].append(f"audit: {e}")
    try:
        cur = read_release_file(p, model, version, "sbom.cdx.json")
        view = load_sbom(cur)
        out["components"] = [
            {"type": c.type, "name": c.name, "group": c.group, "version": c.version, "purl": c.purl}
            for c in view.all_components()
        ][:500]
        if out["previous"]:
            old = read_release_file(p, model, out["previous"], "sbom.cdx.json")
            out["diff"] = diff_sboms(old, cur).to_dict()
    except (OtaError, OSError) as e:
        out["errors"].append(f"sbom: {e}")
    return out


def audit_log(p: Project, page: int, per_page: int = 50) -> dict[str, Any]:
    """The newest entries (one page) and the verification of the whole chain and its signed
    head, as ``ota log verify``."""
    from ota.repository._audit import read_anchor
    from ota.repository._auditlog import LogTampered, read_log, verify_log
    from ota.repository._tufview import StorageSource

    out: dict[str, Any] = {}
    try:
        head = read_anchor(
            StorageSource(p.storage),
            (p.root_dir / "root.json").read_bytes(),
            p.root_dir / ".ota-cache" / "dashboard-log-verify",
        )
        out["verification"] = verify_log(p, head).to_dict()
        out["ok"] = True
    except LogTampered as e:
        out["ok"], out["problem"] = False, str(e)
    except (OtaError, OSError) as e:
        out["ok"], out["problem"] = False, f"cannot verify: {e}"
    try:
        entries = read_log(p.storage)
    except (OtaError, OSError) as e:
        out["entries"], out["pages"] = [], 0
        out.setdefault("problem", f"cannot read the log: {e}")
        return out
    entries.reverse()
    out["total"] = len(entries)
    out["pages"] = max(1, -(-len(entries) // per_page))
    out["entries"] = [e.to_dict() for e in entries[page * per_page : (page + 1) * per_page]]
    return out
