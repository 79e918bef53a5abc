"""Inference telemetry for applications (issue 9): the public face of
:mod:`ota.client._telemetry`; the format is ``edge-ota.telemetry/1`` (ADR 0009).

Apps use :class:`Telemetry`; a fleet service validates what devices send with
:func:`validate_summary` (pure, no IO)."""

from ota.client._telemetry import MAX_KEYS, Inference, Telemetry
from ota.client._telemetry_format import (
    DEFAULT_INTERVAL_S,
    EVENT_KIND,
    LATENCY_BUCKETS,
    LATENCY_EDGES,
    MAX_BINS,
    MAX_CLASSES,
    MAX_OUTPUTS,
    MAX_SAMPLE,
    MAX_SUMMARY_BYTES,
    TELEMETRY_FORMAT,
    TOP_K,
    OutputSpec,
    OutputSummary,
    Summary,
    TelemetryError,
    validate_reference,
    validate_summary,
)

__all__ = [
    "DEFAULT_INTERVAL_S",
    "EVENT_KIND",
    "LATENCY_BUCKETS",
    "LATENCY_EDGES",
    "MAX_BINS",
    "MAX_CLASSES",
    "MAX_KEYS",
    "MAX_OUTPUTS",
    "MAX_SAMPLE",
    "MAX_SUMMARY_BYTES",
    "TELEMETRY_FORMAT",
    "TOP_K",
    "Inference",
    "OutputSpec",
    "OutputSummary",
    "Summary",
    "Telemetry",
    "TelemetryError",
    "validate_reference",
    "validate_summary",
]
