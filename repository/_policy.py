"""Publish policy: rules a release must meet before it is published, and recorded waivers.

The policy is the ``[policy]`` table of ``ota.toml`` or a TOML file given with ``--policy``
(same keys, at top level or under ``[policy]``)::

    [policy]
    require_signature = true        # rule "signature": the release key is allowed for the
                                    #   model by trust/signers.json (else devices refuse it)
    require_valid_sbom = true       # rule "sbom": the SBOM passes strict CycloneDX 1.6 checks
    max_severity = "high"           # rule "vulns": no known vulnerability at or above this
    osv = "osv-export"              #   offline OSV export (or --osv DIR); none given = violation
    require_static_checks = true    # rule "static-checks": ONNX static checks ran and passed
    budget_tiers = ["npu"]          # rule "budgets": a smoke budget is given for each tier
    [policy.signers]                # rule "signers": model glob -> allowed key fingerprints
    "det*" = ["6100d0395b17..."]

Checks run in :func:`ota.repository.publish` before anything is uploaded (signature, signers,
budgets, static checks) and right after the SBOM is built (sbom, vulns; only unreferenced
chunks exist then, nothing is published). A violated rule without a waiver raises
:class:`PolicyViolation` (exit 3). A waiver (``--waive RULE --reason TEXT``) lets it through;
it is written to the audit log (event ``policy-waiver``, with the actor) and into the bundle's
provenance build parameters.
"""

from __future__ import annotations

import contextvars
import fnmatch
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ota.errors import ConfigError, InputError

if TYPE_CHECKING:
    from ota.repository._project import Project
    from ota.repository._publish import PublishRequest

RULES = ("signature", "signers", "sbom", "vulns", "static-checks", "budgets")
MAX_POLICY_BYTES = 256 * 1024
MAX_REASON = 1024


class PolicyViolation(InputError):
    """A release breaks the publish policy and no waiver was given for the rule."""


@dataclass(frozen=True)
class PublishPolicy:
    require_signature: bool = False
    require_valid_sbom: bool = False
    max_severity: str | None = None
    osv: Path | None = None
    require_static_checks: bool = False
    budget_tiers: tuple[str, ...] = ()
    signers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], base: Path) -> PublishPolicy:
        """Raises: ConfigError on an unknown key or a bad value."""
        from ota.sbom import Severity

        known = {"require_signature", "require_valid_sbom", "max_severity", "osv",
                 "require_static_checks", "budget_tiers", "signers"}  # fmt: skip
        extra = sorted(set(doc) - known)
        if extra:
            raise ConfigError(f"unknown policy keys {extra}", remedy=f"use {sorted(known)}")
        try:
            sev = doc.get("max_severity")
            if sev is not None and Severity.from_text(sev) is None:
                raise ValueError(f"unknown severity {sev!r}")
            signers = doc.get("signers", {})
            if not isinstance(signers, dict) or len(signers) > 256:
                raise ValueError("signers must be a table of model glob -> fingerprints")
            tiers = doc.get("budget_tiers", [])
            if not isinstance(tiers, list) or len(tiers) > 64:
                raise ValueError("budget_tiers must be a list")
            return cls(
                require_signature=_bool(doc, "require_signature"),
                require_valid_sbom=_bool(doc, "require_valid_sbom"),
                max_severity=str(sev).lower() if sev is not None else None,
                osv=(base / str(doc["osv"])) if doc.get("osv") else None,
                require_static_checks=_bool(doc, "require_static_checks"),
                budget_tiers=tuple(str(t) for t in tiers),
                signers={str(k): tuple(str(f).lower() for f in v) for k, v in signers.items()},
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"bad publish policy: {e}") from e


def _bool(doc: Mapping[str, Any], key: str) -> bool:
    value = doc.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false")
    return value


def load_policy(path: Path) -> PublishPolicy:
    """Read a policy file: the ``[policy]`` table of an ``ota.toml``, or a bare policy TOML.

    Raises:
        ConfigError: unreadable, too large, not TOML, or a bad policy.
    """
    try:
        raw = Path(path).read_bytes()
        if len(raw) > MAX_POLICY_BYTES:
            raise ConfigError(f"{path} is larger than {MAX_POLICY_BYTES} bytes")
        doc = tomllib.loads(raw.decode())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read policy {path}: {e}") from e
    table = doc.get("policy", {} if "repository" in doc else doc)
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [policy] is not a table")
    return PublishPolicy.from_dict(table, Path(path).resolve().parent)


@dataclass(frozen=True)
class Waiver:
    rule: str
    reason: str
    actor: str

    def to_dict(self) -> dict[str, str]:
        return {"rule": self.rule, "reason": self.reason, "actor": self.actor}


@dataclass
class PolicyContext:
    """A policy with the waivers and OSV export given for one publish; collects what it
    waived (``applied``) for the audit log and the provenance."""

    policy: PublishPolicy
    waivers: Mapping[str, Waiver] = field(default_factory=dict)
    osv: Path | None = None
    actor: str = ""
    applied: list[tuple[Waiver, str]] = field(default_factory=list)

    @classmethod
    def build(cls, policy: PublishPolicy, *, waive: Sequence[str] = (), reason: str = "",
              actor: str = "", osv: Path | None = None) -> PolicyContext:  # fmt: skip
        """Raises: InputError: an unknown rule, or a waiver without a reason."""
        from ota.repository._auditlog import default_actor

        actor = actor or default_actor()
        unknown = sorted(set(waive) - set(RULES))
        if unknown:
            raise InputError(f"cannot waive unknown rules {unknown}", remedy=f"rules: {RULES}")
        if waive and not reason.strip():
            raise InputError("a waiver needs a reason", remedy="add --reason TEXT")
        reason = reason.strip()[:MAX_REASON]
        return cls(policy, {r: Waiver(r, reason, actor) for r in waive}, osv, actor)

    def waived(self) -> list[dict[str, str]]:
        return [{**w.to_dict(), "violation": why} for w, why in self.applied]


_CLI_CONTEXT: contextvars.ContextVar[PolicyContext | None] = contextvars.ContextVar(
    "ota_publish_policy", default=None
)


def use_context(ctx: PolicyContext) -> contextvars.Token[PolicyContext | None]:
    """Make ``ctx`` the policy of publishes in this context (the CLI's publish options)."""
    return _CLI_CONTEXT.set(ctx)


def reset_context(token: contextvars.Token[PolicyContext | None]) -> None:
    """Undo :func:`use_context`."""
    _CLI_CONTEXT.reset(token)


def resolve(project: Project, given: PolicyContext | None) -> PolicyContext:
    """The policy for a publish: the one given, else the CLI's, else ``ota.toml [policy]``.

    Raises:
        ConfigError: a bad policy in ``ota.toml``.
    """
    if given is not None:
        return given
    ctx = _CLI_CONTEXT.get()
    if ctx is not None:
        return ctx
    return PolicyContext.build(load_policy(project.root_dir / "ota.toml"))


def check_request(ctx: PolicyContext, project: Project, req: PublishRequest) -> None:
    """Rules decidable before any upload: signature, signers, budgets, static checks.

    Raises:
        PolicyViolation: an unwaived violation.
    """
    p = ctx.policy
    found: list[tuple[str, str]] = []
    fingerprint = ""
    if p.require_signature or p.signers:
        fingerprint = _release_fingerprint(project)
    if p.require_signature and not _allowed_by_signers_json(project, req.name, fingerprint):
        found.append(
            (
                "signature",
                f"the release key {fingerprint[:16]} is not allowed for "
                f"{req.name} by trust/signers.json: devices would refuse the bundle",
            )
        )
    if p.signers:
        allowed = {f for glob, fps in p.signers.items() if fnmatch.fnmatchcase(req.name, glob)
                   for f in fps}  # fmt: skip
        if fingerprint not in allowed:
            found.append(("signers", f"signer {fingerprint[:16]} is not allowed for {req.name}"))
    missing = [t for t in p.budget_tiers if t not in req.budgets and "*" not in req.budgets]
    if missing:
        found.append(("budgets", f"no smoke budget for tiers {missing}"))
    if p.require_static_checks and req.kind != "model":
        found.append(("static-checks", f"no static checks exist for {req.kind} bundles"))
    enforce(ctx, found)


def check_sbom(ctx: PolicyContext, name: str, version: str, sbom: bytes) -> None:
    """Rules on the built SBOM: strict validity and known vulnerabilities.

    Raises:
        PolicyViolation: an unwaived violation.
        SbomError: the OSV export is refused (too large).
    """
    from ota.errors import OtaError
    from ota.sbom import validate_sbom

    p = ctx.policy
    found: list[tuple[str, str]] = []
    if p.require_valid_sbom:
        try:
            validate_sbom(sbom)
        except OtaError as e:
            found.append(("sbom", f"SBOM is invalid: {e}"))
    if p.max_severity is not None:
        osv = ctx.osv or p.osv
        if osv is None:
            found.append(("vulns", "no OSV export to check against (--osv DIR or policy osv)"))
        else:
            from ota.sbom import match_osv, severity_at_least  # only with this rule: issue 13

            matches = match_osv([(f"{name}@{version}", sbom)], osv)
            bad = [m for m in matches if severity_at_least(m, p.max_severity)]
            if bad:
                ids = ", ".join(f"{m.vuln_id} ({m.package}@{m.version})" for m in bad[:5])
                found.append(("vulns", f"{len(bad)} known vulnerabilities at or above "
                              f"{p.max_severity}: {ids}"))  # fmt: skip
    enforce(ctx, found)


def enforce(ctx: PolicyContext, found: Sequence[tuple[str, str]]) -> None:
    """Apply waivers to violations; raise for the rest.

    Raises:
        PolicyViolation: naming every unwaived rule and why.
    """
    left = []
    for rule, why in found:
        waiver = ctx.waivers.get(rule)
        if waiver is None:
            left.append(f"{rule}: {why}")
        else:
            ctx.applied.append((waiver, why))
    if left:
        raise PolicyViolation(
            "publish policy violated: " + "; ".join(left),
            remedy="fix the release, or waive with --waive RULE --reason TEXT",
        )


def _release_fingerprint(project: Project) -> str:
    from ota.repository._project import key_fingerprint

    try:
        return key_fingerprint(project.abspath(project.config.release_pub).read_bytes())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the release public key: {e}") from e


def _allowed_by_signers_json(project: Project, name: str, fingerprint: str) -> bool:
    """Whether ``trust/signers.json`` (as committed) lets ``fingerprint`` sign ``name``."""
    from ota.repository._project import key_fingerprint
    from ota.repository._trust import read_signers  # checked against its signed target
    from ota.repository._txn import Transaction

    txn = Transaction.begin(project.storage, project.signers, project.expiry())
    return any(
        key_fingerprint(s.public_key_pem.encode()) == fingerprint
        for s in read_signers(project, txn)
        if s.allows(name)
    )
