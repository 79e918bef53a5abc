"""The service's reading of ``edge-ota.report/1`` (the device side is ``ota.client._report``).

A pure parser: a report is accepted whole or rejected whole (400) before any write.
``device.id`` must be the device the URL names (the credential was checked against that
one). Unknown event kinds are stored (a newer client may add one) but do not move a release's
state. Events must be in strictly increasing ``seq`` order, as the client sends them.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from typing import Any

from ._config import FleetConfig
from ._validate import NAME_RE, bad, integer, number, obj, only_keys, string

FORMAT = "edge-ota.report/1"
KIND_RE = re.compile(r"^[a-z][a-z_]{0,31}\Z")
EPOCH_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+~-]{0,63}\Z")


@dataclass(frozen=True)
class Facts:
    ring: str
    tier: str
    arch: str
    runtime_version: str
    client_version: str


@dataclass(frozen=True)
class ReportEvent:
    seq: int
    time: float
    kind: str
    model: str
    version: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Report:
    facts: Facts
    models: dict[str, tuple[str, int]]  # name -> (version, counter)
    queue: str
    dropped: int
    events: list[ReportEvent]


def parse_facts(d: Any) -> Facts:
    d = obj(d, "facts")
    return Facts(
        ring=string(d, "ring", max_len=64, required=False, pattern=NAME_RE),
        tier=string(d, "tier", max_len=64, required=False, pattern=NAME_RE),
        arch=string(d, "arch", max_len=64, required=False),
        runtime_version=string(d, "runtime_version", max_len=64, required=False),
        client_version=string(d, "client_version", max_len=64, required=False),
    )


def parse_report(doc: Any, device_id: str, cfg: FleetConfig) -> Report:
    """Check a decoded report of ``device_id``. Raises :class:`~._validate.Rejected`."""
    doc = obj(doc, "the report")
    only_keys(doc, {"format", "device", "queue", "dropped", "events"}, "the report")
    if doc.get("format") != FORMAT:
        raise bad(f"format must be {FORMAT!r}", "bad_format")
    dev = obj(doc.get("device"), "'device'")
    only_keys(
        dev,
        {"id", "ring", "tier", "arch", "runtime_version", "client_version", "models"},
        "'device'",
    )
    if dev.get("id") != device_id:
        raise bad("device.id is not the device this URL names", "wrong_device")
    facts = parse_facts(dev)
    raw_models = obj(dev.get("models", {}), "device.models")
    if len(raw_models) > cfg.max_models_per_device:
        raise bad(f"more than {cfg.max_models_per_device} models")
    models: dict[str, tuple[str, int]] = {}
    for name, raw in raw_models.items():
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise bad("a model name has characters that are not allowed")
        m = obj(raw, f"device.models[{name!r}]")
        only_keys(m, {"version", "counter"}, "a model entry")
        models[name] = (
            string(m, "version", max_len=64, pattern=VERSION_RE),
            integer(m, "counter", required=False),
        )
    queue = string(doc, "queue", max_len=64, pattern=EPOCH_RE)
    if not queue:
        raise bad("'queue' is required")
    dropped = integer(doc, "dropped", required=False)
    raw_events = doc.get("events")
    if not isinstance(raw_events, list):
        raise bad("'events' must be a list")
    if len(raw_events) > cfg.max_events_per_report:
        raise bad(f"more than {cfg.max_events_per_report} events in one report", "too_many")
    events = [_event(e, cfg) for e in raw_events]
    for a, b in itertools.pairwise(events):
        if b.seq <= a.seq:
            raise bad("event seqs must increase strictly", "bad_order")
    return Report(facts, models, queue, dropped, events)


def _event(e: Any, cfg: FleetConfig) -> ReportEvent:
    e = obj(e, "an event")
    only_keys(e, {"seq", "time", "kind", "model", "version", "data"}, "an event")
    kind = string(e, "kind", max_len=32)
    if not KIND_RE.match(kind):
        raise bad("an event kind has characters that are not allowed")
    data = obj(e.get("data", {}), "event data")
    if len(json.dumps(data, separators=(",", ":"))) > cfg.max_event_data_bytes:
        raise bad(f"event data over {cfg.max_event_data_bytes} bytes", "too_large")
    return ReportEvent(
        seq=integer(e, "seq", lo=1),
        time=number(e, "time", lo=0.0, hi=1e11),
        kind=kind,
        model=string(e, "model", max_len=128, required=False, pattern=NAME_RE),
        version=string(e, "version", max_len=64, required=False, pattern=VERSION_RE),
        data=data,
    )
