"""bench's publish phase timer: nesting is per thread (issue 13: a side thread's phase used to
hide the main thread's chunk upload, which then counted as ``smoke_golden`` or ``other``)."""

from __future__ import annotations

import threading
import types

from bench._common import PhaseTimer


def test_phases_on_two_threads_are_both_timed_and_overlap_is_reported() -> None:
    a_started, b_started = threading.Event(), threading.Event()

    def side() -> None:  # runs while main() is inside its own timed call
        assert a_started.wait(60)
        b_started.set()

    def main() -> None:
        a_started.set()
        assert b_started.wait(60)
        inner()

    def inner() -> None:
        pass

    ns = types.SimpleNamespace(side=side, main=main, inner=inner)
    timer = PhaseTimer()
    timer.wrap(ns, "side", "smoke_golden")
    timer.wrap(ns, "main", "chunk_upload")
    timer.wrap(ns, "inner", "sign")
    helper = threading.Thread(target=ns.side)
    helper.start()
    ns.main()
    helper.join(60)
    timer.restore()
    assert set(timer.totals) == {"chunk_upload", "smoke_golden"}  # "sign" nested: not counted
    assert timer.totals["smoke_golden"] > 0 and timer.totals["chunk_upload"] > 0
    total = timer.covered() + 1.0
    parts = timer.breakdown(total, ["chunk_upload", "smoke_golden"], overlap=True)
    assert sum(timer.totals.values()) > timer.covered()  # the side call ran inside the main one
    assert parts["overlap"] == round(sum(timer.totals.values()) - timer.covered(), 4)
    assert parts["other"] == round(total - timer.covered(), 4)
    assert ns.side is side and ns.main is main
