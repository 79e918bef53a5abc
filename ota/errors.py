"""Errors grouped by who must react, and the one table that maps them to exit codes.

* :class:`SecurityError` - the repository, a mirror or an attacker is wrong. Refuse, keep what is
  installed, record a security event. Retrying will not help.
* :class:`TransientError` - the network or the storage endpoint failed. Retry later.
* :class:`InputError` - the operator gave bad input (a model, a version, a flag). Fix the input.
* :class:`ConfigError` - the installation is misconfigured (keys, storage URL, config file).
* :class:`LocalError` - this machine failed (disk full, unreadable state directory).
* :class:`SmokeError` - a bundle passed verification but failed its smoke inference.
* :class:`ConflictError` - a concurrent writer won; the operation may be retried.

Every error carries a one-line message and, where one exists, a remedy for a human
(``diagnostics()``), like sigstore's errors.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes of the ``ota`` CLI. Stable: scripts and systemd units depend on them."""

    OK = 0
    INTERNAL = 1
    USAGE = 2
    INPUT = 3
    SECURITY = 4
    TRANSIENT = 5
    LOCAL = 6
    SMOKE_FAILED = 7
    CONFLICT = 8
    CONFIG = 9
    UP_TO_DATE = 10
    # ``ota device update``: nothing installed, for a reason that is not "up to date" (issue 12)
    NO_SUCH_MODEL = 11  # the device follows a model the repository does not have
    NOT_IN_ROLLOUT = 12  # a newer release exists; its ring, percentage or pause leaves us out
    KEPT_YANKED = 13  # running a yanked release with nothing safe to revert to
    REVERTED_LOCALLY = 14  # running an older slot than the committed release (device revert)


class OtaError(Exception):
    """Base of every error edge-ota raises on purpose."""

    exit_code: ExitCode = ExitCode.INTERNAL
    remedy: str = ""

    def __init__(self, message: str, *, remedy: str | None = None) -> None:
        super().__init__(message)
        if remedy is not None:
            self.remedy = remedy

    def diagnostics(self) -> str:
        """A human-readable message with the remedy, if any."""
        text = str(self)
        return f"{text}\n  hint: {self.remedy}" if self.remedy else text


class SecurityError(OtaError):
    """Verification failed: refuse and report. Never retried automatically with the same data."""

    exit_code = ExitCode.SECURITY


class DowngradeError(SecurityError):
    """A release older than (or as old as) the committed one, or below the security floor."""


class TransientError(OtaError):
    """The network or the storage endpoint failed; the same call may succeed later."""

    exit_code = ExitCode.TRANSIENT


class InputError(OtaError):
    """Bad operator input: a model, a version string, a file, a flag."""

    exit_code = ExitCode.INPUT


class ConfigError(OtaError):
    """Misconfiguration: a missing or wrong key, a bad storage URL, an unreadable config."""

    exit_code = ExitCode.CONFIG


class LocalError(OtaError):
    """A fault of this machine: disk full, a state directory that cannot be used."""

    exit_code = ExitCode.LOCAL


class SmokeError(OtaError):
    """A verified bundle failed its smoke inference (outputs, crash, memory or latency)."""

    exit_code = ExitCode.SMOKE_FAILED


class ConflictError(OtaError):
    """A concurrent writer changed the repository first; re-read and retry."""

    exit_code = ExitCode.CONFLICT
