"""Automated rollouts (issue 9): rollout plans, stage gates judged on install outcomes and on
the inference telemetry devices report, and the controller that promotes, holds, pauses or
rolls back a release by signing new rollout metadata through the normal publish transaction.

Runs inside the fleet service's process or beside it (it needs the ``server`` extra); a device
never imports it. Shared types live in :mod:`ota.rollout._verdict`.
"""
