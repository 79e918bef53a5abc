"""The operator's HTTP client of a running fleet service, for questions other commands ask:
``ota vulns --fleet URL`` asks which devices run each affected release.

Import-light (urllib3 only: no Flask, no SQLAlchemy). Replies are bounded and checked; any
failure is a :class:`~ota.errors.TransientError` (unreachable, 5xx) or a
:class:`~ota.errors.ConfigError` (token refused), never a partial answer passed off as whole.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from pathlib import Path
from typing import Any

import urllib3

from ota.errors import ConfigError, InputError, TransientError

TOKEN_ENV = "OTA_FLEET_TOKEN"  # noqa: S105 (a variable name, not a secret)
MAX_REPLY_BYTES = 8 * 1024 * 1024
SAMPLE = 100  # device ids listed per release (the count is exact)


def read_token(token_file: Path | None) -> str:
    """The operator token from ``token_file`` or ``$OTA_FLEET_TOKEN``."""
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8", errors="replace")[:512].strip()
        except OSError as e:
            raise InputError(f"cannot read the fleet token {token_file}: {e}") from e
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise ConfigError(
            f"a fleet operator token (scope read) is needed: --fleet-token-file or ${TOKEN_ENV}"
        )
    return token


def _get(pool: urllib3.PoolManager, url: str, token: str) -> Any:
    try:
        r = pool.request(
            "GET",
            url,
            headers={"Authorization": f"Bearer {token}"},
            preload_content=False,
            redirect=False,
            timeout=urllib3.Timeout(connect=10, read=60),
            retries=False,
        )
        try:
            body = r.read(MAX_REPLY_BYTES + 1)
        finally:
            r.release_conn()
    except urllib3.exceptions.HTTPError as e:
        raise TransientError(f"cannot reach the fleet service: {e}") from e
    if r.status in (401, 403):
        raise ConfigError(f"the fleet service refused the token (HTTP {r.status})")
    if r.status != 200 or len(body) > MAX_REPLY_BYTES:
        raise TransientError(f"the fleet service answered HTTP {r.status}")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        raise TransientError("the fleet service's reply is not JSON") from e


def fleet_exposure(url: str, token: str, releases: list[str]) -> dict[str, dict[str, Any]]:
    """For each ``name@version``: ``{"devices": exact count of active devices running it,
    "sample": up to SAMPLE device ids}``."""
    base = url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise InputError(f"the fleet URL must be http(s): {url!r}")
    pool = urllib3.PoolManager(num_pools=2, maxsize=2)
    out: dict[str, dict[str, Any]] = {}
    try:
        for release in releases:
            name, _, version = release.rpartition("@")
            q = urllib.parse.quote
            detail = _get(
                pool, f"{base}/v1/releases/{q(name, safe='')}/{q(version, safe='')}?limit=1", token
            )
            page = _get(
                pool,
                f"{base}/v1/devices?"
                + urllib.parse.urlencode(
                    {"model": name, "version": version, "revoked": "false", "limit": SAMPLE}
                ),
                token,
            )
            try:
                count = int(detail["running"])
                sample = [str(d["device_id"]) for d in page["devices"]]
            except (KeyError, TypeError, ValueError) as e:
                raise TransientError("the fleet service's reply lacks device counts") from e
            out[release] = {"devices": count, "sample": sample}
    finally:
        pool.clear()
    return out
