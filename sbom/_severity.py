"""Severity levels of vulnerabilities, from OSV text ratings or CVSS v2 / v3.x base vectors.

CVSS v3.x base scores follow the FIRST specification, section 7.1 (formulas) and Appendix A
(Roundup); v2 follows its guide, section 3.2.1. CVSS v4 vectors are not scored here (their
score needs the spec's macro-vector lookup tables): such a record is rated only when it
also carries a text rating. Ratings map as in the v3.1 spec's qualitative scale:
0.1-3.9 LOW, 4.0-6.9 MODERATE (CVSS calls it MEDIUM), 7.0-8.9 HIGH, 9.0-10.0 CRITICAL.
"""

from __future__ import annotations

import enum
import math

_V3_AV = {"N": 0.85, "A": 0.62, "L": 0.55, "P": 0.2}
_V3_AC = {"L": 0.77, "H": 0.44}
_V3_PR_U = {"N": 0.85, "L": 0.62, "H": 0.27}
_V3_PR_C = {"N": 0.85, "L": 0.68, "H": 0.5}
_V3_UI = {"N": 0.85, "R": 0.62}
_V3_CIA = {"H": 0.56, "L": 0.22, "N": 0.0}
_V2_AV = {"L": 0.395, "A": 0.646, "N": 1.0}
_V2_AC = {"H": 0.35, "M": 0.61, "L": 0.71}
_V2_AU = {"M": 0.45, "S": 0.56, "N": 0.704}
_V2_CIA = {"N": 0.0, "P": 0.275, "C": 0.660}


class Severity(enum.IntEnum):
    """Ordered severity; compare with ``>=``."""

    LOW = 1
    MODERATE = 2
    HIGH = 3
    CRITICAL = 4

    @classmethod
    def from_text(cls, text: object) -> Severity | None:
        """GHSA / OSV ratings (``LOW``, ``MODERATE``/``MEDIUM``, ``HIGH``, ``CRITICAL``) and
        Ubuntu's (``negligible`` counts as LOW); anything else is None."""
        if not isinstance(text, str):
            return None
        t = text.strip().upper()
        aliases = {"MEDIUM": "MODERATE", "NEGLIGIBLE": "LOW", "IMPORTANT": "HIGH"}
        t = aliases.get(t, t)
        return cls[t] if t in cls.__members__ else None

    @classmethod
    def from_score(cls, score: float) -> Severity | None:
        if score >= 9.0:
            return cls.CRITICAL
        if score >= 7.0:
            return cls.HIGH
        if score >= 4.0:
            return cls.MODERATE
        if score > 0.0:
            return cls.LOW
        return None


def cvss_base_score(vector: str) -> float | None:
    """Base score of a CVSS v3.0/v3.1 or v2 vector, or None if it is not one of those or is
    incomplete. Never raises."""
    if not isinstance(vector, str) or len(vector) > 256:
        return None
    parts = dict(p.split(":", 1) for p in vector.strip().split("/") if ":" in p)
    try:
        if parts.get("CVSS") in ("3.0", "3.1"):
            return _v3(parts)
        if parts.get("CVSS") is None and {"AV", "AC", "Au"} <= parts.keys():
            return _v2(parts)
    except KeyError:
        return None
    return None


def _v3(m: dict[str, str]) -> float:
    changed = m["S"] == "C"
    if m["S"] not in ("U", "C"):
        raise KeyError("S")
    iss = 1 - (1 - _V3_CIA[m["C"]]) * (1 - _V3_CIA[m["I"]]) * (1 - _V3_CIA[m["A"]])
    impact = 7.52 * (iss - 0.029) - 3.25 * (iss - 0.02) ** 15 if changed else 6.42 * iss
    pr = (_V3_PR_C if changed else _V3_PR_U)[m["PR"]]
    exploitability = 8.22 * _V3_AV[m["AV"]] * _V3_AC[m["AC"]] * pr * _V3_UI[m["UI"]]
    if impact <= 0:
        return 0.0
    raw = (1.08 if changed else 1.0) * (impact + exploitability)
    return _roundup(min(raw, 10.0))


def _roundup(x: float) -> float:
    """CVSS v3.1 Appendix A: smallest number with one decimal >= x, float-error safe."""
    i = round(x * 100_000)
    return i / 100_000.0 if i % 10_000 == 0 else (math.floor(i / 10_000) + 1) / 10.0


def _v2(m: dict[str, str]) -> float:
    impact = 10.41 * (1 - (1 - _V2_CIA[m["C"]]) * (1 - _V2_CIA[m["I"]]) * (1 - _V2_CIA[m["A"]]))
    exploitability = 20 * _V2_AV[m["AV"]] * _V2_AC[m["AC"]] * _V2_AU[m["Au"]]
    f = 0.0 if impact == 0 else 1.176
    return round((0.6 * impact + 0.4 * exploitability - 1.5) * f, 1)
