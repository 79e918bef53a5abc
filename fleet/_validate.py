"""Parse and check untrusted JSON before anything touches the database.

Pure functions: each raises :class:`Rejected` (an HTTP status, a machine reason and a human
message) and never returns something half-checked. The bound on nesting is checked on the
parsed value without recursion, and JSON itself is parsed with NaN/Infinity (and numbers
that overflow to it, such as ``1e400``) refused and deep nesting turned into a rejection
(Python's parser recurses).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from ota import bundle as _bundle

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+/-]{0,127}\Z")
# exactly the ids a device accepts (ota device init): one rule on both sides
DEVICE_ID_RE = _bundle.DEVICE_ID_RE
TOKEN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
MAX_SAFE_INT = 2**53  # JSON numbers beyond this are not exact everywhere


class Rejected(Exception):
    """Bad input: answered with ``status`` and ``{"error": reason, "message": message}``."""

    def __init__(
        self, status: int, reason: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.headers = headers or {}


def bad(message: str, reason: str = "malformed") -> Rejected:
    return Rejected(400, reason, message)


def device_filters(query: Mapping[str, str]) -> dict[str, str]:
    """The device-list filters of a query string (``model``, ``version``, ``ring``, ``tier``,
    ``after``), each ``""`` when absent, as the operator API and the dashboard accept them.

    Raises:
        Rejected: a value over 128 characters or with characters its pattern refuses.
    """
    args: dict[str, str] = {}
    for key, pattern in (
        ("model", NAME_RE),
        ("version", NAME_RE),
        ("ring", NAME_RE),
        ("tier", NAME_RE),
        ("after", DEVICE_ID_RE),
    ):
        v = query.get(key, "")
        if v and (len(v) > 128 or not pattern.match(v)):
            raise bad(f"{key!r} has characters that are not allowed")
        args[key] = v
    return args


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    """A JSON number as a float; ``1e400`` would be ``inf``, which no JSON can say back."""
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"the number {text[:40]} is out of range")
    return v


def parse_json(body: bytes, max_bytes: int, max_depth: int) -> Any:
    """The JSON value of ``body`` (UTF-8), at most ``max_bytes`` and ``max_depth`` deep."""
    if len(body) > max_bytes:
        raise Rejected(413, "too_large", f"the body exceeds {max_bytes} bytes")
    try:
        value = json.loads(
            body.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite_float
        )
    except RecursionError as e:
        raise bad(f"JSON nested deeper than {max_depth}", "too_deep") from e
    except ValueError as e:  # UnicodeDecodeError too
        raise bad(f"the body is not JSON: {str(e)[:120]}") from e
    if depth(value) > max_depth:
        raise bad(f"JSON nested deeper than {max_depth}", "too_deep")
    return value


def depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), without recursion."""
    best = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            d += 1
            best = max(best, d)
            stack.extend((x, d) for x in v if isinstance(x, dict | list))
    return best


def obj(v: Any, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise bad(f"{what} must be an object")
    return v


def string(
    d: dict[str, Any],
    key: str,
    *,
    max_len: int = 128,
    required: bool = True,
    pattern: re.Pattern[str] | None = None,
    default: str = "",
) -> str:
    if key not in d or d[key] is None:
        if required:
            raise bad(f"{key!r} is required")
        return default
    v = d[key]
    if not isinstance(v, str):
        raise bad(f"{key!r} must be a string")
    if len(v) > max_len:
        raise bad(f"{key!r} is longer than {max_len} characters")
    if not v.isprintable():
        raise bad(f"{key!r} must be printable")
    if pattern is not None and v and not pattern.match(v):
        raise bad(f"{key!r} has characters that are not allowed")
    return v


def integer(
    d: dict[str, Any],
    key: str,
    *,
    lo: int = 0,
    hi: int = MAX_SAFE_INT,
    required: bool = True,
    default: int = 0,
) -> int:
    if key not in d or d[key] is None:
        if required:
            raise bad(f"{key!r} is required")
        return default
    v = d[key]
    if not isinstance(v, int) or isinstance(v, bool):
        raise bad(f"{key!r} must be an integer")
    if not lo <= v <= hi:
        raise bad(f"{key!r} must be between {lo} and {hi}")
    return v


def number(
    d: dict[str, Any],
    key: str,
    *,
    lo: float = 0.0,
    hi: float = 1e12,
    required: bool = True,
    default: float = 0.0,
) -> float:
    if key not in d or d[key] is None:
        if required:
            raise bad(f"{key!r} is required")
        return default
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise bad(f"{key!r} must be a number")
    f = float(v)
    if not math.isfinite(f) or not lo <= f <= hi:
        raise bad(f"{key!r} must be between {lo} and {hi}")
    return f


def only_keys(d: dict[str, Any], allowed: set[str], what: str) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        raise bad(f"{what} has unknown fields: {', '.join(k[:40] for k in extra[:5])}")
