"""What ``ota fleet …`` does on the database directly (no HTTP): bootstrap the first admin
token, inspect the fleet, revoke, prune. Refusals become :mod:`ota.errors` (exit codes)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from ota.errors import ConfigError, ConflictError, InputError, OtaError, TransientError

from . import _store
from ._app import local_actor
from ._config import FleetConfig
from ._db import HEAD, current_revision, make_engine
from ._validate import Rejected

T = TypeVar("T")
_DURATION = re.compile(r"^(\d{1,9})([smhdw]?)\Z")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> int:
    """``90d``, ``12h``, ``30m``, ``3600`` (seconds) -> seconds. Raises InputError."""
    m = _DURATION.match(text.strip())
    if not m:
        raise InputError(f"not a duration: {text!r} (e.g. 30d, 12h, 45m, 3600)")
    return int(m.group(1)) * _UNIT[m.group(2)]


@contextmanager
def _engine(cfg: FleetConfig) -> Iterator[Engine]:
    try:
        engine = make_engine(cfg)
    except (ValueError, sa_exc.ArgumentError) as e:
        raise ConfigError(f"bad database URL: {e}") from e
    try:
        yield engine
    finally:
        engine.dispose()


def run(cfg: FleetConfig, fn: Callable[[Session, float], T]) -> T:
    """``fn(session, now)`` in one transaction on a migrated database."""
    with _engine(cfg) as engine:
        try:
            rev = current_revision(engine)
            if rev != HEAD:
                raise ConfigError(
                    f"the fleet database is at schema {rev or 'none'}, not "
                    f"{HEAD}: run `ota fleet migrate`"
                )
            with Session(engine, expire_on_commit=False) as s, s.begin():
                return fn(s, time.time())
        except Rejected as e:
            raise _error(e) from e
        except sa_exc.IntegrityError as e:
            raise ConflictError("a concurrent change conflicted; retry") from e
        except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError) as e:
            raise TransientError(
                f"the fleet database is unavailable: {str(e).splitlines()[0][:200]}"
            ) from e


def _error(e: Rejected) -> OtaError:
    if e.status == 409:
        return ConflictError(e.message)
    if e.status in (401, 403):
        return ConfigError(e.message)
    return InputError(e.message)


def create_token(cfg: FleetConfig, name: str, scope: str, lifetime_s: int) -> dict[str, Any]:
    if lifetime_s < 60 or lifetime_s > _store.MAX_TOKEN_LIFETIME_S:
        raise InputError("--expires must be between 60 s and 366 days")

    def go(s: Session, now: float) -> dict[str, Any]:
        secret, info = _store.create_operator_token(s, name, scope, lifetime_s, local_actor(), now)
        return {"token": secret, **info}

    return run(cfg, go)


def create_enroll_token(
    cfg: FleetConfig, name: str, uses: int, lifetime_s: int, ring: str, tier: str
) -> dict[str, Any]:
    if lifetime_s < 60 or lifetime_s > _store.MAX_TOKEN_LIFETIME_S:
        raise InputError("--expires must be between 60 s and 366 days")
    if not 1 <= uses <= 1_000_000:
        raise InputError("--uses must be between 1 and 1000000")

    def go(s: Session, now: float) -> dict[str, Any]:
        secret, info = _store.create_enroll_token(
            s, name, uses, lifetime_s, ring, tier, local_actor(), now
        )
        return {"token": secret, **info}

    return run(cfg, go)


def prune(
    cfg: FleetConfig, older_than_s: float, batch: int = 5000, max_batches: int = 1_000_000
) -> int:
    """Delete events received more than ``older_than_s`` ago, ``batch`` rows per short
    transaction, so ingestion (which needs the same locks on SQLite) waits at most one
    batch."""
    total = 0
    with _engine(cfg) as engine:
        before = time.time() - older_than_s
        for _ in range(max_batches):
            try:
                with Session(engine) as s, s.begin():
                    n = _store.prune_batch(s, before, batch)
            except (sa_exc.OperationalError, sa_exc.InterfaceError) as e:
                raise TransientError(
                    f"pruning stopped after {total} events: {str(e).splitlines()[0][:200]}"
                ) from e
            total += n
            if n < batch:
                break
    return total


def migrate_db(url: str) -> str:
    """Migrate the database at ``url``; ConfigError for a bad URL, TransientError when the
    database cannot be reached."""
    from ._db import migrate

    try:
        return migrate(url)
    except (ValueError, sa_exc.ArgumentError) as e:
        raise ConfigError(f"bad database URL: {e}") from e
    except (sa_exc.OperationalError, sa_exc.InterfaceError) as e:
        raise TransientError(
            f"cannot reach the fleet database: {str(e).splitlines()[0][:200]}"
        ) from e


def token_name(name: str, prefix: str) -> str:
    """``name`` if given (checked), else ``prefix-<random>``."""
    import secrets

    from ._validate import TOKEN_NAME_RE

    if not name:
        return f"{prefix}-{secrets.token_hex(4)}"
    if not TOKEN_NAME_RE.match(name):
        raise InputError("a token name is 1-64 letters, digits, '.', '_' or '-'")
    return name
