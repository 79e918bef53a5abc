"""Device identity from a TLS-terminating reverse proxy that verified the device's certificate
(mutual TLS, for sites with a device PKI; docs/serving/fleet-mtls.md). No CA is built here.

The proxy (nginx) verifies the client certificate against the site's device CA and passes, on
every device request, three headers it always overwrites:

* ``X-Ota-Proxy-Secret`` - a secret shared by the proxy and the service only: the identity
  headers are trusted from a request that carries it, never from anyone else;
* ``X-Ota-Client-Verify`` - nginx's ``$ssl_client_verify`` (``SUCCESS`` when verified);
* ``X-Ota-Client-Dn`` - nginx's ``$ssl_client_s_dn`` (RFC 2253, e.g. ``CN=cam-001,O=Acme``).

Enabled by ``OTA_FLEET_MTLS_SECRET_FILE`` (a file holding that secret, 32-256 printable
characters). Then every device route requires a verified certificate whose subject CN is the
device id the request acts for (the path's id; the body's ``device_id`` on enrolment), on top
of the credential or enrolment token: a stolen credential is useless without the device's
private key, and a certificate can act for its own device only. Operator routes are untouched.
Without the variable this module does nothing and the headers mean nothing.

Refusals are JSON 401 (``mtls_required``: not through the proxy, or no verified certificate)
or 403 (``mtls_identity``: the certificate names another device).
"""

from __future__ import annotations

import hmac
import io
import json
import os
import re
from pathlib import Path

from flask import Flask, Response, g, jsonify, request

SECRET_ENV = "OTA_FLEET_MTLS_SECRET_FILE"  # noqa: S105 - a variable name
SECRET_HEADER = "X-Ota-Proxy-Secret"  # noqa: S105 - a header name
VERIFY_HEADER = "X-Ota-Client-Verify"
DN_HEADER = "X-Ota-Client-Dn"
_SECRET_RE = re.compile(r"[\x21-\x7e]{32,256}")
_DEVICE_PATH = re.compile(r"^/v1/devices/([^/]+)/(events|credential)\Z")
_MAX_DN = 1024
_MAX_ENROL_BODY = 64 * 1024


class MtlsConfigError(ValueError):
    """The secret file is missing or not a secret: the service must not start half-protected."""


def load_secret(path: str) -> str:
    """The shared proxy secret in ``path``.

    Raises:
        MtlsConfigError: unreadable, or not 32-256 printable characters.
    """
    try:
        text = Path(path).read_bytes()[:1024].decode("ascii", "replace").strip()
    except OSError as e:
        raise MtlsConfigError(f"cannot read {SECRET_ENV} file {path}: {e.strerror}") from e
    if not _SECRET_RE.fullmatch(text):
        raise MtlsConfigError(f"{path} must hold one word of 32-256 printable characters")
    return text


def common_name(dn: str) -> str | None:
    """The single CN of an RFC 2253 subject DN, or None (absent, repeated, escaped, too long).
    Escapes are refused rather than decoded: a device id never needs one."""
    if not dn or len(dn) > _MAX_DN or "\\" in dn or '"' in dn:
        return None
    cns = [
        part[3:] for part in (p.strip() for p in dn.split(",")) if part.upper().startswith("CN=")
    ]
    if len(cns) != 1 or not cns[0] or "+" in cns[0]:
        return None
    return cns[0]


def register_mtls(app: Flask, secret: str | None = None) -> bool:
    """Require a proxy-verified certificate on ``app``'s device routes when a secret is given
    (or ``OTA_FLEET_MTLS_SECRET_FILE`` is set). Returns whether it is enabled.

    Raises:
        MtlsConfigError: the variable is set but its file holds no valid secret.
    """
    if secret is None:
        path = os.environ.get(SECRET_ENV, "").strip()
        if not path:
            return False
        secret = load_secret(path)
    expected = secret.encode()

    def refuse(status: int, reason: str, message: str) -> Response:
        g.ota_reject = reason  # counted by the metrics
        resp = jsonify(error=reason, message=message)
        resp.status_code = status
        return resp

    @app.before_request
    def _mtls() -> Response | None:
        if request.method != "POST":
            return None
        m = _DEVICE_PATH.match(request.path)
        if m is None and request.path != "/v1/enroll":
            return None
        refusal = _refusal(expected, m.group(1) if m is not None else None)
        return refuse(*refusal) if refusal else None

    return True


def _refusal(expected: bytes, path_device: str | None) -> tuple[int, str, str] | None:
    """Why this device request is refused (status, reason, message), or None."""
    given = request.headers.get(SECRET_HEADER, "").encode("latin-1", "replace")
    if not hmac.compare_digest(given, expected):
        return (
            401,
            "mtls_required",
            "device requests must come through the TLS proxy that verifies certificates",
        )
    if request.headers.get(VERIFY_HEADER) != "SUCCESS":
        return 401, "mtls_required", "no verified device certificate"
    cn = common_name(request.headers.get(DN_HEADER, ""))
    if cn is None:
        return 401, "mtls_required", "the certificate's subject has no single CN"
    acting = path_device if path_device is not None else _enrol_device_id()
    if acting != cn:
        return 403, "mtls_identity", "the certificate names another device"
    return None


def _enrol_device_id() -> str | None:
    """The ``device_id`` of an enrolment body, read without consuming it for the route (the
    body is put back). None when it cannot be read; the route then refuses the body."""
    length = request.content_length
    if length is None or length > _MAX_ENROL_BODY:
        return None
    raw = request.stream.read(_MAX_ENROL_BODY + 1)
    request.environ["wsgi.input"] = io.BytesIO(raw)
    request.environ["CONTENT_LENGTH"] = str(len(raw))
    request.__dict__.pop("stream", None)  # werkzeug caches the stream: read the new one
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    device_id = doc.get("device_id") if isinstance(doc, dict) else None
    return device_id if isinstance(device_id, str) else None
