"""The bounded store-and-forward event queue."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ota.client import EventQueue


def test_append_ack_and_bound(tmp_path: Path) -> None:
    q = EventQueue(tmp_path / "events.json", max_events=3, clock=lambda: 42.0)
    for i in range(5):
        q.append("checked", "det", f"1.0.{i}", n=i)
    pending = q.pending()
    assert [e.version for e in pending] == ["1.0.2", "1.0.3", "1.0.4"]
    assert [e.seq for e in pending] == [3, 4, 5] and q.dropped == 2
    assert pending[0].time == 42.0 and pending[0].data == {"n": 2}
    assert q.ack(4) == 2 and q.dropped == 0
    assert [e.seq for e in q.pending()] == [5]
    assert q.append("confirmed").seq == 6  # sequence numbers never go back


def test_unknown_kind_and_corrupt_file(tmp_path: Path) -> None:
    q = EventQueue(tmp_path / "events.json")
    with pytest.raises(ValueError, match="unknown event kind"):
        q.append("nonsense")
    (tmp_path / "events.json").write_bytes(b"{not json")
    assert q.pending() == [] and q.dropped == 1
    q.append("security", reason="x")
    assert len(q.pending()) == 1


def test_event_data_is_bounded_in_bytes(tmp_path: Path) -> None:
    """An error message may quote remote data; the queue stays bounded in bytes too."""
    from ota.client._events import MAX_EVENT_DATA_BYTES

    q = EventQueue(tmp_path / "events.json")
    q.append("security", "det", "1.0.0", reason="x" * 4_000_000)
    [ev] = q.pending()
    assert ev.data["truncated"] is True
    assert len(json.dumps(ev.to_dict())) < MAX_EVENT_DATA_BYTES
    q.append("checked", "det", "1.0.0", figures={"a": 1})
    assert q.pending()[-1].data == {"figures": {"a": 1}}
