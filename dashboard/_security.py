"""Dashboard sessions: an operator token exchanged for a signed cookie, CSRF, headers, login
rate limit. Pure of Flask routing; the views call these.

Invariants:

* the cookie holds no secret that grants anything by itself: it names the operator token row
  (id and a prefix of its SHA-256) and carries the session's CSRF value and id, signed with a
  key only the service holds (HMAC-SHA256, itsdangerous); every request re-reads the token row,
  so a revoked or expired token ends its sessions at once, and its scope is the token's now;
* a session lives at most ``SESSION_S`` (the signature's timestamp) and never past its token's
  expiry; a logout is recorded in the fleet's ``audit`` table and honoured by every worker;
* every state-changing form carries the session's CSRF value (compared in constant time), and a
  cross-site ``Origin`` is refused before it is looked at;
* failed logins are counted in the database (``audit`` rows ``dashboard.login_failed`` by
  client address), so the limit holds across workers and machines.
"""

from __future__ import annotations

import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ota.fleet import _secrets
from ota.fleet._models import AuditRecord, OperatorToken

COOKIE = "ota_dash"
SESSION_S = 8 * 3600
KEY_ENV = "OTA_DASHBOARD_KEY_FILE"
SECURE_ENV = "OTA_DASHBOARD_SECURE_COOKIE"
LOGIN_WINDOW_S = 300.0
LOGIN_MAX_FAILURES_PER_CLIENT = 10
LOGIN_MAX_FAILURES_ALL = 300
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # "no-referrer" makes Chromium send Origin: null
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
}


_DB_DIR: list[Path] = []  # the folder of the service's SQLite file, set by register()


def project_dir() -> Path:
    """The repository project the dashboard reads: ``$OTA_PROJECT`` (as the CLI); else the
    folder of the fleet's SQLite file when it holds ``ota.toml`` (the default layout,
    ``<project>/fleet.sqlite3``); else the working folder."""
    env = os.environ.get("OTA_PROJECT", "")
    if env:
        return Path(env)
    if _DB_DIR and (_DB_DIR[0] / "ota.toml").is_file():
        return _DB_DIR[0]
    return Path(".")


def note_db_url(url: str) -> None:
    """Remember where a SQLite fleet database lives (see :func:`project_dir`)."""
    _DB_DIR.clear()
    if url.startswith("sqlite:///"):
        _DB_DIR.append(Path(url[len("sqlite:///") :].split("?", 1)[0]).parent)


def load_key(path: Path | None = None) -> bytes:
    """The signing key shared by every worker: ``$OTA_DASHBOARD_KEY_FILE`` or
    ``<project>/.ota-dashboard-key``, made once (32 random bytes, 0600) and published with an
    atomic ``link`` so concurrent workers agree on one."""
    path = path or Path(os.environ.get(KEY_ENV) or project_dir() / ".ota-dashboard-key")
    for _ in range(3):
        try:
            raw = path.read_bytes().strip()
        except FileNotFoundError:
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, secrets.token_hex(32).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
            continue
        if len(raw) >= 64:
            return raw
        raise ValueError(f"{path} holds a key shorter than 32 bytes (64 hex characters)")
    raise OSError(f"cannot create the dashboard key at {path}")


@dataclass(frozen=True)
class Operator:
    """The operator of a valid session."""

    token_id: int
    name: str
    scope: str
    sid: str
    csrf: str
    expires_at: float | None

    def allows(self, need: str) -> bool:
        return _secrets.scope_allows(self.scope, need)

    @property
    def actor(self) -> str:
        return f"token:{self.name}"


class Sessions:
    """Sign and check session cookies with one key."""

    def __init__(self, key: bytes) -> None:
        self._s = URLSafeTimedSerializer(key, salt="ota-dashboard-session")

    def issue(self, tok: OperatorToken) -> tuple[str, dict[str, Any]]:
        doc = {
            "t": int(tok.id),
            "h": tok.token_hash[:16],
            "s": secrets.token_urlsafe(16),
            "c": secrets.token_urlsafe(24),
        }
        return self._s.dumps(doc), doc

    def anonymous(self) -> tuple[str, dict[str, Any]]:
        """A pre-login cookie: only a CSRF value for the login form."""
        doc = {"c": secrets.token_urlsafe(24)}
        return self._s.dumps(doc), doc

    def read(self, raw: str | None) -> dict[str, Any] | None:
        if not raw or len(raw) > 1024:
            return None
        try:
            doc = self._s.loads(raw, max_age=SESSION_S)
        except BadSignature:
            return None
        return doc if isinstance(doc, dict) and isinstance(doc.get("c"), str) else None


def operator_of(s: Session, doc: dict[str, Any] | None, now: float) -> Operator | None:
    """The operator of a signed session document, or ``None`` when it is anonymous, its token
    is revoked, expired or replaced, or the session was logged out."""
    if not doc or not isinstance(doc.get("t"), int) or not isinstance(doc.get("s"), str):
        return None
    tok = s.get(OperatorToken, doc["t"])
    if (
        tok is None
        or not hmac.compare_digest(tok.token_hash[:16], str(doc.get("h", "")))
        or tok.revoked_at is not None
        or (tok.expires_at is not None and tok.expires_at <= now)
    ):
        return None
    logged_out = s.scalar(
        select(func.count())
        .select_from(AuditRecord)
        .where(
            AuditRecord.at > now - SESSION_S - 60,
            AuditRecord.action == "dashboard.logout",
            AuditRecord.target == doc["s"],
        )
    )
    if logged_out:
        return None
    return Operator(int(tok.id), tok.name, tok.scope, doc["s"], doc["c"], tok.expires_at)


def csrf_ok(doc: dict[str, Any] | None, sent: str | None) -> bool:
    want = doc.get("c") if doc else None
    return bool(want and sent) and hmac.compare_digest(str(want), str(sent))


def origin_ok(origin: str | None, host_url: str) -> bool:
    """A form post from this site: no ``Origin`` (older clients) or the same origin."""
    return origin is None or origin.rstrip("/") == host_url.rstrip("/")


def login_allowed(s: Session, client: str, now: float) -> bool:
    """Fewer failed logins in the window than the limit, from this client and from all."""
    since = now - LOGIN_WINDOW_S
    base = (
        select(func.count())
        .select_from(AuditRecord)
        .where(AuditRecord.at > since, AuditRecord.action == "dashboard.login_failed")
    )
    mine = s.scalar(base.where(AuditRecord.target == client[:128])) or 0
    if mine >= LOGIN_MAX_FAILURES_PER_CLIENT:
        return False
    return (s.scalar(base) or 0) < LOGIN_MAX_FAILURES_ALL


def record(
    s: Session, actor: str, action: str, target: str, detail: dict[str, Any] | None = None
) -> None:
    s.add(
        AuditRecord(
            at=time.time(), actor=actor[:160], action=action, target=target[:128], detail=detail
        )
    )
