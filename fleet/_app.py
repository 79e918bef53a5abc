"""The Flask app: routes, authentication, JSON errors, transactions.

Invariants:

* every request runs in at most one database transaction; any refusal (:class:`Rejected`),
  database failure or bug rolls it back, so nothing is ever half-written;
* every error is a JSON object ``{"error": reason, "message": text}`` with a 4xx status, or
  503 (with ``Retry-After``) when the database cannot be reached or is locked; a 500 means a
  bug, and is logged;
* the app keeps no state between requests beyond its connection pool: any number of workers
  and machines can share one database.

Hooks for ``ota.fleet._metrics`` (``register_metrics(app)`` is called when that module
exists): ``flask.g.ota_reject`` is the reason of a refused request, ``flask.g.ota_ingested``
the number of new events a report stored; ``app.extensions["ota_fleet"]`` holds ``engine``,
``read_engine`` (use it for queries that only read: no write lock on SQLite) and ``config``.
"""

from __future__ import annotations

import getpass
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from flask import Flask, Response, g, jsonify, request
from sqlalchemy import Engine, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException

from . import _ingest, _secrets, _store, _summary
from ._config import FleetConfig
from ._db import make_engine, read_only
from ._openapi import openapi_document
from ._report import parse_facts, parse_report
from ._validate import (
    DEVICE_ID_RE,
    NAME_RE,
    TOKEN_NAME_RE,
    Rejected,
    bad,
    device_filters,
    integer,
    obj,
    only_keys,
    parse_json,
    string,
)

log = logging.getLogger("ota.fleet")
T = TypeVar("T")
DEFAULT_OPERATOR_LIFETIME_S = 90 * 86400
DEFAULT_ENROLL_LIFETIME_S = 7 * 86400
MAX_ENROLL_USES = 1_000_000


def local_actor() -> str:
    """The audit name of an operator working on the database directly (the CLI)."""
    try:
        return f"local:{getpass.getuser()}"
    except (KeyError, OSError):
        return "local:unknown"


class _Ctx:
    """What the routes share: the config, the engine, transactions and body parsing."""

    def __init__(self, config: FleetConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self.read_engine = read_only(engine)

    @contextmanager
    def tx(self) -> Iterator[Session]:
        """One transaction; GET and HEAD requests get a read transaction (on SQLite a
        deferred ``BEGIN``: in WAL mode reads never wait for, nor hold up, a writer)."""
        read = request.method in ("GET", "HEAD")
        with (
            Session(self.read_engine if read else self.engine, expire_on_commit=False) as s,
            s.begin(),
        ):
            yield s

    def body(self, limit: int) -> Any:
        if request.mimetype != "application/json":
            raise Rejected(415, "unsupported_media_type", "send application/json")
        length = request.content_length
        if length is not None and length > limit:
            raise Rejected(413, "too_large", f"the body exceeds {limit} bytes")
        raw = request.stream.read(limit + 1)
        return parse_json(raw, limit, self.config.max_json_depth)

    def operator(self, s: Session, need: str) -> str:
        tok = _store.authenticate_operator(
            s, _secrets.bearer(request.headers.get("Authorization")), need, time.time()
        )
        return f"token:{tok.name}"

    def op_read(self, fn: Callable[[Session], T]) -> T:
        with self.tx() as s:
            self.operator(s, "read")
            return fn(s)


def create_app(config: FleetConfig, engine: Engine | None = None) -> Flask:
    """A fleet service app on ``config.db_url`` (already migrated: ``ota fleet migrate``)."""
    app = Flask("ota.fleet", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = config.max_report_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    eng = engine or make_engine(config)
    app.extensions["ota_fleet"] = {"engine": eng, "read_engine": read_only(eng), "config": config}
    ctx = _Ctx(config, eng)
    _error_handlers(app)
    _device_routes(app, ctx)
    _read_routes(app, ctx)
    _admin_routes(app, ctx)
    try:
        from ._metrics import register_metrics  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        pass
    else:
        register_metrics(app)
    from ._mtls import register_mtls  # device certificates via a TLS proxy, when configured

    register_mtls(app)
    __import__("ota.dashboard").dashboard.register(app)  # issue 10: the operator dashboard
    return app


def _error_handlers(app: Flask) -> None:
    # --- errors --------------------------------------------------------------------------

    @app.errorhandler(Rejected)
    def _rejected(e: Rejected) -> tuple[Response, int, dict[str, str]]:
        g.ota_reject = e.reason
        return jsonify(error=e.reason, message=e.message), e.status, e.headers

    @app.errorhandler(HTTPException)
    def _http(e: HTTPException) -> tuple[Response, int]:
        reason = (e.name or "error").lower().replace(" ", "_")
        g.ota_reject = reason
        return jsonify(error=reason, message=e.description or e.name), e.code or 400

    @app.errorhandler(sa_exc.IntegrityError)
    def _integrity(e: sa_exc.IntegrityError) -> tuple[Response, int]:
        g.ota_reject = "conflict"
        return jsonify(error="conflict", message="a concurrent change conflicted; retry"), 409

    @app.errorhandler(sa_exc.DataError)
    def _data(e: sa_exc.DataError) -> tuple[Response, int]:
        g.ota_reject = "malformed"
        return jsonify(error="malformed", message="a value does not fit the database"), 400

    @app.errorhandler(sa_exc.OperationalError)
    @app.errorhandler(sa_exc.InterfaceError)
    @app.errorhandler(sa_exc.TimeoutError)
    @app.errorhandler(sa_exc.DisconnectionError)
    def _db_down(e: Exception) -> tuple[Response, int, dict[str, str]]:
        g.ota_reject = "unavailable"
        log.warning("database unavailable: %s", str(e).splitlines()[0][:200])
        return (
            jsonify(error="unavailable", message="the database is unavailable; retry"),
            503,
            {"Retry-After": "5"},
        )

    @app.errorhandler(Exception)
    def _bug(e: Exception) -> tuple[Response, int]:
        if isinstance(e, sa_exc.DBAPIError) and e.connection_invalidated:
            return _db_down(e)[:2]
        g.ota_reject = "internal"
        log.exception("internal error")
        return jsonify(error="internal", message="internal error"), 500


def _device_routes(app: Flask, ctx: _Ctx) -> None:
    config, tx, body = ctx.config, ctx.tx, ctx.body

    # --- device API ----------------------------------------------------------------------

    @app.post("/v1/enroll")
    def enroll() -> tuple[Response, int]:
        doc = obj(body(config.max_request_bytes), "the request")
        only_keys(doc, {"token", "device_id", "facts", "credential_proposal"}, "the request")
        token = string(doc, "token", max_len=_secrets.MAX_SECRET_CHARS)
        device_id = string(doc, "device_id", max_len=128, pattern=DEVICE_ID_RE)
        if not device_id:
            raise bad("'device_id' is required")
        proposal = string(
            doc, "credential_proposal", max_len=514, required=False, pattern=_ingest.PROPOSED_RE
        )
        if "credential_proposal" in doc and not proposal:
            raise bad("'credential_proposal' must be 43-512 characters of base64url")
        facts = parse_facts(doc.get("facts", {}))
        with tx() as s:
            e = _ingest.enroll(s, token, device_id, facts, time.time(), proposal or None)
        # 200: a retry of an enrolment already committed (its reply was lost); 201: new
        status = 200 if e.replayed else 201
        reply = jsonify(device_id=e.device_id, credential=e.credential, ring=e.ring, tier=e.tier)
        return reply, status

    def device_secret(device_id: str) -> str:
        secret = _secrets.bearer(request.headers.get("Authorization"))
        if not secret or not DEVICE_ID_RE.match(device_id):
            raise _ingest.unauthorized()
        return secret

    @app.post("/v1/devices/<device_id>/events")
    def events(device_id: str) -> Response:
        secret = device_secret(device_id)
        report = parse_report(body(config.max_report_bytes), device_id, config)
        now = time.time()
        with tx() as s:
            dev = _ingest.authenticate_report(s, device_id, secret)
            _ingest.check_rate(dev, config, now)
            ack, stored = _ingest.ingest(s, dev, report, now)
        g.ota_ingested = stored
        return jsonify(ack=ack)

    @app.post("/v1/devices/<device_id>/credential")
    def credential(device_id: str) -> Response:
        secret = device_secret(device_id)
        proposed = None
        if request.content_length or request.mimetype == "application/json":
            doc = obj(body(config.max_request_bytes), "the request")
            only_keys(doc, {"credential"}, "the request")
            proposed = string(doc, "credential", max_len=512, required=False) or None
        with tx() as s:
            dev = _ingest.authenticate(s, device_id, secret)
            new = _ingest.rotate(s, dev, proposed, time.time())
        return jsonify(credential=new)


def _read_routes(app: Flask, ctx: _Ctx) -> None:
    config, tx, op_read = ctx.config, ctx.tx, ctx.op_read

    # --- operator API --------------------------------------------------------------------

    @app.get("/v1/health")
    def health() -> Response:
        with tx() as s:
            s.execute(text("SELECT 1"))
        return jsonify(ok=True)

    @app.get("/v1/openapi.json")
    def openapi() -> Response:
        return jsonify(openapi_document())

    @app.get("/v1/fleet")
    def fleet() -> Response:
        age = _int_arg("max_age", int(config.summary_max_age_s), 0, 86400)
        op_read(lambda s: None)  # the token is checked before anything is counted
        return jsonify(
            _summary.cached_summary(
                ctx.engine, ctx.read_engine, time.time(), config.silent_after_s, age
            )
        )

    @app.get("/v1/devices")
    def devices() -> Response:
        args = _query_args()
        return jsonify(op_read(lambda s: _store.list_devices(s, **args)))

    @app.get("/v1/devices/<device_id>")
    def device(device_id: str) -> Response:
        n = _int_arg("events", config.timeline_events, 0, 1000)
        return jsonify(op_read(lambda s: _store.device_detail(s, device_id, n)))

    @app.get("/v1/releases/<model>/<version>")
    def release(model: str, version: str) -> Response:
        n = _int_arg("limit", 100, 1, 1000)
        return jsonify(op_read(lambda s: _store.release_detail(s, model, version, n)))


def _admin_routes(app: Flask, ctx: _Ctx) -> None:
    config, tx, body, operator = ctx.config, ctx.tx, ctx.body, ctx.operator

    @app.post("/v1/devices/<device_id>/revoke")
    def revoke_device(device_id: str) -> Response:
        with tx() as s:
            actor = operator(s, "admin")
            return jsonify(_store.revoke_device(s, device_id, actor, time.time()))

    @app.get("/v1/enroll-tokens")
    def enroll_tokens() -> Response:
        with tx() as s:
            operator(s, "admin")
            return jsonify(tokens=_store.list_enroll_tokens(s, time.time()))

    @app.post("/v1/enroll-tokens")
    def create_enroll_token() -> tuple[Response, int]:
        with tx() as s:
            actor = operator(s, "admin")
            doc = obj(body(config.max_request_bytes), "the request")
            only_keys(doc, {"name", "uses", "expires_in", "ring", "tier"}, "the request")
            name = string(
                doc, "name", max_len=64, pattern=TOKEN_NAME_RE, required=False
            ) or _auto_name("enroll")
            secret, info = _store.create_enroll_token(
                s,
                name,
                integer(doc, "uses", lo=1, hi=MAX_ENROLL_USES, required=False, default=1),
                integer(
                    doc,
                    "expires_in",
                    lo=60,
                    hi=_store.MAX_TOKEN_LIFETIME_S,
                    required=False,
                    default=DEFAULT_ENROLL_LIFETIME_S,
                ),
                string(doc, "ring", max_len=64, required=False, pattern=NAME_RE),
                string(doc, "tier", max_len=64, required=False, pattern=NAME_RE),
                actor,
                time.time(),
            )
        return jsonify(token=secret, **info), 201

    @app.post("/v1/enroll-tokens/<name>/revoke")
    def revoke_enroll_token(name: str) -> Response:
        with tx() as s:
            actor = operator(s, "admin")
            return jsonify(_store.revoke_enroll_token(s, name, actor, time.time()))

    @app.get("/v1/tokens")
    def tokens() -> Response:
        with tx() as s:
            operator(s, "admin")
            return jsonify(tokens=_store.list_operator_tokens(s, time.time()))

    @app.post("/v1/tokens")
    def create_token() -> tuple[Response, int]:
        with tx() as s:
            actor = operator(s, "admin")
            doc = obj(body(config.max_request_bytes), "the request")
            only_keys(doc, {"name", "scope", "expires_in"}, "the request")
            name = string(doc, "name", max_len=64, pattern=TOKEN_NAME_RE)
            if not name:
                raise bad("'name' is required")
            secret, info = _store.create_operator_token(
                s,
                name,
                string(doc, "scope", max_len=16),
                integer(
                    doc,
                    "expires_in",
                    lo=60,
                    hi=_store.MAX_TOKEN_LIFETIME_S,
                    required=False,
                    default=DEFAULT_OPERATOR_LIFETIME_S,
                ),
                actor,
                time.time(),
            )
        return jsonify(token=secret, **info), 201

    @app.post("/v1/tokens/<name>/revoke")
    def revoke_token(name: str) -> Response:
        with tx() as s:
            actor = operator(s, "admin")
            return jsonify(_store.revoke_operator_token(s, name, actor, time.time()))

    @app.get("/v1/audit")
    def audit() -> Response:
        n = _int_arg("limit", 100, 1, 1000)
        with tx() as s:
            operator(s, "admin")
            return jsonify(records=_store.audit_log(s, n))


def _auto_name(prefix: str) -> str:
    import secrets

    return f"{prefix}-{secrets.token_hex(4)}"


def _int_arg(key: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(key)
    if raw is None:
        return default
    # ASCII only: str.isdigit() admits "²", which int() refuses (a 500), and Arabic-Indic digits
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 12 or not lo <= int(raw) <= hi:
        raise bad(f"{key!r} must be an integer between {lo} and {hi}")
    return int(raw)


def _float_arg(key: str) -> float | None:
    raw = request.args.get(key)
    if raw is None:
        return None
    try:
        v = float(raw)
    except ValueError:
        v = float("nan")
    if not 0 <= v <= 1e11:  # also refuses NaN
        raise bad(f"{key!r} must be a UNIX time")
    return v


def _query_args() -> dict[str, Any]:
    args: dict[str, Any] = dict(device_filters(request.args))
    h = request.args.get("health", "")
    if h and h not in _store.HEALTH:
        raise bad(f"'health' must be one of {', '.join(_store.HEALTH)}")
    args["health"] = h
    args["seen_after"] = _float_arg("seen_after")
    args["seen_before"] = _float_arg("seen_before")
    rv = request.args.get("revoked")
    if rv not in (None, "true", "false"):
        raise bad("'revoked' must be true or false")
    args["revoked"] = None if rv is None else rv == "true"
    args["limit"] = _int_arg("limit", 100, 1, 1000)
    return args
