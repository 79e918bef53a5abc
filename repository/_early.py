"""Run the model's static checks and build its golden onnxruntime session before the publish
asks for them (issue 13: a fresh ``ota publish``'s critical path).

A fresh publish spends ~0.3 s importing python-tuf, the signers and the project before it
checks the model, and the golden session's weight prepacking (~0.35 s per 256 MiB, with the
GIL released) only starts after the checks. The CLI calls :func:`prestart` before those imports:
a thread checks the model (:func:`~ota.repository._model_checks.check_model`) and, only if the
checks pass, builds the session (:func:`~ota.repository._golden.new_session`) while the main
thread imports. The publish then adopts the results (:func:`checked`, :func:`session`) instead
of computing them again.

Invariants:

* nothing is skipped or reordered: the session is built only after the same checks passed on
  the same file, with the same limit, by the same functions; the publish still calls the
  checks before anything that depends on them;
* a result is adopted only for the file (path, device and inode), size, modification and
  status-change times and limit it was computed for, and once (the status-change time and the
  inode cannot be set back by ``touch``/``os.utime``: a file replaced or rewritten with the
  same size and modification time is another file); anything else (another file, a changed
  file, a failure) is discarded and the publish computes its own, raising its own errors
  where it always did;
* best effort: a problem here never fails a publish, it only means no head start.
"""

from __future__ import annotations

import atexit
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ota.repository._model_checks import ModelFacts

__all__ = ["checked", "discard", "prestart", "session"]

_JOIN_AT_EXIT_S = 30.0


_Key = tuple[Path, tuple[int, ...], int]  # path, (dev, ino, size, mtime_ns, ctime_ns), limit


@dataclass
class _Job:
    key: _Key
    checks_done: threading.Event = field(default_factory=threading.Event)
    session_done: threading.Event = field(default_factory=threading.Event)
    facts: ModelFacts | None = None
    session: Any = None


_jobs: dict[Path, _Job] = {}
_lock = threading.Lock()


def _key(path: Path, max_bytes: int) -> _Key | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (Path(path), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns),
            max_bytes)  # fmt: skip


def prestart(model: Path, max_bytes: int) -> None:
    """Check ``model`` and build its golden session on a thread (see module). Best effort.

    The modules the thread needs (onnx, onnxruntime, numpy and ours) are imported here, on the
    caller's thread, before it starts: two threads importing at once can each meet the other's
    half-initialised module (a circular import across threads), so the thread imports nothing.
    """
    key = _key(model, max_bytes)
    if key is None:
        return
    try:
        import onnxruntime  # noqa: F401 - see above

        import ota.repository._golden
        import ota.repository._model_checks  # noqa: F401
    except ImportError:  # a device-only install: the publish reports it
        return
    job = _Job(key)
    with _lock:
        if key[0] in _jobs:
            return
        _jobs[key[0]] = job
    thread = threading.Thread(target=_run, args=(job,), name="early-golden", daemon=True)
    thread.start()
    atexit.register(thread.join, _JOIN_AT_EXIT_S)  # never tear down under onnxruntime's feet


def _run(job: _Job) -> None:
    path, _, max_bytes = job.key
    from ota.repository._golden import new_session
    from ota.repository._model_checks import check_model

    try:
        job.facts = check_model(path, max_bytes=max_bytes)
    except BaseException:  # the publish runs the checks again and reports the error itself
        return
    finally:
        job.checks_done.set()
    try:
        job.session = new_session(path)
    except BaseException:  # likewise: the golden run reports it
        return
    finally:
        job.session_done.set()


def checked(model: Path, max_bytes: int) -> ModelFacts | None:
    """The facts :func:`prestart` found for ``model`` (waiting for its checks), or None (no
    early job for this file and limit, the file changed, or the checks failed)."""
    with _lock:
        job = _jobs.get(Path(model))
    if job is None:
        return None
    job.checks_done.wait()
    if job.facts is None or _key(model, max_bytes) != job.key:
        _drop(job)
        return None
    return job.facts


def session(model: Path) -> Any:
    """The golden session :func:`prestart` built for ``model`` (waiting for it), once; None
    when there is none, it failed, or the file changed since its checks."""
    with _lock:
        job = _jobs.get(Path(model))
    if job is None:
        return None
    job.checks_done.wait()
    if job.facts is None:
        _drop(job)
        return None
    job.session_done.wait()
    _drop(job)
    if _key(model, job.key[2]) != job.key:
        return None
    return job.session


def _drop(job: _Job) -> None:
    with _lock:
        if _jobs.get(job.key[0]) is job:
            del _jobs[job.key[0]]


def discard(model: Path) -> None:
    """Forget any early job for ``model`` (the publish is over: its session is freed)."""
    with _lock:
        _jobs.pop(Path(model), None)
