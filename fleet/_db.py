"""Engines and migrations: SQLite (WAL, busy timeout, one writer at a time) or PostgreSQL.

SQLite transactions start with ``BEGIN IMMEDIATE``: a writer takes the file lock when it
starts, so two workers never both read then fail to upgrade to a write lock (a deadlock SQLite
can only answer with ``database is locked``). PostgreSQL serialises a device's reports with
``SELECT … FOR UPDATE`` on its row instead.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url

from ._config import FleetConfig

HEAD = "0004"
_READ = "ota_fleet_read"
_MIGRATE_LOCK = 0x6F7461_0007  # advisory lock id of fleet migrations ("ota", ADR 0007)


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def make_engine(cfg: FleetConfig) -> Engine:
    """An engine for ``cfg.db_url`` with pings (a restarted database is reconnected) and
    bounded waits (pool, connect, SQLite lock) so a database that is down answers 503."""
    url = make_url(cfg.db_url)
    if url.get_backend_name() == "sqlite":
        engine = create_engine(
            url,
            connect_args={"timeout": cfg.busy_timeout_ms / 1000, "check_same_thread": False},
            pool_pre_ping=True,
        )
        _sqlite_pragmas(engine, cfg.busy_timeout_ms)
        return engine
    if url.get_backend_name() == "postgresql":
        return create_engine(
            url,
            pool_pre_ping=True,
            pool_size=5,
            max_overflow=5,
            pool_timeout=cfg.pool_timeout_s,
            connect_args={"connect_timeout": cfg.connect_timeout_s},
        )
    raise ValueError(f"unsupported database {url.get_backend_name()!r} (sqlite or postgresql)")


def _sqlite_pragmas(engine: Engine, busy_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
        cur.execute("PRAGMA synchronous=FULL")  # an ack survives a power cut
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        read = conn.get_execution_options().get(_READ, False)
        conn.exec_driver_sql("BEGIN" if read else "BEGIN IMMEDIATE")


def read_only(engine: Engine) -> Engine:
    """The same engine (same pool) for transactions that only read: on SQLite they begin
    deferred, so they take no write lock; elsewhere nothing changes."""
    return engine.execution_options(**{_READ: True})


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("ota.fleet") / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(url: str) -> str:
    """Bring the schema at ``url`` to the newest revision; return it. Idempotent, and safe
    when several machines start at once: on PostgreSQL the migration holds a transaction-level
    advisory lock (DDL is transactional there, so a second migrator waits, then finds the
    schema current); SQLite's ``BEGIN IMMEDIATE`` serialises migrators by itself."""
    from alembic import command

    cfg = FleetConfig(db_url=url)
    engine = make_engine(cfg)
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATE_LOCK})
            acfg = alembic_config(url)
            acfg.attributes["connection"] = conn
            command.upgrade(acfg, "head")
        return current_revision(engine) or ""
    finally:
        engine.dispose()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        rev = MigrationContext.configure(conn).get_current_revision()
        conn.rollback()
    return rev
