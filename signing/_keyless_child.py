"""Child process of :func:`ota.signing.sign_keyless`; not imported by the package.

Exit codes: 0 signed, 3 configuration (no or bad identity), 4 transient (network, Sigstore).
The one-line reason goes to stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

CONFIG_EXIT = 3
TRANSIENT_EXIT = 4


def _child(argv: list[str]) -> int:
    """The child's work: sign ``argv[0]`` into ``argv[1]``; request JSON on stdin."""
    bundle_dir, out = Path(argv[0]), Path(argv[1])
    request: dict[str, Any] = json.loads(sys.stdin.read())
    try:
        from sigstore.errors import Error as SigstoreError
        from sigstore.oidc import IdentityError, detect_credential

        from ota.signing._model_sig import _hashing_config, _upstream

        signing = _upstream("signing")
    except ImportError as e:
        print(f"{e}; install edge-ota[repository]", file=sys.stderr)
        return CONFIG_EXIT
    token = request.get("identity_token")
    try:
        if not token:
            token = detect_credential("sigstore")
    except (IdentityError, SigstoreError) as e:
        print(f"ambient credential detection failed: {e}", file=sys.stderr)
        return TRANSIENT_EXIT
    if not token:
        print(
            "no OIDC identity token: pass one, or run where sigstore detects ambient "
            "credentials (e.g. GitHub Actions with id-token: write)",
            file=sys.stderr,
        )
        return CONFIG_EXIT
    try:
        signing.Config().use_sigstore_signer(
            identity_token=token,
            use_ambient_credentials=False,
            use_staging=bool(request.get("use_staging")),
            force_oob=True,
        ).set_hashing_config(_hashing_config(str(request["signature_name"]))).sign(bundle_dir, out)
    except IdentityError as e:
        print(f"identity token rejected: {e}", file=sys.stderr)
        return CONFIG_EXIT
    except Exception as e:  # network, TUF, Fulcio, Rekor: all "try again later" for the caller
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return TRANSIENT_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
