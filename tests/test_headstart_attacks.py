"""Attacks on a fresh publish's head start (ADR 0018, review 3): the chunking child and its
report, the early checks and golden session, and what the CLI makes of their failures.

Each test here failed before its fix: a broken child's report crashed the parent with a
traceback or hung it; a child's failure surfaced as a traceback (exit 1) from ``ota publish``;
a model file replaced by another of the same size and modification time had the first file's
checks, golden session and chunking adopted for it.
"""

from __future__ import annotations

import gc
import os
import resource
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ota.errors import ExitCode, LocalError
from ota.repository import _early
from ota.repository._chunker import MAX_CHUNK
from ota.repository._chunkjob import ChunkJob, ChunkJobError, _entry, prestart, take
from ota.repository._fileblob import new_copy_path
from tests.onnx_models import big_mlp, save, write_mlp
from tests.repo_helpers import fake_chunk_child, make_project

_DEADLINE_S = 300.0  # generous: only a hang ever reaches it
_HEX = "a" * 64


def _result_within_deadline(job: ChunkJob) -> BaseException | None:
    """``job.result()``'s exception (None if it returned); a hang is killed and fails."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            job.result()
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(_DEADLINE_S)
    if thread.is_alive():
        job._proc.kill()  # unblock the parent's read, then fail
        thread.join()
        pytest.fail("the parent hung on its chunking child")
    return outcome[0]


@pytest.mark.parametrize(
    "report",
    [
        '{"sha256": "' + _HEX + '", "size": 1000, "chunks": [["' + _HEX + '", Infinity]]}',
        '{"sha256": "' + _HEX + '", "size": 1000, "chunks": [["' + _HEX + '", -Infinity]]}',
        "[" * 50_000 + "]" * 50_000,  # nesting deeper than the parser's recursion limit
    ],
)
def test_a_report_that_breaks_the_parser_is_a_clean_error(report: str) -> None:
    with pytest.raises(ChunkJobError, match="malformed"):
        _entry(report.encode(), 1000, Path("model.onnx"))


def test_a_progress_figure_too_long_for_int_is_a_clean_error(tmp_path: Path) -> None:
    job = fake_chunk_child(tmp_path, "print('+' + '1' * 5000)")  # int() refuses > 4300 digits
    error = _result_within_deadline(job)
    assert isinstance(error, ChunkJobError) and "bad progress" in str(error)
    assert not job.copy.exists()


def test_a_child_flooding_stderr_cannot_deadlock_the_parent(tmp_path: Path) -> None:
    """A child that writes more than a pipe holds to stderr before exiting used to block on
    it, while the parent blocked reading its stdout: both forever."""
    job = fake_chunk_child(tmp_path, "import sys; sys.stderr.write('x' * 4_000_000 + ' disk gone');"
                                " sys.stderr.flush(); sys.exit(1)")  # fmt: skip
    error = _result_within_deadline(job)
    assert isinstance(error, ChunkJobError) and "disk gone" in str(error)
    assert job._proc.poll() is not None
    assert not job.copy.exists()


def test_a_child_error_is_a_local_error_that_is_still_an_oserror() -> None:
    error = ChunkJobError("chunking x failed")
    assert isinstance(error, LocalError) and isinstance(error, OSError)
    assert error.exit_code == ExitCode.LOCAL


def _limit_file_size() -> None:  # in the CLI's process: the child inherits it
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 1024 * 1024, 2 * 1024 * 1024))


def test_a_child_that_cannot_write_the_copy_fails_the_cli_cleanly(tmp_path: Path) -> None:
    """A file-size limit (as a quota) that the chunking child meets writing the model's copy:
    ``ota publish`` exits with the local-fault code and a one-line error, never a traceback,
    and leaves no temp copy and no release."""
    make_project(tmp_path)
    model = save(big_mlp(8), tmp_path / "big.onnx")
    assert model.stat().st_size > MAX_CHUNK
    proc = subprocess.run(
        [sys.executable, "-m", "ota.cli", "publish", "--project", str(tmp_path / "proj"),
         "--name", "m", "--version", "1.0.0", str(model)],
        capture_output=True, text=True, check=False, timeout=600, preexec_fn=_limit_file_size,
    )  # fmt: skip
    assert proc.returncode == ExitCode.LOCAL, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "error: chunking" in proc.stderr
    assert not list((tmp_path / "repo").rglob(".file.*"))
    assert not list((tmp_path / "repo").rglob("releases/m/*"))


def _same_size_and_mtime_replacement(model: Path, content: bytes) -> None:
    """Put ``content`` (as long as the file) in ``model``'s place, by rename, with its mtime."""
    st = model.stat()
    assert len(content) == st.st_size
    other = model.with_name("other.tmp")
    other.write_bytes(content)
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, model)
    assert (model.stat().st_size, model.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_early_checks_are_not_adopted_for_a_replacement_with_the_same_size_and_mtime(
    tmp_path: Path,
) -> None:
    """The first file passes the checks; a file of garbage put in its place with the same
    size and mtime must be checked itself, not published on the first file's checks."""
    model = write_mlp(tmp_path / "m.onnx")
    limit = 1 << 30
    _early.prestart(model, limit)
    assert _early.checked(model, limit) is not None  # waits for the checks of the real model
    _same_size_and_mtime_replacement(model, b"\xff" * model.stat().st_size)
    assert _early.checked(model, limit) is None
    assert _early.session(model) is None
    _early.discard(model)


def test_early_session_is_not_adopted_for_a_rewrite_in_place_with_the_same_mtime(
    tmp_path: Path,
) -> None:
    model = write_mlp(tmp_path / "m.onnx")
    limit = 1 << 30
    _early.prestart(model, limit)
    assert _early.checked(model, limit) is not None  # waits for the checks of the real model
    st = model.stat()
    with model.open("r+b") as f:  # same inode, same size, mtime set back: only ctime moves
        f.write(b"\xff" * 64)
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _early.checked(model, limit) is None
    assert _early.session(model) is None
    _early.discard(model)


def test_an_early_chunk_job_is_not_adopted_for_a_replacement_of_the_same_size(
    tmp_path: Path,
) -> None:
    import numpy as np

    source = tmp_path / "model.bin"
    size = MAX_CHUNK + 4096
    source.write_bytes(np.random.default_rng(1).bytes(size))
    folder = tmp_path / "blobs"
    prestart(source, folder)
    _same_size_and_mtime_replacement(source, np.random.default_rng(2).bytes(size))
    assert take(source, folder) is None  # the job chunked (or may chunk) the first file
    assert not list(folder.glob(".file.*"))


def test_gc_and_openblas_are_restored_when_the_arguments_fail_after_the_head_start(
    tmp_path: Path,
) -> None:
    """The hidden callback disables gc while parsing; an argument error after it (an extra
    argument) never ran the command's close callbacks: a ``CliRunner`` caller was left
    without cyclic GC for the rest of its life."""
    from click.testing import CliRunner

    from ota.cli._main import _register, cli

    make_project(tmp_path)
    model = write_mlp(tmp_path / "m.onnx")
    assert gc.isenabled()
    _register()
    result = CliRunner().invoke(
        cli, ["publish", "--project", str(tmp_path / "proj"), "--name", "m",
              "--version", "1.0.0", str(model), "extra"],
    )  # fmt: skip
    assert result.exit_code == ExitCode.USAGE, result.output
    assert gc.isenabled()


_UNADOPTED_IN_PROCESS = """
import gc, os, sys
from click.testing import CliRunner
from ota.cli._main import _register, cli
from ota.repository import _chunkjob, _early
started = []
_start = _chunkjob.ChunkJob.start
def recording_start(source, copy):
    job = _start(source, copy)
    started.append(job)
    return job
_chunkjob.ChunkJob.start = recording_start  # records the job the CLI starts, changes nothing
early = []
_prestart = _early.prestart
_early.prestart = lambda model, limit: (early.append(model), _prestart(model, limit))
_register()
result = CliRunner().invoke(cli, ["publish", "--project", sys.argv[1], "--name", "Not A Name!",
                                  "--version", "1.0.0", sys.argv[2]])
left = [p for p in os.scandir(sys.argv[3]) if p.name.startswith(".file.")]
print(result.exit_code, len(started), len(early), started[0]._proc.poll() is not None,
      len(left), len(_chunkjob._early), len(_early._jobs), gc.isenabled(),
      os.environ.get("OPENBLAS_NUM_THREADS"))
"""


def test_a_cli_publish_failing_before_adoption_leaves_nothing_in_a_long_lived_process(
    tmp_path: Path,
) -> None:
    """``CliRunner`` (a long-lived caller): a publish that fails before it adopts the head
    start (a bad name) must stop the chunking child, remove its temp copy and free the early
    session when the command ends, not when the process exits."""
    make_project(tmp_path)
    model = save(big_mlp(8), tmp_path / "big.onnx")
    folder = tmp_path / "repo" / "blobs" / "sha256"
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-c", _UNADOPTED_IN_PROCESS, str(tmp_path / "proj"), str(model),
         str(folder)],
        capture_output=True, text=True, check=False, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    code, started, early, reaped, left, jobs, sessions, gc_on, blas = proc.stdout.split()
    assert (code, started, early) == (str(int(ExitCode.INPUT)), "1", "1")  # both started
    assert (reaped, left, jobs, sessions) == ("True", "0", "0", "0")
    assert (gc_on, blas) == ("True", "None")


@pytest.mark.parametrize("swap", ["symlink", "hardlink", "fifo"])
def test_a_temp_copy_swapped_in_the_blob_folder_is_never_written_through(
    tmp_path: Path, swap: str
) -> None:
    """Someone who can write the blob folder puts a link (to a file of the publisher's: its
    key, say) or a FIFO where the temp copy was made, before the chunking child opens it:
    the child refuses it, nothing is written through it, and the parent fails cleanly."""
    import numpy as np

    source = tmp_path / "model.bin"
    source.write_bytes(np.random.default_rng(3).bytes(MAX_CHUNK + 4096))
    victim = tmp_path / "signing.key"
    victim.write_bytes(b"secret key material")
    copy = new_copy_path(tmp_path / "blobs")
    copy.unlink()
    if swap == "symlink":
        copy.symlink_to(victim)
    elif swap == "hardlink":
        os.link(victim, copy)
    else:
        os.mkfifo(copy)
    job = ChunkJob.start(source, copy)
    error = _result_within_deadline(job)
    assert isinstance(error, ChunkJobError), error  # refused (ELOOP, ENXIO or not ours)
    assert victim.read_bytes() == b"secret key material"


def test_a_fifo_in_place_of_the_model_never_hangs_the_child_or_the_parent(
    tmp_path: Path,
) -> None:
    """The model path checked as a regular file, then swapped for a FIFO before the child
    looks at it (here: the child is simply given it). Evidence, not a fix: the child's stat
    sees size 0 and never opens it, and the parent refuses a report for 0 bytes. (A swap
    between the child's stat and its open could still block it: not reproducible here.)"""
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    copy = new_copy_path(tmp_path / "blobs")
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "ota.repository._chunkjob", str(fifo), str(copy)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    job = ChunkJob(fifo, copy, MAX_CHUNK + 1, proc)
    error = _result_within_deadline(job)
    assert isinstance(error, ChunkJobError) and "does not describe" in str(error), error
    assert not copy.exists()


def test_a_publish_where_no_child_can_start_chunks_in_process_and_leaves_no_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interpreter embedded in another program (``sys.executable`` is not Python, or
    empty): before ADR 0018 a library publish worked there; the child path failed it with a
    raw ``FileNotFoundError`` and left its temp copy in the blob folder."""
    from ota.bundle import blob_key
    from ota.repository import PublishRequest, publish
    from ota.repository._chunker import chunk_file

    project = make_project(tmp_path)
    model = save(big_mlp(8), tmp_path / "big.onnx")
    assert model.stat().st_size > MAX_CHUNK  # the child path
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    prestart(model, tmp_path / "repo" / "blobs" / "sha256")  # the CLI's head start: no child
    publish(project, PublishRequest(source=model, name="m", version="1.0.0"))
    entry = chunk_file(model, "model/model.onnx", None)
    assert (tmp_path / "repo" / blob_key(entry.sha256)).read_bytes() == model.read_bytes()
    assert not list((tmp_path / "repo").rglob(".file.*"))
