"""The OpenAPI 3.1 description of the fleet service, served at ``/v1/openapi.json``.

Tests validate it (openapi-spec-validator through schemathesis) and run schemathesis over it:
every response must match the schema given here, so keep the two in step.
"""

from __future__ import annotations

import functools
from typing import Any

_STR = {"type": "string"}
_NUM = {"type": "number"}
_INT = {"type": "integer"}
_BOOL = {"type": "boolean"}
_NULLNUM = {"type": ["number", "null"]}
_NAME = {"type": "string", "maxLength": 128, "pattern": r"^[A-Za-z0-9][A-Za-z0-9._:@+/-]*$"}
_TOKEN_NAME = {"type": "string", "maxLength": 64, "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]*$"}
_DEVICE_ID = {
    "type": "string",
    "minLength": 1,
    "maxLength": 128,
    "pattern": r"^[A-Za-z0-9_][A-Za-z0-9._:-]*$",  # ota.bundle.DEVICE_ID_RE (ECMA: $ = end)
}


def _obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": required or list(props)}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _err(desc: str) -> dict[str, Any]:
    return {"description": desc, **_json(_ref("Error"))}


_ERRORS = {
    "400": _err("malformed input"),
    "401": _err("no valid credential"),
    "413": _err("body too large"),
    "415": _err("not JSON"),
    "503": _err("database unavailable"),
}
_OP_ERRORS = {**_ERRORS, "403": _err("token lacks the scope")}


def _op(
    summary: str,
    ok: dict[str, Any],
    *,
    status: str = "200",
    scope: str | None = None,
    body: dict[str, Any] | None = None,
    params: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            status: {"description": "ok", **_json(ok)},
            **(_OP_ERRORS if scope else _ERRORS),
            **(extra or {}),
        },
    }
    if scope:
        op["security"] = [{"operator": []}]
        op["description"] = f"Needs an operator token with the `{scope}` scope or above."
    if body is not None:
        op["requestBody"] = {"required": True, **_json(body)}
    if params:
        op["parameters"] = params
    return op


def _path(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


_SCHEMAS: dict[str, Any] = {
    "Error": _obj({"error": _STR, "message": _STR}),
    "Facts": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "ring": _NAME,
            "tier": _NAME,
            "arch": {"type": "string", "maxLength": 64},
            "runtime_version": {"type": "string", "maxLength": 64},
            "client_version": {"type": "string", "maxLength": 64},
        },
    },
    "Report": {
        "type": "object",
        "additionalProperties": False,
        "required": ["format", "device", "queue", "events"],
        "properties": {
            "format": {"const": "edge-ota.report/1"},
            "device": {
                "type": "object",
                "required": ["id"],
                "properties": {
                    "id": _DEVICE_ID,
                    "ring": _STR,
                    "tier": _STR,
                    "arch": _STR,
                    "runtime_version": _STR,
                    "client_version": _STR,
                    "models": {
                        "type": "object",
                        "additionalProperties": _obj(
                            {"version": _STR, "counter": _INT}, ["version"]
                        ),
                    },
                },
            },
            "queue": {"type": "string", "minLength": 1, "maxLength": 64},
            "dropped": {"type": "integer", "minimum": 0},
            "events": {
                "type": "array",
                "items": _obj(
                    {
                        "seq": {"type": "integer", "minimum": 1},
                        "time": _NUM,
                        "kind": _STR,
                        "model": _STR,
                        "version": _STR,
                        "data": {"type": "object"},
                    },
                    ["seq", "time", "kind"],
                ),
            },
        },
    },
    "Device": _obj(
        {
            "device_id": _STR,
            "ring": _STR,
            "tier": _STR,
            "claimed": _obj({"ring": _STR, "tier": _STR}),
            "claims_changed": _BOOL,
            "claims_note": _STR,
            "arch": _STR,
            "runtime_version": _STR,
            "client_version": _STR,
            "enrolled_at": _NUM,
            "revoked": _BOOL,
            "revoked_at": _NULLNUM,
            "last_seen": _NULLNUM,
            "last_device_time": _NULLNUM,
            "last_kind": _STR,
            "health": {"enum": ["unknown", "ok", "failing", "security"]},
            "last_outcome": _obj({"kind": _STR, "model": _STR, "version": _STR, "at": _NULLNUM}),
            "events_total": _INT,
            "dropped_total": _INT,
            "models": {
                "type": "object",
                "additionalProperties": _obj({"version": _STR, "counter": _INT}),
            },
        }
    ),
    "DeviceDetail": {
        "allOf": [
            _ref("Device"),
            _obj(
                {
                    "releases": {
                        "type": "array",
                        "items": _obj(
                            {
                                "model": _STR,
                                "version": _STR,
                                "state": _STR,
                                "detail": {},
                                "updated_at": _NUM,
                            }
                        ),
                    },
                    "timeline": {
                        "type": "array",
                        "items": _obj(
                            {
                                "seq": _INT,
                                "queue": _STR,
                                "kind": _STR,
                                "model": _STR,
                                "version": _STR,
                                "device_time": _NUM,
                                "received_at": _NUM,
                                "data": {},
                            }
                        ),
                    },
                }
            ),
        ]
    },
    "OperatorToken": _obj(
        {
            "name": _STR,
            "scope": {"enum": ["read", "rollout", "admin"]},
            "created_at": _NUM,
            "created_by": _STR,
            "expires_at": _NULLNUM,
            "revoked_at": _NULLNUM,
            "active": _BOOL,
        }
    ),
    "EnrollToken": _obj(
        {
            "name": _STR,
            "ring": _STR,
            "tier": _STR,
            "max_uses": _INT,
            "uses": _INT,
            "created_at": _NUM,
            "created_by": _STR,
            "expires_at": _NUM,
            "revoked_at": _NULLNUM,
            "active": _BOOL,
        }
    ),
}


_ENROLLED = _obj({"device_id": _STR, "credential": _STR, "ring": _STR, "tier": _STR})


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The whole document (built once per process)."""
    counts = {"type": "object", "additionalProperties": _INT}
    paths: dict[str, Any] = {
        "/v1/enroll": {
            "post": _op(
                "Exchange an enrolment token for a device credential (idempotent with a "
                "credential_proposal: a retry of a committed enrolment answers 200)",
                _ENROLLED,
                status="201",
                body={
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["token", "device_id"],
                    "properties": {
                        "token": {"type": "string", "maxLength": 128},
                        "device_id": _DEVICE_ID,
                        "facts": _ref("Facts"),
                        "credential_proposal": {
                            "type": "string",
                            "maxLength": 514,
                            "pattern": r"^[A-Za-z0-9_\-.~+/]{43,512}={0,2}$",
                        },
                    },
                },
                extra={
                    "200": {
                        "description": "the same enrolment again (same device id, proposal "
                        "and token): nothing written, no token use spent",
                        **_json(_ENROLLED),
                    },
                    "409": _err(
                        "device id already enrolled, or the proposed credential is not fresh"
                    ),
                },
            )
        },
        "/v1/devices/{device_id}/events": {
            "post": {
                **_op(
                    "Report events (edge-ota.report/1); answers the highest seq stored",
                    _obj({"ack": {"type": "integer", "minimum": 0}}),
                    body=_ref("Report"),
                    params=[_path("device_id", _DEVICE_ID)],
                    extra={"429": _err("reporting too often; see Retry-After")},
                ),
                "security": [{"device": []}],
            }
        },
        "/v1/devices/{device_id}/credential": {
            "post": {
                **_op(
                    "Rotate the device credential; the old one stops working at once",
                    _obj({"credential": _STR}),
                    params=[_path("device_id", _DEVICE_ID)],
                ),
                "requestBody": {
                    "required": False,
                    **_json(
                        {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "credential": {
                                    "type": "string",
                                    "minLength": 43,
                                    "maxLength": 128,
                                    "pattern": r"^[A-Za-z0-9_\-.~+/]+={0,2}$",
                                }
                            },
                        }
                    ),
                },
                "security": [{"device": []}],
            }
        },
        "/v1/health": {"get": _op("Database reachable", _obj({"ok": _BOOL}))},
        "/v1/fleet": {
            "get": _op(
                "Fleet summary",
                _obj(
                    {
                        "generated_at": _NUM,
                        "as_of": _NUM,
                        "devices": _obj(
                            {
                                "total": _INT,
                                "active": _INT,
                                "revoked": _INT,
                                "silent": _INT,
                                "flagged": _INT,
                                "by_health": counts,
                            }
                        ),
                        "events_received": _INT,
                        "releases": {
                            "type": "array",
                            "items": _obj(
                                {
                                    "model": _STR,
                                    "version": _STR,
                                    "states": counts,
                                    "confirmed": _INT,
                                }
                            ),
                        },
                        "models": {
                            "type": "array",
                            "items": _obj(
                                {
                                    "model": _STR,
                                    "version": _STR,
                                    "ring": _STR,
                                    "tier": _STR,
                                    "devices": _INT,
                                }
                            ),
                        },
                    }
                ),
                scope="read",
                params=[_query("max_age", {"type": "integer", "minimum": 0, "maximum": 86400})],
            )
        },
        "/v1/devices": {
            "get": _op(
                "Devices, filtered, one page at a time (pass `next` as `after`)",
                _obj(
                    {
                        "devices": {"type": "array", "items": _ref("Device")},
                        "next": {"type": ["string", "null"]},
                    }
                ),
                scope="read",
                params=[
                    _query("model", _NAME),
                    _query("version", _NAME),
                    _query("ring", _NAME),
                    _query("tier", _NAME),
                    _query("health", {"enum": ["unknown", "ok", "failing", "security"]}),
                    _query("seen_after", {"type": "number", "minimum": 0, "maximum": 1e11}),
                    _query("seen_before", {"type": "number", "minimum": 0, "maximum": 1e11}),
                    _query("revoked", {"enum": ["true", "false"]}),
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
                    _query("after", _DEVICE_ID),
                ],
            )
        },
        "/v1/devices/{device_id}": {
            "get": _op(
                "One device: facts, models, releases, event timeline",
                _ref("DeviceDetail"),
                scope="read",
                params=[
                    _path("device_id", _DEVICE_ID),
                    _query("events", {"type": "integer", "minimum": 0, "maximum": 1000}),
                ],
                extra={"404": _err("no such device")},
            )
        },
        "/v1/devices/{device_id}/revoke": {
            "post": _op(
                "Revoke a device: its credential stops working",
                _ref("Device"),
                scope="admin",
                params=[_path("device_id", _DEVICE_ID)],
                extra={"404": _err("no such device")},
            )
        },
        "/v1/releases/{model}/{version}": {
            "get": _op(
                "Devices by state for one release, with failure figures",
                _obj(
                    {
                        "model": _STR,
                        "version": _STR,
                        "states": counts,
                        "confirmed": _INT,
                        "running": _INT,
                        "failures": {
                            "type": "array",
                            "items": _obj(
                                {"device_id": _STR, "state": _STR, "detail": {}, "updated_at": _NUM}
                            ),
                        },
                    }
                ),
                scope="read",
                params=[
                    _path("model", _NAME),
                    _path("version", _NAME),
                    _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
                ],
            )
        },
        "/v1/enroll-tokens": {
            "get": _op(
                "Enrolment tokens",
                _obj({"tokens": {"type": "array", "items": _ref("EnrollToken")}}),
                scope="admin",
            ),
            "post": _op(
                "Create an enrolment token (the secret is shown once)",
                {"allOf": [_ref("EnrollToken"), _obj({"token": _STR})]},
                status="201",
                scope="admin",
                extra={"409": _err("name taken")},
                body={
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "name": _TOKEN_NAME,
                        "uses": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
                        "expires_in": {"type": "integer", "minimum": 60, "maximum": 366 * 86400},
                        "ring": _NAME,
                        "tier": _NAME,
                    },
                },
            ),
        },
        "/v1/enroll-tokens/{name}/revoke": {
            "post": _op(
                "Revoke an enrolment token",
                _ref("EnrollToken"),
                scope="admin",
                params=[_path("name", _TOKEN_NAME)],
                extra={"404": _err("no such token")},
            )
        },
        "/v1/tokens": {
            "get": _op(
                "Operator tokens",
                _obj({"tokens": {"type": "array", "items": _ref("OperatorToken")}}),
                scope="admin",
            ),
            "post": _op(
                "Create an operator token (the secret is shown once)",
                {"allOf": [_ref("OperatorToken"), _obj({"token": _STR})]},
                status="201",
                scope="admin",
                extra={"409": _err("name taken")},
                body={
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name", "scope"],
                    "properties": {
                        "name": _TOKEN_NAME,
                        "scope": {"enum": ["read", "rollout", "admin"]},
                        "expires_in": {"type": "integer", "minimum": 60, "maximum": 366 * 86400},
                    },
                },
            ),
        },
        "/v1/tokens/{name}/revoke": {
            "post": _op(
                "Revoke an operator token",
                _ref("OperatorToken"),
                scope="admin",
                params=[_path("name", _TOKEN_NAME)],
                extra={"404": _err("no such token")},
            )
        },
        "/v1/audit": {
            "get": _op(
                "Audit log of state-changing calls, newest first",
                _obj(
                    {
                        "records": {
                            "type": "array",
                            "items": _obj(
                                {
                                    "at": _NUM,
                                    "actor": _STR,
                                    "action": _STR,
                                    "target": _STR,
                                    "detail": {},
                                }
                            ),
                        }
                    }
                ),
                scope="admin",
                params=[_query("limit", {"type": "integer", "minimum": 1, "maximum": 1000})],
            )
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "edge-ota fleet service",
            "version": "1",
            "description": "Device enrolment and reports (edge-ota.report/1), fleet "
            "state and operator API. Errors are JSON "
            "{error, message}.",
        },
        "paths": paths,
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {
                "operator": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "operator token (otaop_…)",
                },
                "device": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "device credential from /v1/enroll",
                },
            },
        },
    }
