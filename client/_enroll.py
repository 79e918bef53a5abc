"""The device's identity with the fleet service: enrolment and credential rotation.

Protocol (the fleet service implements the server side)::

    POST <fleet>/v1/enroll
    {"token": <enrolment token>, "device_id": <id>,
     "credential_proposal": <a new secret proposed by the device>,
     "facts": {"ring", "tier", "arch", "runtime_version", "client_version"}}
    -> 201 {"device_id": <id>, "credential": <secret>, "ring": r, "tier": t}
       200 the same, for a retry (same id, proposal and token) of an enrolment that committed
       401 token bad, expired or used up · 409 already enrolled · 400 malformed

    POST <fleet>/v1/devices/<id>/credential          Authorization: Bearer <current>
    {"credential": <a new secret proposed by the device>}
    -> 200 {"credential": <the new secret>}          (the old one stops working at once)
       401 not this device's current credential, or the device is revoked

Files, in ``<state dir>/fleet/`` (folder 0700, files 0600, each written atomically):

* ``credential`` - the one secret the report path sends (``report_token_file`` points here);
* ``credential.next`` - a rotation in flight: the proposed secret, written *before* the
  request, so a lost reply or a crash never loses the working credential: the next
  ``rotate_credential`` tries the pending secret first (the service may already have it),
  then the current one, and keeps whichever the service accepts;
* ``enrolment.next`` - an enrolment in flight: the secret proposed for (fleet URL, device
  id), written *before* the request, so a lost reply or a crash is retried with the same
  proposal and the same token: the service answers the committed enrolment again (200, no
  token use spent) instead of 409. Removed once the credential is stored;
* ``enrolment.json`` - where and as what the device enrolled (fleet URL, device id, ring,
  tier), so a re-run of ``ota device init`` does not spend another token.

A rotation left pending (``credential.next``) is finished by the next ``ota device init``
re-run and the next report flush (:func:`finish_pending_rotation`), without operator action.

Invariants: replies are bounded (``MAX_REPLY_BYTES``, the fetch config's timeouts, one
deadline per request), redirects are refused, a reply must be a JSON object whose credential
matches ``CREDENTIAL_RE``; nothing is written unless the reply is valid. The service is trusted
with diagnostics only: nothing here changes what the device runs.

Exit codes (through the errors raised): 5 the service cannot be reached or is overloaded
(retry), 9 the token or credential is refused (the operator must act: a new token, or
re-enrol), 8 the device id is already enrolled, 3 bad input (token, URL, a 400 from the
service), 4 the reply breaks this protocol (not JSON, oversized, a credential of the wrong
shape or for another device: a wrong or hostile server; nothing is stored).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import urllib3

from ota._atomic import write_bytes
from ota.errors import (
    ConfigError,
    ConflictError,
    InputError,
    LocalError,
    OtaError,
    SecurityError,
    TransientError,
)

from ._fetch import FetchConfig
from ._state import DeviceConfig, StateDir, client_version

MAX_REPLY_BYTES = 8 * 1024
MAX_TOKEN_CHARS = 512
REQUEST_DEADLINE_S = 30.0
# base64url / hex / base64 words: at least 43 characters (256 bits of base64url), at most 512
CREDENTIAL_RE = re.compile(r"[A-Za-z0-9_\-.~+/]{43,512}={0,2}")
_TOKEN_RE = re.compile(r"[\x21-\x7e]{1,512}")  # MAX_TOKEN_CHARS
ENROLMENT_FORMAT = "edge-ota.enrolment/1"
PROPOSAL_FORMAT = "edge-ota.enrolment-proposal/1"
SECRET_PREFIX = "otadev_"  # noqa: S105 - not a secret: what the service's own device credentials start with
# TLS to the fleet service (docs/serving/fleet-mtls.md): the device's client certificate for a
# proxy that requires one, and a private CA for the service's own certificate.
CLIENT_CERT_ENV = "OTA_FLEET_CLIENT_CERT"
CLIENT_KEY_ENV = "OTA_FLEET_CLIENT_KEY"
CA_ENV = "OTA_FLEET_CA"


def fleet_pool(cfg: FetchConfig) -> urllib3.PoolManager:
    """A connection pool for the fleet service: bounded like the repository's (no urllib3
    retries or redirects, the fetch config's timeouts), presenting the device's certificate
    (``OTA_FLEET_CLIENT_CERT``, ``OTA_FLEET_CLIENT_KEY``) and trusting ``OTA_FLEET_CA`` for
    the service when those are set (else the system's CAs).

    Raises:
        ConfigError: a certificate, key or CA file named there does not exist.
    """
    tls: dict[str, Any] = {}
    for env, key in (
        (CLIENT_CERT_ENV, "cert_file"),
        (CLIENT_KEY_ENV, "key_file"),
        (CA_ENV, "ca_certs"),
    ):
        path = os.environ.get(env, "").strip()
        if path:
            if not Path(path).is_file():
                raise ConfigError(f"{env} names {path}, which is not a readable file")
            tls[key] = path
    if "key_file" in tls and "cert_file" not in tls:
        raise ConfigError(f"{CLIENT_KEY_ENV} is set without {CLIENT_CERT_ENV}")
    return urllib3.PoolManager(
        num_pools=4,
        maxsize=max(cfg.parallel, 1),
        block=False,
        retries=False,
        timeout=urllib3.Timeout(connect=cfg.connect_timeout, read=cfg.read_timeout),
        headers={"User-Agent": cfg.user_agent},
        **tls,
    )


@dataclass(frozen=True)
class Enrolment:
    """What ``ensure_enrolled`` did: ``status`` is ``enrolled`` (a token was exchanged) or
    ``already`` (a credential for this fleet URL and device id was kept)."""

    status: str
    fleet_url: str
    device_id: str
    ring: str
    tier: str
    credential_file: str
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "fleet_url": self.fleet_url,
            "device_id": self.device_id,
            "ring": self.ring,
            "tier": self.tier,
            "credential_file": self.credential_file,
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class Rotation:
    """What ``rotate_credential`` did: ``rotated``, or ``resumed`` (a rotation interrupted
    earlier was completed)."""

    status: str
    credential_file: str
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "credential_file": self.credential_file,
            "warnings": list(self.warnings),
        }


def fleet_dir(state_dir: Path | str) -> Path:
    return Path(state_dir) / "fleet"


def credential_path(state_dir: Path | str) -> Path:
    return fleet_dir(state_dir) / "credential"


def _pending_path(state_dir: Path | str) -> Path:
    return fleet_dir(state_dir) / "credential.next"


def _enrolment_path(state_dir: Path | str) -> Path:
    return fleet_dir(state_dir) / "enrolment.json"


def _proposal_path(state_dir: Path | str) -> Path:
    return fleet_dir(state_dir) / "enrolment.next"


def _new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)  # 256 bits


def transport_warnings(url: str) -> tuple[str, ...]:
    """A warning when credentials would cross a network in clear (plain http:// to a host
    that is not loopback).

    Raises:
        InputError: not an http(s) URL with a host.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"the fleet URL must be http(s)://host[:port]: {url[:200]!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise InputError("the fleet URL must not carry a query, fragment or user info")
    if parts.scheme == "https" or _loopback(parts.hostname):
        return ()
    return (
        f"the fleet URL {url} is plain http and not loopback: the device's credential "
        "and reports cross the network unencrypted (use https://)",
    )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ensure_enrolled(
    state_dir: Path | str,
    cfg: DeviceConfig,
    fleet_url: str,
    token: str | None,
    fcfg: FetchConfig | None = None,
) -> Enrolment:
    """Make sure the device holds a credential for ``fleet_url`` as ``cfg.device_id``:
    keep one already there, else exchange ``token`` (once) for one and store it 0600.

    Raises:
        InputError: bad URL or token, or the service answered 400.
        ConfigError: no credential and no token; the token was refused (401/403).
        ConflictError: the device id is already enrolled (409), or another process holds
            the device's fleet lock.
        TransientError: the service cannot be reached, or answered 429/5xx.
        SecurityError: the reply breaks the protocol; nothing was stored.
        LocalError: the credential cannot be written.
    """
    url = fleet_url.rstrip("/")
    warnings = transport_warnings(url)
    cred = credential_path(state_dir)
    with _fleet_lock(state_dir):
        known = _read_enrolment(state_dir)
        if (
            known is not None
            and known.get("fleet_url") == url
            and known.get("device_id") == cfg.device_id
            and cred.exists()
        ):
            read_credential(cred)  # still a valid word
            try:  # a rotation cut short earlier: finish it now, never losing the credential
                _finish_rotation(state_dir, url, cfg.device_id, fcfg, fresh=False)
            except OtaError as e:
                warnings += (f"a pending credential rotation is not finished yet: {e}",)
            return Enrolment(
                "already",
                url,
                cfg.device_id,
                str(known.get("ring", cfg.ring)),
                str(known.get("tier", cfg.tier)),
                str(cred),
                warnings,
            )
        if not token:
            raise ConfigError(
                f"the device is not enrolled with {url}",
                remedy="give the enrolment token an operator created "
                "(`ota fleet enroll-token create`) with --enroll-token",
            )
        token = token.strip()
        if not _TOKEN_RE.fullmatch(token):
            raise InputError(
                "the enrolment token is not one printable word of at most "
                f"{MAX_TOKEN_CHARS} characters"
            )
        facts = cfg.facts()
        body = {
            "token": token,
            "device_id": cfg.device_id,
            "facts": {
                "ring": cfg.ring,
                "tier": cfg.tier,
                "arch": cfg.arch,
                "runtime_version": facts.runtime_version,
                "client_version": client_version(),
            },
        }
        proposal = _enrol_proposal(state_dir, url, cfg.device_id)
        status, doc = _post(
            f"{url}/v1/enroll", {**body, "credential_proposal": proposal}, None, fcfg
        )
        if status == 400 and "credential_proposal" in str(doc.get("message", "")):
            # a service older than proposals: the older request shape (not retry-safe)
            status, doc = _post(f"{url}/v1/enroll", body, None, fcfg)
        if status == 409 and doc.get("error") == "credential_taken":
            _unlink(_proposal_path(state_dir))  # never fresh: the next run proposes another
        if status not in (200, 201):
            raise _refusal(status, doc, "enrolment")
        credential = _credential_of(doc)
        if doc.get("device_id") != cfg.device_id:
            raise SecurityError(
                "the fleet service enrolled another device id "
                f"({str(doc.get('device_id'))[:80]!r}); nothing stored"
            )
        ring = doc.get("ring", cfg.ring)
        tier = doc.get("tier", cfg.tier)
        if not isinstance(ring, str) or not isinstance(tier, str) or max(len(ring), len(tier)) > 64:
            raise SecurityError("the fleet service's enrolment reply has a bad ring or tier")
        _write_secret(cred, credential)
        _unlink(_pending_path(state_dir))
        record = {
            "format": ENROLMENT_FORMAT,
            "fleet_url": url,
            "device_id": cfg.device_id,
            "ring": ring,
            "tier": tier,
            "enrolled_at": int(time.time()),
        }
        write_bytes(
            _enrolment_path(state_dir), json.dumps(record, sort_keys=True).encode(), mode=0o600
        )
        _unlink(_proposal_path(state_dir))  # last: a crash before it only means a replay
    return Enrolment("enrolled", url, cfg.device_id, ring, tier, str(cred), warnings)


def _enrol_proposal(state_dir: Path | str, url: str, device_id: str) -> str:
    """The secret to propose for enrolling ``device_id`` with ``url``: the one stored by an
    earlier attempt for the same pair (its reply may have been lost after the service
    committed it), else a fresh one, stored (0600, atomically) before it is ever sent."""
    path = _proposal_path(state_dir)
    try:
        doc = json.loads(path.read_bytes()[:4096])
    except (OSError, ValueError, RecursionError):
        doc = None
    if (
        isinstance(doc, dict)
        and doc.get("format") == PROPOSAL_FORMAT
        and doc.get("fleet_url") == url
        and doc.get("device_id") == device_id
        and isinstance(doc.get("credential"), str)
        and CREDENTIAL_RE.fullmatch(doc["credential"])
    ):
        return str(doc["credential"])
    proposal = _new_secret()
    record = {
        "format": PROPOSAL_FORMAT,
        "fleet_url": url,
        "device_id": device_id,
        "credential": proposal,
    }
    write_bytes(path, json.dumps(record, sort_keys=True).encode(), mode=0o600)
    return proposal


def rotate_credential(state_dir: Path | str, fcfg: FetchConfig | None = None) -> Rotation:
    """Replace the device's credential with a new one; the old one stops working.

    Crash-safe: the proposed secret is stored (``credential.next``) before the request, and
    the current one is replaced only after the service accepted the new one. A rotation cut
    by a crash or a lost reply is finished by the next call, which tries the pending secret
    first and then the current one.

    Raises:
        ConfigError: not enrolled with a fleet service; both secrets refused (revoked).
        ConflictError: another process is enrolling or rotating.
        TransientError, SecurityError, LocalError: as :func:`ensure_enrolled`.
    """
    sd = StateDir(state_dir)
    cfg = sd.load_config()
    cred = credential_path(state_dir)
    if not cfg.report_url or Path(cfg.report_token_file).resolve() != cred.resolve():
        raise ConfigError(
            "this device has no fleet credential to rotate",
            remedy="enrol it: `ota device init ... --fleet-url URL --enroll-token T`",
        )
    warnings = transport_warnings(cfg.report_url)
    with _fleet_lock(state_dir):
        r = _finish_rotation(state_dir, cfg.report_url, cfg.device_id, fcfg, fresh=True)
    assert r is not None  # fresh=True always rotates or raises
    return Rotation(r.status, r.credential_file, warnings)


def finish_pending_rotation(
    state_dir: Path | str,
    report_url: str,
    device_id: str,
    token_file: str,
    fcfg: FetchConfig | None = None,
) -> Rotation | None:
    """Finish a rotation left pending (``credential.next`` present), as the report path
    does before each flush; ``None`` (and no request) when none is pending or the report
    path does not use the fleet credential.

    Raises:
        as :func:`rotate_credential`; the working credential is kept whatever happens.
    """
    cred = credential_path(state_dir)
    if (
        not report_url
        or not token_file
        or not _pending_path(state_dir).exists()
        or Path(token_file).resolve() != cred.resolve()
    ):
        return None
    with _fleet_lock(state_dir):
        return _finish_rotation(state_dir, report_url, device_id, fcfg, fresh=False)


def _finish_rotation(
    state_dir: Path | str, url: str, device_id: str, fcfg: FetchConfig | None, *, fresh: bool
) -> Rotation | None:
    """Under the fleet lock: finish the pending rotation, or (``fresh``) start one when none
    is pending; ``None`` when none is pending and not ``fresh``. The credential file is
    replaced only by a secret the service has accepted (200)."""
    cred = credential_path(state_dir)
    endpoint = f"{url}/v1/devices/{urllib.parse.quote(device_id, safe='')}/credential"
    pending_file = _pending_path(state_dir)
    pending = _read_pending(pending_file)
    resumed = pending is not None
    if pending is None and not fresh:
        return None
    current = read_credential(cred)
    if pending is None:
        pending = _new_secret()
        _write_secret(pending_file, pending)
    bearers = [pending, current] if resumed else [current]
    for bearer in bearers:
        status, doc = _post(endpoint, {"credential": pending}, bearer, fcfg)
        if status == 401:
            continue
        if status != 200:
            raise _refusal(status, doc, "credential rotation")
        new = _credential_of(doc)
        _write_secret(cred, new)
        _unlink(pending_file)
        return Rotation("resumed" if resumed else "rotated", str(cred))
    raise ConfigError(
        "the fleet service refused the device's credential (HTTP 401): the "
        "device was revoked or its credential replaced",
        remedy="re-enrol it with a new enrolment token",
    )


def read_credential(path: Path) -> str:
    """The credential in ``path``, validated.

    Raises:
        ConfigError: missing, unreadable or not a credential.
    """
    try:
        with path.open("rb") as fh:
            raw = fh.read(1024)
    except OSError as e:
        raise ConfigError(
            f"cannot read the fleet credential {path}: {e.strerror or e}",
            remedy="re-enrol the device",
        ) from e
    text = raw.decode("ascii", errors="replace").strip()
    if not CREDENTIAL_RE.fullmatch(text):
        raise ConfigError(f"{path} does not hold a fleet credential", remedy="re-enrol")
    return text


def _read_pending(path: Path) -> str | None:
    if not path.exists():
        return None
    try:
        return read_credential(path)
    except ConfigError:
        _unlink(path)  # a torn or foreign file: never sent; a fresh proposal replaces it
        return None


@contextlib.contextmanager
def _fleet_lock(state_dir: Path | str) -> Any:
    d = fleet_dir(state_dir)
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise LocalError(f"cannot create {d}: {e.strerror or e}") from e
    lock = filelock.FileLock(str(d / ".lock"), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout as e:
        raise ConflictError(
            "another process is enrolling or rotating this device's credential",
            remedy="retry when it has finished",
        ) from e
    try:
        yield
    finally:
        lock.release()


def _write_secret(path: Path, secret: str) -> None:
    write_bytes(path, secret.encode() + b"\n", mode=0o600)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _read_enrolment(state_dir: Path | str) -> dict[str, Any] | None:
    try:
        raw = _enrolment_path(state_dir).read_bytes()[:4096]
        doc = json.loads(raw)
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != ENROLMENT_FORMAT:
        return None
    return doc


def _credential_of(doc: dict[str, Any]) -> str:
    credential = doc.get("credential")
    if not isinstance(credential, str) or not CREDENTIAL_RE.fullmatch(credential):
        raise SecurityError(
            "the fleet service's reply carries no valid credential "
            "(43-512 characters of [A-Za-z0-9_-.~+/]); nothing stored"
        )
    return credential


def _refusal(status: int, doc: dict[str, Any], what: str) -> Exception:
    """The error for a refused request; the service's own message is shown truncated."""
    said = doc.get("error") if isinstance(doc.get("error"), str) else ""
    detail = f": {said[:200]}" if said else ""
    if status in (401, 403):
        return ConfigError(
            f"the fleet service refused the {what} (HTTP {status}){detail}",
            remedy="ask the operator for a new enrolment token, or re-enrol",
        )
    if status == 409 and doc.get("error") == "credential_taken":
        return ConflictError(
            f"the fleet service refused the {what}: the proposed credential is not fresh "
            f"(HTTP 409){detail}",
            remedy="retry: the next attempt proposes a new one",
        )
    if status == 409:
        return ConflictError(
            f"the fleet service refused the {what}: the device id is "
            f"already enrolled (HTTP 409){detail}",
            remedy="an operator must revoke the old enrolment first, or "
            "enrol under another device id",
        )
    if status == 429 or status >= 500:
        return TransientError(
            f"the fleet service is unavailable (HTTP {status}){detail}", remedy="retry later"
        )
    if 400 <= status < 500:
        return InputError(f"the fleet service refused the {what} (HTTP {status}){detail}")
    return SecurityError(f"the fleet service answered the {what} with HTTP {status}")


def _post(
    url: str, body: dict[str, Any], bearer: str | None, fcfg: FetchConfig | None
) -> tuple[int, dict[str, Any]]:
    """One POST, no retry here (the callers retry with the same proposal on their next
    run), no redirect. Returns the status and the reply: a JSON object, or ``{}`` for an error
    status whose body is not one.

    Raises:
        TransientError: the service cannot be reached or is too slow.
        SecurityError: a success reply that is oversized or not a JSON object.
    """
    cfg = fcfg or FetchConfig()
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if bearer:
        headers["Authorization"] = f"Bearer {bearer}"
    deadline = time.monotonic() + min(REQUEST_DEADLINE_S, cfg.connect_timeout + cfg.read_timeout)
    pool = fleet_pool(cfg)
    try:
        resp = pool.request(
            "POST",
            url,
            body=json.dumps(body).encode(),
            headers=headers,
            preload_content=False,
            redirect=False,
            timeout=urllib3.Timeout(connect=cfg.connect_timeout, read=cfg.read_timeout),
        )
        try:
            raw = _read_bounded(resp, deadline)
        finally:
            resp.release_conn()
    except urllib3.exceptions.HTTPError as e:
        raise TransientError(
            f"cannot reach the fleet service at {url}: {e}",
            remedy="check the fleet URL and the network; retry",
        ) from e
    finally:
        pool.clear()
    ok = 200 <= resp.status < 300
    if len(raw) > MAX_REPLY_BYTES:
        if ok:
            raise SecurityError(f"the fleet service's reply is over {MAX_REPLY_BYTES} bytes")
        return resp.status, {}
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:
        if ok:
            raise SecurityError("the fleet service's reply is not JSON") from e
        return resp.status, {}
    if not isinstance(doc, dict):
        if ok:
            raise SecurityError("the fleet service's reply is not a JSON object")
        return resp.status, {}
    return resp.status, doc


def _read_bounded(resp: Any, deadline: float) -> bytes:
    """At most ``MAX_REPLY_BYTES + 1`` bytes, and no read past ``deadline``."""
    out = bytearray()
    while len(out) <= MAX_REPLY_BYTES:
        if time.monotonic() > deadline:
            raise TransientError("the fleet service's reply is too slow")
        piece = resp.read1(MAX_REPLY_BYTES + 1 - len(out))
        if not piece:
            break
        out += piece
    return bytes(out)
