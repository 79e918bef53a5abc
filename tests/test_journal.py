"""The install journal: transitions, atomic persistence, corrupt files."""

from __future__ import annotations

from pathlib import Path

import pytest

from ota.client._journal import (
    ALLOWED,
    Journal,
    JournalError,
    JournalState,
    Phase,
    Txn,
    parse,
    transition,
)

TXN = Txn("det", "1.1.0", 2, "b", "a")


def test_full_install_path_persists_each_step(tmp_path: Path) -> None:
    j = Journal(tmp_path / "journal.json")
    assert j.load().phase is Phase.IDLE
    for phase in (Phase.STAGING, Phase.STAGED, Phase.SWITCHING, Phase.TRIAL, Phase.IDLE):
        st = j.advance(phase, TXN if phase is Phase.STAGING else None)
        assert j.load() == st
    assert j.load().txn is None and j.load().seq == 5


@pytest.mark.parametrize("start", list(Phase))
def test_only_allowed_transitions(start: Phase) -> None:
    state = JournalState(start, None if start is Phase.IDLE else TXN)
    for target in Phase:
        if target in ALLOWED[start]:
            assert transition(state, target, TXN).phase is target
        else:
            with pytest.raises(JournalError):
                transition(state, target, TXN)


def test_update_txn_keeps_phase(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.json")
    j.advance(Phase.STAGING, TXN)
    st = j.update_txn(attempts=2)
    assert st.phase is Phase.STAGING and st.txn is not None and st.txn.attempts == 2


@pytest.mark.parametrize("data", [b"{", b"[]", b'{"format": "x"}',
                                  b'{"format": "edge-ota.journal/1", "seq": 1, "phase": "idle",'
                                  b' "txn": {"name": "det"}}',
                                  b'{"format": "edge-ota.journal/1", "seq": 1, "phase": "trial",'
                                  b' "txn": null}'])
def test_corrupt_journal_raises(data: bytes) -> None:
    with pytest.raises(JournalError):
        parse(data)
