"""Run the real ``ota`` CLI as on a device that installed only ``edge-ota[client]``.

The modules a client-only install lacks are computed, not listed by hand: every installed
distribution outside the dependency closure of ``edge-ota[client]`` (read from the installed
metadata, markers evaluated) has its top-level modules blocked in a fresh interpreter by a
meta-path finder, so importing them fails exactly as ``ModuleNotFoundError`` would there.
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

_RUNNER = """
import importlib.abc, sys
BLOCKED = frozenset(sys.argv[1].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Block())
from ota.cli import main
sys.argv = ["ota", *sys.argv[2:]]
main()
"""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(root: str, extras: Sequence[str]) -> set[str]:
    from packaging.requirements import Requirement

    seen: set[tuple[str, tuple[str, ...]]] = set()
    todo = [(root, tuple(extras))]
    while todo:
        name, ex = todo.pop()
        if (_norm(name), ex) in seen:
            continue
        seen.add((_norm(name), ex))
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ex or ("",)):
                todo.append((req.name, tuple(sorted(req.extras))))
    return {n for n, _ in seen}


def _top_level(dist: md.Distribution) -> set[str]:
    text = dist.read_text("top_level.txt")
    if text:
        return {line.strip() for line in text.splitlines() if line.strip()}
    names: set[str] = set()
    for f in dist.files or ():
        first = f.parts[0]
        if first.endswith((".dist-info", ".data")) or first in ("..", "__pycache__"):
            continue
        if len(f.parts) == 1:
            if first.endswith(".py"):
                names.add(first[:-3])
            elif first.endswith(".so"):
                names.add(first.split(".", 1)[0])
        else:
            names.add(first)
    return names


@functools.cache
def blocked_modules() -> frozenset[str]:
    """Top-level modules installed here that ``pip install 'edge-ota[client]'`` would not
    bring (e.g. fastcdc, onnx, boto3, cyclonedx, packageurl, jsonschema, flask)."""
    keep = _closure("edge-ota", ["client"])
    allowed: set[str] = set()
    blocked: set[str] = set()
    for dist in md.distributions():
        name = dist.metadata["Name"] or ""
        (allowed if _norm(name) in keep else blocked).update(_top_level(dist))
    return frozenset(blocked - allowed - {"ota", "tests", "_distutils_hack", "pip", "setuptools"})


def run_client_only(args: Sequence[str], *, cwd: Path | None = None,
                    timeout: float = 300) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """``ota ARGS`` in a fresh interpreter where only the client extra's modules import."""
    return subprocess.run(
        [sys.executable, "-c", _RUNNER, ",".join(sorted(blocked_modules())), *args],
        capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd,
    )  # fmt: skip
