"""jsonschema's format libraries that an ML-BOM of ``ota publish`` never calls (arrow, webcolors,
uri_template, rfc3986_validator, rfc3339_validator) are imported only when a value of their
format is checked (issue 13), and every format checker behaves as with an eager import: same
checkers for every draft, same verdicts, same errors."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

_LIBRARIES = ["arrow", "rfc3339_validator", "rfc3986_validator", "uri_template", "webcolors"]

# mode "deferred": jsonschema imported as the SBOM validator imports it; "eager": plainly (with
# only the IRI stand-in of ota.sbom._lazy_iri, which test_lazy_iri covers).
_CHILD = """
import json, sys
mode = sys.argv[1]
if mode == "deferred":
    from ota.sbom._schema import _strict_validator
    _strict_validator()
else:
    from ota.sbom._lazy_iri import install
    install()
    import jsonschema
libraries = ("arrow", "webcolors", "uri_template", "rfc3986_validator", "rfc3339_validator")
loaded_before = sorted(m for m in libraries if m in sys.modules)
import jsonschema
from jsonschema.exceptions import FormatError
drafts = ("Draft3Validator", "Draft4Validator", "Draft6Validator", "Draft7Validator",
          "Draft201909Validator", "Draft202012Validator")
checkers = {d: sorted(getattr(jsonschema, d).FORMAT_CHECKER.checkers) for d in drafts}
values = [("P1Y2M", "duration"), ("1Y", "duration"), ("P0003-06-04T12:30:05", "duration"),
          ("P0003-13-04T12:30:05", "duration"), ("red", "color"), ("#fff", "color"),
          ("notacolor", "color"), ("http://x/{a}", "uri-template"), ("http://x/{a", "uri-template"),
          ("2024-01-01T00:00:00Z", "date-time"), ("yesterday", "date-time"),
          ("12:30:05z", "time"), ("25:00:00Z", "time"), ("https://example.com/a?b#c", "uri"),
          ("/relative/only", "uri"), ("../a/b?c", "uri-reference"),
          ("http://[::1", "uri-reference")]
verdicts = {}
for value, fmt in values:
    draft = "Draft3Validator" if fmt == "color" else "Draft202012Validator"
    try:
        getattr(jsonschema, draft).FORMAT_CHECKER.check(value, fmt)
        verdicts[f"{fmt} {value}"] = "ok"
    except FormatError as e:
        cause = type(e.cause)
        verdicts[f"{fmt} {value}"] = f"{e.message} ({cause.__module__}.{cause.__qualname__})"
import arrow, isoduration.parser.parsing as parsing
print(json.dumps({
    "loaded_before": loaded_before,
    "checkers": checkers,
    "verdicts": verdicts,
    "real_in_sys_modules": all(type(sys.modules[m]).__name__ == "module" for m in libraries),
    "same_arrow": parsing.arrow.ParserError is arrow.ParserError,
}))
"""


def _child(mode: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True,
                         timeout=300, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_unused_format_libraries_load_on_first_use_and_check_as_before() -> None:
    deferred, eager = _child("deferred"), _child("eager")
    assert deferred["loaded_before"] == []  # the SBOM validator did not import them
    assert eager["loaded_before"] == _LIBRARIES
    assert deferred["checkers"] == eager["checkers"]  # nothing dropped, for any draft
    assert "uri-template" in deferred["checkers"]["Draft7Validator"]
    assert "duration" in deferred["checkers"]["Draft202012Validator"]
    assert deferred["verdicts"] == eager["verdicts"]  # same results, same errors and causes
    bad = [k for k, v in deferred["verdicts"].items() if v != "ok"]
    assert sorted(bad) == sorted(["duration 1Y", "duration P0003-06-04T12:30:05",
                                  "duration P0003-13-04T12:30:05", "color notacolor",
                                  "uri-template http://x/{a", "date-time yesterday",
                                  "time 25:00:00Z", "uri /relative/only",
                                  "uri-reference http://[::1"])  # fmt: skip
    # the month 13 is refused by arrow's parser (through isoduration), not by a shortcut
    assert deferred["verdicts"]["duration P0003-13-04T12:30:05"].endswith("UnparseableValue)")
    # after first use, the real modules are what anyone importing them gets
    assert deferred["real_in_sys_modules"] and deferred["same_arrow"]


def test_stand_ins_leave_sys_modules_with_the_block() -> None:
    from ota.sbom import _lazy_formats

    probe = (
        "import sys\n"
        "from ota.sbom._lazy_formats import deferred_format_libraries\n"
        "with deferred_format_libraries() as names:\n"
        "    inside = [type(sys.modules[n]).__name__ for n in names]\n"
        "    import jsonschema\n"
        "print(names, inside, [n in sys.modules for n in names])\n"
        "with deferred_format_libraries() as again:\n"
        "    pass\n"
        "print(again)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=300, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    first, second = out.stdout.strip().splitlines()
    names = list(_lazy_formats.DEFERRED)
    assert first == f"{names} {['_StandIn'] * len(names)} {[False] * len(names)}"
    assert second == "[]"  # jsonschema's format module loaded: nothing to defer any more
