"""Crash-safe journal of the install state machine (DESIGN decision 5).

One small JSON file, rewritten atomically (temp file, fsync, ``os.replace``, fsync dir) at every
transition, so after a power cut it holds either the old or the new state, never a torn one.

States and the only transitions allowed (anything else raises :class:`JournalError`)::

    idle ──▶ staging ──▶ staged ──▶ switching ──▶ trial ──▶ idle        (confirmed)
               │  ▲         │           │           │
               └──┘         ▼           ▼           ▼
        (progress)        idle      reverting ◀─────┘ ──▶ idle          (reverted)
    idle ──▶ reverting  (operator revert)          staging ──▶ idle     (aborted)

What recovery does with each state (see ``_updater.recover``): ``staging``/``staged`` - the
inactive slot is not trusted: drop it (chunks already on disk are reused by the next attempt);
``switching`` - finish the switch iff the slot was staged and verified, else revert;
``trial`` - keep waiting for confirmation until the deadline, then revert; ``reverting`` -
finish the revert (idempotent).
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ota._atomic import write_bytes
from ota.errors import LocalError

JOURNAL_FORMAT = "edge-ota.journal/1"
MAX_JOURNAL_BYTES = 256 * 1024


class JournalError(LocalError):
    """The journal is unreadable or a transition is not allowed."""


class Phase(enum.StrEnum):
    IDLE = "idle"
    STAGING = "staging"
    STAGED = "staged"
    SWITCHING = "switching"
    TRIAL = "trial"
    REVERTING = "reverting"


ALLOWED: dict[Phase, frozenset[Phase]] = {
    Phase.IDLE: frozenset({Phase.STAGING, Phase.REVERTING}),
    Phase.STAGING: frozenset({Phase.STAGING, Phase.STAGED, Phase.IDLE}),
    Phase.STAGED: frozenset({Phase.SWITCHING, Phase.IDLE}),
    Phase.SWITCHING: frozenset({Phase.TRIAL, Phase.REVERTING}),
    Phase.TRIAL: frozenset({Phase.IDLE, Phase.REVERTING}),
    Phase.REVERTING: frozenset({Phase.IDLE}),
}


@dataclass(frozen=True)
class Txn:
    """The one install (or revert) in flight.

    ``slot`` is the slot being staged or switched to; ``previous`` the slot that was current
    before (None on a first install); ``deadline`` the end of the health window (unix time).
    ``attempts`` counts recoveries of this transaction: bounded, so a release that kills the
    updater every time is eventually marked failed instead of resumed forever.
    """

    name: str
    version: str
    counter: int
    slot: str
    previous: str | None = None
    deadline: float | None = None
    attempts: int = 0
    reason: str = ""
    started: float = 0.0


@dataclass(frozen=True)
class JournalState:
    phase: Phase = Phase.IDLE
    txn: Txn | None = None
    seq: int = 0
    history: tuple[str, ...] = field(default=())  # last phases, for diagnostics only

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": JOURNAL_FORMAT,
            "seq": self.seq,
            "phase": self.phase.value,
            "txn": asdict(self.txn) if self.txn else None,
            "history": list(self.history),
        }


def transition(state: JournalState, phase: Phase, txn: Txn | None = None) -> JournalState:
    """The next journal state (pure). ``txn`` replaces the transaction if given; entering
    ``idle`` clears it.

    Raises:
        JournalError: ``phase`` is not reachable from ``state.phase``, or a non-idle state
            would have no transaction.
    """
    if phase not in ALLOWED[state.phase]:
        raise JournalError(f"journal: transition {state.phase} -> {phase} is not allowed")
    new_txn = None if phase is Phase.IDLE else (txn or state.txn)
    if phase is not Phase.IDLE and new_txn is None:
        raise JournalError(f"journal: state {phase} needs a transaction")
    history = (*state.history, phase.value)[-16:]
    return JournalState(phase=phase, txn=new_txn, seq=state.seq + 1, history=history)


class Journal:
    """The journal file of one state directory. Not thread-safe: the updater's file lock
    guarantees a single writer."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> JournalState:
        """Read the journal; a missing file is the idle state.

        Raises:
            JournalError: the file exists but is unreadable or invalid.
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return JournalState()
        except OSError as e:
            raise JournalError(f"cannot read journal {self.path}: {e}") from e
        return parse(data)

    def advance(self, phase: Phase, txn: Txn | None = None) -> JournalState:
        """Apply one transition and persist it durably before returning.

        Raises:
            JournalError: transition not allowed, or the journal is unreadable.
            LocalError: the journal cannot be written (disk full); the old state is intact.
        """
        new = transition(self.load(), phase, txn)
        write_bytes(self.path, _dump(new))
        return new

    def update_txn(self, **changes: Any) -> JournalState:
        """Persist a change of the current transaction without changing the phase."""
        state = self.load()
        if state.txn is None:
            raise JournalError("journal: no transaction to update")
        new = JournalState(state.phase, replace(state.txn, **changes), state.seq + 1,
                           state.history)
        write_bytes(self.path, _dump(new))
        return new


def parse(data: bytes) -> JournalState:
    """Parse and validate journal bytes.

    Raises:
        JournalError: not a valid journal document.
    """
    if len(data) > MAX_JOURNAL_BYTES:
        raise JournalError("journal too large")
    try:
        doc = json.loads(data)
        if doc["format"] != JOURNAL_FORMAT:
            raise JournalError(f"unknown journal format {doc['format']!r}")
        phase = Phase(doc["phase"])
        raw = doc["txn"]
        txn = None if raw is None else Txn(**raw)
        state = JournalState(phase, txn, int(doc["seq"]), tuple(doc.get("history", [])))
    except JournalError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise JournalError(f"journal is invalid: {e}") from e
    if (state.phase is Phase.IDLE) != (state.txn is None):
        raise JournalError("journal: transaction present iff not idle")
    return state


def _dump(state: JournalState) -> bytes:
    return json.dumps(state.to_dict(), sort_keys=True, indent=1).encode()
