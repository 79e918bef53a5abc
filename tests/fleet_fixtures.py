"""Fixtures for the fleet service: a real PostgreSQL server and the real service under gunicorn.

Import what a test module needs (``from tests.fleet_fixtures import fleet_service, postgres
# noqa: F401``). Nothing here is a stand-in:

* ``postgres`` (session): Debian's PostgreSQL 15 (``initdb``/``pg_ctl`` from
  ``/usr/lib/postgresql/15/bin``) in a temp folder, on a free loopback port, its unix socket
  in that folder. The server refuses to run as root, so as root (CI) it runs as the system
  user ``otapg`` (created with ``useradd`` if missing) through ``runuser``. One server per
  test process (started on first use, stopped at exit); each service gets a fresh database.
  Skipped only when the binaries are absent and ``OTA_REQUIRE_POSTGRES`` is unset.
* ``fleet_service`` (function, parametrised ``sqlite``/``postgresql``): a fresh migrated
  database, ``ota fleet serve`` (gunicorn, 2 workers) on a free port, waited for until it
  answers; yields a :class:`FleetService` (base URL, admin token, database URL); killed after
  (SIGKILL to the whole process group: nothing of a test's service is kept, and a graceful or
  even gunicorn's quick SIGQUIT shutdown cost 1.5-3.5 s a test in interpreter teardown).
* ``start_service(db_url, *args)``: the same as a context manager, for tests that need other
  serve options (``--max-reports-per-minute``, ``--busy-timeout-ms``) or several services.

Each service is a fresh process running ``ota fleet serve`` (the CLI's ``main``, gunicorn and
its workers) on a fresh database, as before; what it no longer pays is the 0.75 s of CPU that
importing the server's modules took at every start (~115 starts a run): a *fork server* (one per
test process, :class:`_ForkServer`) imports them once, then forks one child per service, which
takes its own session, log file, working folder, environment and argv before calling ``main``.
prometheus-client is not among those imports (it picks its storage from
``PROMETHEUS_MULTIPROC_DIR`` when first imported, and each service has its own folder), and the
fork server has no thread and no open connection to pass on. ``OTA_TEST_FLEET_FORK=0`` starts
each service with ``python -m ota.cli`` instead.
* ``call(method, url, ...)``: one HTTP request (urllib3), returning status, JSON and headers.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import pytest
import urllib3

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # ota.fleet._metrics.MULTIPROC_ENV
PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "otapg"
REQUIRE_ENV = "OTA_REQUIRE_POSTGRES"
START_DEADLINE_S = 90.0
_counter = itertools.count(1)
_pool = urllib3.PoolManager(
    num_pools=16, maxsize=8, retries=False, timeout=urllib3.Timeout(connect=10, read=60)
)


def pg_available() -> bool:
    return (PG_BIN / "initdb").exists() and (PG_BIN / "pg_ctl").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_pg_user() -> list[str]:
    """The command prefix that runs a PostgreSQL binary as an unprivileged user."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/bin/false", PG_USER],
            check=True,
            capture_output=True,
        )
    return ["runuser", "-u", PG_USER, "--"]


@dataclass
class Postgres:
    """One PostgreSQL server in ``work``; ``port`` on 127.0.0.1, socket in ``work/sock``."""

    work: Path
    port: int
    prefix: list[str] = field(default_factory=list)
    template: str = ""  # a migrated database that :meth:`migrated_db` copies

    @property
    def data(self) -> Path:
        return self.work / "data"

    def _ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.prefix, str(PG_BIN / "pg_ctl"), "-D", str(self.data), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def init(self) -> None:
        out = subprocess.run(
            [
                *self.prefix,
                str(PG_BIN / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if out.returncode:
            raise RuntimeError(f"initdb failed: {out.stderr[-2000:]}")

    def start(self) -> None:
        opts = (
            f"-p {self.port} -k {self.work / 'sock'} -c listen_addresses=127.0.0.1 "
            "-c max_connections=200 -c shared_buffers=64MB"
            # a throw-away test cluster: no fsync (survives a crash of PostgreSQL, not of the
            # OS, which no test makes); CREATE DATABASE and every commit skip the disk flush
            " -c fsync=off -c full_page_writes=off"
        )
        out = self._ctl("-l", str(self.work / "log"), "-o", opts, "-w", "-t", "120", "start")
        if out.returncode:
            log = (self.work / "log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"pg_ctl start failed: {out.stderr[-1000:]}\n{log}")

    def stop(self, mode: str = "fast") -> None:
        self._ctl("-m", mode, "-w", "-t", "60", "stop")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_db(self, name: str = "", template: str = "") -> str:
        """A fresh database, empty or a copy of ``template`` (which nobody may be connected
        to); its SQLAlchemy URL."""
        import psycopg

        name = name or f"fleet_{os.getpid()}_{next(_counter)}"
        copy = f' TEMPLATE "{template}"' if template else ""
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
            autocommit=True,
            connect_timeout=10,
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"{copy}')  # names are ours, not input
        return self.url(name)

    def migrated_db(self) -> str:
        """A fresh database with the newest schema: a copy of one migrated once per server."""
        if not self.template:
            from ota.fleet import migrate

            name = f"fleet_template_{os.getpid()}"
            migrate(self.create_db(name))  # migrate() closes its connections when done
            self.template = name
        return self.create_db(template=self.template)


_PG: dict[str, Postgres] = {}  # one server per test process


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_orphans(prefix: list[str]) -> None:
    """Stop and remove servers left by test processes that died without cleaning up
    (SIGKILL, a timeout): each server's folder names its owner's pid; only servers whose
    owner is gone are touched."""
    for owner in Path(tempfile.gettempdir()).glob("ota-pg-*/owner"):
        try:
            pid = int(owner.read_text().strip())
        except (OSError, ValueError):
            continue
        if pid <= 0 or _alive(pid):
            continue
        work = owner.parent
        Postgres(work, 0, prefix).stop("immediate")
        shutil.rmtree(work, ignore_errors=True)


def _start_postgres() -> Postgres:
    if "pg" not in _PG:
        prefix = _as_pg_user()
        reap_orphans(prefix)
        work = Path(tempfile.mkdtemp(prefix="ota-pg-"))
        (work / "owner").write_text(str(os.getpid()))
        (work / "sock").mkdir()
        if prefix:
            shutil.chown(work, PG_USER)
            shutil.chown(work / "sock", PG_USER)
        pg = Postgres(work, free_port(), prefix)
        pg.init()
        pg.start()

        def _cleanup() -> None:
            pg.stop("immediate")
            shutil.rmtree(work, ignore_errors=True)

        atexit.register(_cleanup)
        _PG["pg"] = pg
    return _PG["pg"]


@pytest.fixture(scope="session")
def postgres() -> Postgres:
    if not pg_available() and not os.environ.get(REQUIRE_ENV):
        pytest.skip(f"PostgreSQL binaries not found in {PG_BIN} (set {REQUIRE_ENV} to fail)")
    return _start_postgres()


# --- HTTP ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    doc: Any
    headers: dict[str, str]
    raw: bytes


def call(
    method: str,
    url: str,
    doc: Any = None,
    *,
    token: str | None = None,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """One request; ``doc`` is sent as JSON, ``body`` as is. Never raises on a status."""
    h = {"Content-Type": "application/json"} if (doc is not None or body is not None) else {}
    if token:
        h["Authorization"] = f"Bearer {token}"
    h.update(headers or {})
    data = json.dumps(doc).encode() if doc is not None else body
    r = _pool.request(method, url, body=data, headers=h, redirect=False)
    try:
        parsed = json.loads(r.data) if r.data else None
    except ValueError:
        parsed = None
    return Reply(r.status, parsed, {k.lower(): v for k, v in r.headers.items()}, r.data)


# --- the service -----------------------------------------------------------------------------


class Process(Protocol):
    """What the fixtures and tests use of a service's process (a ``subprocess.Popen`` is one)."""

    pid: int

    @property
    def returncode(self) -> int | Any: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...


# The fork server: imports what `ota fleet serve` loads, then for each JSON line on stdin forks a
# child that becomes `ota fleet serve ARGS` (own session, log, cwd, environment) and prints its
# pid. It reaps its children and writes each one's exit code to the file the request named.
_FORK_SERVER = r"""
import json, os, signal, sys, threading, traceback
import ota.cli, ota.cli._fleet_cmds, ota.fleet._local, ota.fleet._serve
import ota.dashboard, ota.fleet._app, ota.fleet._mtls, gunicorn.app.base, gunicorn.arbiter
assert "prometheus_client" not in sys.modules, "prometheus-client must be imported per service"
assert threading.active_count() == 1, "a thread would not survive the fork"
exits = {}

def reap(signum, frame):
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        path = exits.pop(pid, None)
        if path:
            with open(path + ".tmp", "w") as f:
                f.write(str(os.waitstatus_to_exitcode(status)))
            os.replace(path + ".tmp", path)

signal.signal(signal.SIGCHLD, reap)
for line in sys.stdin:
    req = json.loads(line)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # record the pid before reaping
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            os.setsid()
            out = os.open(req["log"], os.O_WRONLY | os.O_TRUNC)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.close(out)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)
            os.chdir(req["cwd"])
            os.environ.clear()
            os.environ.update(req["env"])
            sys.argv = ["ota", *req["args"]]
            from ota.cli import main
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    exits[pid] = req["rc"]
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    print(pid, flush=True)
"""


class _Forked:
    """A service process forked by the fork server (not a child of this process): its pid, its
    end seen through a pidfd, its exit code from the file the fork server writes on reaping."""

    def __init__(self, pid: int, rc_file: Path) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._rc_file = rc_file
        self._fd: int | None
        try:
            self._fd = os.pidfd_open(pid)
        except ProcessLookupError:  # already ended and reaped
            self._fd = None

    def poll(self) -> int | None:
        return self._ended(0.0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._ended(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(f"ota fleet serve (pid {self.pid})", timeout or 0.0)
        return code

    def _ended(self, timeout: float | None) -> int | None:
        if self.returncode is None:
            if self._fd is not None and not select.select([self._fd], [], [], timeout)[0]:
                return None
            deadline = time.monotonic() + 30  # the fork server reaps it as soon as it ends
            while not self._rc_file.exists() and time.monotonic() < deadline:
                time.sleep(0.005)
            try:
                self.returncode = int(self._rc_file.read_text())
            except (OSError, ValueError):
                self.returncode = -1  # ended; the fork server did not say how
            self._rc_file.unlink(missing_ok=True)
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        return self.returncode


class _ForkServer:
    """One fork server per test process, started on first use, stopped at exit."""

    _proc: subprocess.Popen[bytes] | None = None
    _err: IO[bytes] | None = None

    @classmethod
    def enabled(cls) -> bool:
        return os.environ.get("OTA_TEST_FLEET_FORK", "1") != "0" and hasattr(os, "pidfd_open")

    @classmethod
    def spawn(cls, args: list[str], env: dict[str, str], log: Path) -> _Forked:
        """``ota ARGS`` as a forked child with ``env``, output to ``log``."""
        if cls._proc is None or cls._proc.poll() is not None:
            cls._err = tempfile.TemporaryFile()  # noqa: SIM115 - closed at exit
            repo = str(Path(__file__).resolve().parents[1])
            path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
            cls._proc = subprocess.Popen(
                [sys.executable, "-c", _FORK_SERVER],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=cls._err,
                env=dict(os.environ, PYTHONPATH=path),
            )
            atexit.register(cls._stop, cls._proc, cls._err)
        proc = cls._proc
        assert proc.stdin is not None and proc.stdout is not None
        rc_file = log.with_suffix(".rc")
        req = {"args": args, "env": env, "cwd": os.getcwd(), "log": str(log), "rc": str(rc_file)}
        proc.stdin.write(json.dumps(req).encode() + b"\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            assert cls._err is not None
            cls._err.seek(0)
            raise RuntimeError(f"fleet fork server failed: {cls._err.read()[-3000:]!r}")
        return _Forked(int(line), rc_file)

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes], err: IO[bytes]) -> None:
        if proc.stdin is not None:
            proc.stdin.close()  # it exits at the end of its input
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
        err.close()


@dataclass
class FleetService:
    url: str
    admin_token: str
    db_url: str
    backend: str
    proc: Process
    log: Path

    def enroll_token(self, **spec: Any) -> str:
        r = call("POST", f"{self.url}/v1/enroll-tokens", spec, token=self.admin_token)
        assert r.status == 201, r.doc
        return str(r.doc["token"])

    def enroll(
        self,
        device_id: str,
        *,
        ring: str = "ga",
        tier: str = "default",
        arch: str = "x86_64",
        token: str | None = None,
    ) -> str:
        """Enrol ``device_id`` with a fresh one-use token; its credential."""
        r = call(
            "POST",
            f"{self.url}/v1/enroll",
            {
                "token": token or self.enroll_token(),
                "device_id": device_id,
                "facts": {
                    "ring": ring,
                    "tier": tier,
                    "arch": arch,
                    "runtime_version": "1.31.1",
                    "client_version": "0.1.0",
                },
            },
        )
        assert r.status == 201, r.doc
        return str(r.doc["credential"])

    def operator_token(self, scope: str, expires_in: int = 3600) -> str:
        name = f"{scope}-{next(_counter)}"
        r = call(
            "POST",
            f"{self.url}/v1/tokens",
            {"name": name, "scope": scope, "expires_in": expires_in},
            token=self.admin_token,
        )
        assert r.status == 201, r.doc
        return str(r.doc["token"])

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-5000:]


_SQLITE_TEMPLATE: list[Path] = []  # one migrated SQLite file per test process


def _sqlite_template() -> Path:
    """A SQLite database migrated once per test process (copied by :func:`new_db`): a
    migration per test cost 0.1-0.3 s (PostgreSQL 0.4 s), ~200 databases a run."""
    if not _SQLITE_TEMPLATE:
        import sqlite3

        from ota.fleet import migrate

        work = Path(tempfile.mkdtemp(prefix="ota-fleet-template-"))
        atexit.register(shutil.rmtree, work, ignore_errors=True)
        path = work / "template.sqlite3"
        migrate(f"sqlite:///{path}")
        conn = sqlite3.connect(path)  # fold the WAL into the file: the copy is the file alone
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
        if Path(f"{path}-wal").exists():
            raise RuntimeError("the migrated SQLite template still has a WAL file")
        _SQLITE_TEMPLATE.append(path)
    return _SQLITE_TEMPLATE[0]


def new_db(backend: str, pg: Postgres | None, folder: Path) -> str:
    """A fresh, migrated database of ``backend``; its URL. It is a copy of a database migrated
    once per test process (``ota fleet serve`` still runs the migration check at each start;
    the migrations themselves are tested on empty databases elsewhere)."""
    if backend == "sqlite":
        path = folder / f"fleet-{next(_counter)}.sqlite3"
        shutil.copyfile(_sqlite_template(), path)
        return f"sqlite:///{path}"
    assert pg is not None
    return pg.migrated_db()


@contextlib.contextmanager
def start_service(
    db_url: str, *args: str, backend: str = "", workers: int = 2
) -> Iterator[FleetService]:
    """``ota fleet serve`` on ``db_url`` (migrated) with an admin token; killed on exit."""
    from ota.fleet import FleetConfig
    from ota.fleet._local import create_token

    admin = create_token(FleetConfig(db_url=db_url), f"admin-{next(_counter)}", "admin", 86400)[
        "token"
    ]
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="ota-fleet-", suffix=".log")[1])
    env = dict(os.environ)
    metrics_dir = None  # the master removes its own temporary one only when it exits cleanly
    if not env.get(MULTIPROC_ENV):
        metrics_dir = tempfile.mkdtemp(prefix="ota-fleet-metrics-")
        env[MULTIPROC_ENV] = metrics_dir
    argv = ["fleet", "serve", "--db", db_url, "--bind", f"127.0.0.1:{port}"]
    argv += ["--workers", str(workers), *args]
    proc: Process
    if _ForkServer.enabled():
        proc = _ForkServer.spawn(argv, env, log)
    else:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "ota.cli", *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
    svc = FleetService(
        f"http://127.0.0.1:{port}",
        admin,
        db_url,
        backend or ("sqlite" if db_url.startswith("sqlite") else "postgresql"),
        proc,
        log,
    )
    try:
        _wait_ready(svc)
        yield svc
    finally:
        # a test's service and its data are thrown away: no graceful shutdown to wait for (the
        # graceful one waited out kept-alive connections, 2.7 s a test; gunicorn's quick
        # SIGQUIT one still spent 1.5-3.5 s in the workers' and master's interpreter teardown).
        # Committed rows are durable either way (SQLite WAL, PostgreSQL).
        stop_service(proc, signal.SIGKILL)
        log.unlink(missing_ok=True)
        log.with_suffix(".rc").unlink(missing_ok=True)
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def stop_service(proc: Process, sig: int = signal.SIGTERM) -> None:
    """Stop the service's whole process group (gunicorn master and workers)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):  # workers left behind by a SIGKILL
        os.killpg(proc.pid, signal.SIGKILL)


def _wait_ready(svc: FleetService) -> None:
    deadline = time.monotonic() + START_DEADLINE_S
    while time.monotonic() < deadline:
        if svc.proc.poll() is not None:
            raise RuntimeError(f"ota fleet serve exited {svc.proc.returncode}:\n{svc.log_text()}")
        with contextlib.suppress(urllib3.exceptions.HTTPError):
            if call("GET", f"{svc.url}/v1/health").status == 200:
                return
        time.sleep(0.02)
    raise RuntimeError(f"ota fleet serve did not answer in {START_DEADLINE_S} s:\n{svc.log_text()}")


@pytest.fixture(params=["sqlite", "postgresql"])
def fleet_backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh migrated database URL of each backend."""
    pg = request.getfixturevalue("postgres") if request.param == "postgresql" else None
    return new_db(request.param, pg, tmp_path)


@pytest.fixture
def fleet_service(fleet_backend: str) -> Iterator[FleetService]:
    """The real service (gunicorn, 2 workers) on a fresh database of each backend."""
    with start_service(fleet_backend) as svc:
        yield svc
