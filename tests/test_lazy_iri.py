"""The SBOM validator no longer compiles jsonschema's IRI grammar at import (issue 13: 2.5-3.3 s
of every cold publish), and IRI formats are still checked by the real grammar when used."""

from __future__ import annotations

import json
import subprocess
import sys

_CHILD = """
import json, sys
from ota.sbom._schema import _strict_validator
_strict_validator()
compiled_at_import = "rfc3987_syntax.syntax_helpers" in sys.modules
import jsonschema
checker = jsonschema.FormatChecker()
good = checker.conforms("https://example.com/data?x=1#y", "iri-reference")
bad = checker.conforms("http://exa mple.com/<>", "iri-reference")
print(json.dumps({"compiled_at_import": compiled_at_import, "good": good, "bad": bad,
                  "compiled_after": "rfc3987_syntax.syntax_helpers" in sys.modules}))
"""


def test_iri_grammar_is_compiled_only_when_an_iri_is_checked() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=600, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"compiled_at_import": False, "good": True, "bad": False,
                      "compiled_after": True}  # fmt: skip
