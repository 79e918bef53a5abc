"""Sigstore keyless signing of a bundle, under a hard deadline.

sigstore's HTTP calls (TUF trust root refresh, OIDC discovery, Fulcio, Rekor) carry no timeout
of their own, so the whole signing runs in a child process
(``python -m ota.signing._keyless_child``) that is killed at the deadline. A thread could not be
stopped and would still write its signature after we gave up; a killed process writes nothing we
publish: the child writes into a private temporary folder and only the parent moves a finished
signature into the bundle (atomically).

The identity token travels on the child's stdin, never on its command line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ota._atomic import write_bytes
from ota.bundle import SIGNATURE_FILE
from ota.errors import ConfigError, InputError, TransientError

# Exit codes of the child (kept in sync with _keyless_child; not imported from it so that
# `python -m` does not find the child module already imported).
_CONFIG_EXIT = 3
_TRANSIENT_EXIT = 4
_MAX_REPORT = 2000


def sign_keyless(
    bundle_dir: Path,
    *,
    deadline_s: float,
    identity_token: str | None = None,
    use_staging: bool = False,
    signature_name: str = SIGNATURE_FILE,
) -> Path:
    """Sign ``bundle_dir`` with Sigstore keyless (Fulcio certificate, Rekor entry).

    The identity is ``identity_token`` (an OIDC JWT) or, if None, an ambient credential detected
    by sigstore (GitHub Actions, GCP, ...). No interactive browser flow is ever started.

    Invariant: returns within about ``deadline_s`` seconds; on any failure nothing is written
    into the bundle.

    Returns:
        The path of the written signature.

    Raises:
        TransientError: Sigstore or the network failed, or the deadline passed.
        ConfigError: no identity token is available, or sigstore rejected it.
        InputError: ``bundle_dir`` is not a directory or ``deadline_s`` is not positive.
    """
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise InputError(f"{bundle_dir} is not a bundle directory")
    if not deadline_s > 0:
        raise InputError(f"deadline must be positive, not {deadline_s}")
    request = {
        "identity_token": identity_token,
        "use_staging": use_staging,
        "signature_name": signature_name,
    }
    with tempfile.TemporaryDirectory(prefix="ota-keyless-") as tmp:
        out = Path(tmp) / signature_name
        start = time.monotonic()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "ota.signing._keyless_child", str(bundle_dir), str(out)],
                input=json.dumps(request).encode(),
                capture_output=True,
                timeout=deadline_s,
                check=False,
            )
        except subprocess.TimeoutExpired as e:  # run() has killed the child already
            raise TransientError(
                f"Sigstore keyless signing did not finish within {deadline_s:.1f} s",
                remedy="check network access to the Sigstore services or sign offline with a key",
            ) from e
        elapsed = time.monotonic() - start
        report = proc.stderr.decode(errors="replace").strip()[-_MAX_REPORT:]
        if proc.returncode == _CONFIG_EXIT:
            raise ConfigError(f"Sigstore keyless signing: {report}")
        if proc.returncode != 0 or not out.is_file():
            raise TransientError(
                f"Sigstore keyless signing failed after {elapsed:.1f} s: {report or 'no output'}",
                remedy="check network access to the Sigstore services or sign offline with a key",
            )
        final = bundle_dir / signature_name
        write_bytes(final, out.read_bytes())
    return final
