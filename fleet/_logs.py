"""Structured logs: one JSON object per line on stderr, for the service's own logger
(``ota.fleet``), gunicorn's error and access logs, and one line per refused request.

A line: ``{"time": ISO 8601 UTC, "level", "logger", "message", ...fields}``; fields a caller
passes with ``extra={"fields": {...}}`` are merged in (refusals carry ``method``, ``route``,
``status``, ``reason``, ``duration_ms``). Successful requests are counted by the metrics, not
logged (``ota fleet serve --access-log`` adds gunicorn's access lines). Values are bounded
(``MAX_FIELD_CHARS``), so a device cannot fill the log with one request.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from typing import Any

from flask import Flask, Response, g, request

MAX_FIELD_CHARS = 512
REQUEST_LOGGER = "ota.fleet.request"


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON line."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": _bounded(record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for k, v in fields.items():
                doc.setdefault(
                    str(k),
                    v if isinstance(v, (int, float, bool)) or v is None else _bounded(str(v)),
                )
        if record.exc_info and record.exc_info[0] is not None:
            doc["error_type"] = record.exc_info[0].__name__
            doc["traceback"] = _bounded(self.formatException(record.exc_info), 4000)
        return json.dumps(doc, ensure_ascii=True)


def _bounded(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def gunicorn_logconfig() -> dict[str, Any]:
    """gunicorn's ``logconfig_dict``: every logger as JSON lines on stderr."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"json_stderr": handler},
        "root": {"level": "INFO", "handlers": ["json_stderr"]},
        "loggers": {
            name: {
                "level": "INFO",
                "handlers": ["json_stderr"],
                "propagate": False,
                "qualname": name,
            }
            for name in ("gunicorn.error", "gunicorn.access")
        },
    }


def register_request_log(app: Flask) -> None:
    """Log every refused request (4xx/5xx) of ``app`` as one structured line."""
    log = logging.getLogger(REQUEST_LOGGER)

    @app.after_request
    def _log(resp: Response) -> Response:
        if resp.status_code >= 400:
            t0 = g.get("ota_t0")
            fields = {
                "method": request.method,
                "route": request.endpoint or "unmatched",
                "status": resp.status_code,
                "reason": str(g.get("ota_reject") or ""),
                "remote": request.remote_addr or "",
                "duration_ms": round(1000 * (time.perf_counter() - t0), 2) if t0 else None,
            }
            level = logging.ERROR if resp.status_code >= 500 else logging.INFO
            log.log(level, "request refused", extra={"fields": fields})
        return resp
