"""Rollout plans: the default plan is valid and documented; every malformed or contradictory
plan is refused with a clear message naming its key and exit code 3, and starts nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ota.cli._main import _register, cli
from ota.errors import ExitCode
from ota.rollout._plan import (
    DEFAULT_PLAN_TOML,
    PlanError,
    default_plan,
    load_plan,
    plan_from_dict,
    plan_from_toml,
)
from ota.rollout._verdict import Action

GOOD = """
on_failure = "rollback"
device_timeout = "2h"
[[stages]]
ring = "canary"
percent = 100
min_devices = 3
soak = "30m"
[[stages]]
ring = "pilot"
percent = 10
min_devices = 5
soak = 3600
deadline = "1d"
approval = true
[[stages]]
ring = "ga"
percent = 100
min_devices = 10
soak = "1d"
[gates.install]
max_failure_rate = 0.1
min_devices = 4
[gates.health]
latency_p95_ratio = 1.2
min_inferences = 500
"""


def test_default_plan_is_valid_and_documented() -> None:
    plan = default_plan()
    assert [s.ring for s in plan.stages] == ["canary", "pilot", "pilot", "ga", "ga", "ga"]
    assert plan.on_failure is Action.PAUSE
    assert plan.stages[-1].percent == 100.0
    runbook = (Path(__file__).parent.parent / "docs/runbooks/rollout.md").read_text()
    assert DEFAULT_PLAN_TOML.strip() in runbook  # the runbook shows the plan the code uses


def test_a_good_plan_parses_and_round_trips() -> None:
    plan = plan_from_toml(GOOD)
    assert plan.on_failure is Action.ROLLBACK
    assert plan.device_timeout_s == 7200
    assert [(s.ring, s.percent, s.min_devices, s.soak_s) for s in plan.stages] == [
        ("canary", 100.0, 3, 1800.0),
        ("pilot", 10.0, 5, 3600.0),
        ("ga", 100.0, 10, 86400.0),
    ]
    assert plan.stages[1].approval and plan.stages[1].deadline_s == 86400.0
    assert plan.stages[0].deadline_s == 3 * 86400.0  # the plan-wide default
    assert plan.install.max_failure_rate == 0.1 and plan.install.min_devices == 4
    assert dict(plan.health) == {"latency_p95_ratio": 1.2, "min_inferences": 500.0}
    again = plan_from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan and again.digest() == plan.digest()
    assert plan.earliest_timeline() == [0.0, 1800.0, 5400.0]


def _replace(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new, 1)


BAD = {
    "not toml": ("[[stages]\nring=", "not valid TOML"),
    "unknown top key": ("foo = 1\n" + GOOD, "unknown key"),
    "unknown stage key": (_replace('soak = "30m"', 'soak = "30m"\nsoke = 1'), "stages[0]"),
    "unknown gate table": (GOOD + "\n[gates.latency]\nx = 1\n", "gates"),
    "unknown install key": (_replace("min_devices = 4", "min_device = 4"), "gates.install"),
    "rings out of order": (_replace('ring = "ga"', 'ring = "canary"'), "rings go canary"),
    "percent not increasing": (
        _replace("percent = 10\n", "percent = 10\n")
        + '[[stages]]\nring = "ga"\npercent = 50\nmin_devices = 1\nsoak = 1\n',
        "does not increase",
    ),
    "percent zero": (_replace("percent = 10\n", "percent = 0\n"), "outside (0, 100]"),
    "percent above 100": (_replace("percent = 10\n", "percent = 100.5\n"), "outside (0, 100]"),
    "percent nan": (_replace("percent = 10\n", "percent = nan\n"), "finite"),
    "percent as text": (_replace("percent = 10\n", 'percent = "10"\n'), "a number"),
    "unknown ring": (_replace('ring = "pilot"', 'ring = "beta"'), "is not one of"),
    "min_devices zero": (_replace("min_devices = 3", "min_devices = 0"), "min_devices"),
    "min_devices bool": (_replace("min_devices = 3", "min_devices = true"), "an integer"),
    "missing soak": (_replace('soak = "30m"\n', ""), "missing 'soak'"),
    "bad duration": (_replace('soak = "30m"', 'soak = "30 minutes"'), "not a duration"),
    "negative duration": (_replace('soak = "30m"', "soak = -5"), "outside 0 s"),
    "duration too long": (_replace('soak = "30m"', 'soak = "400d"'), "outside 0 s"),
    "deadline before soak": (_replace('deadline = "1d"', 'deadline = "10m"'), "shorter than soak"),
    "approval not bool": (_replace("approval = true", 'approval = "yes"'), "true or false"),
    "rate out of range": (_replace("max_failure_rate = 0.1", "max_failure_rate = 1.0"), "[0, 1)"),
    "security min zero": (
        _replace("min_devices = 4", "min_devices = 4\nsecurity_min_devices = 0"),
        "security_min_devices",
    ),
    "rate negative": (_replace("max_failure_rate = 0.1", "max_failure_rate = -0.1"), "[0, 1)"),
    "on_failure": (_replace('on_failure = "rollback"', 'on_failure = "ignore"'), "on_failure"),
    "zero timeout": (_replace('device_timeout = "2h"', "device_timeout = 0"), "device_timeout"),
    "no stages": ('on_failure = "pause"\n', "at least one"),
    "health not numbers": (_replace("min_inferences = 500", 'min_inferences = "500"'), "health"),
    "health nested": (GOOD + "\n[gates.health.p95]\nx = 1\n", "gates.health.p95"),
    "health inf": (_replace("min_inferences = 500", "min_inferences = inf"), "finite"),
    "health bad key": (_replace("min_inferences = 500", '"Min-Inf" = 500'), "lower_snake_case"),
    "wrong format": ('format = "edge-ota.rollout-plan/9"\n' + GOOD, "format"),
    "drift metric unknown": (
        _replace("min_inferences = 500", 'min_inferences = 500\ndrift_metric = "kl"'),
        "gates.health.drift_metric: 'kl' is not one of 'js', 'psi'",
    ),
    "drift metric a number": (
        _replace("min_inferences = 500", "min_inferences = 500\ndrift_metric = 1"),
        "gates.health.drift_metric",
    ),
    "drift metric upper case": (
        _replace("min_inferences = 500", 'min_inferences = 500\ndrift_metric = "PSI"'),
        "is not one of",
    ),
    # an integer too large for a float (TOML integers are unbounded in Python): a PlanError,
    # never an OverflowError traceback (review1, low)
    "health huge integer": (
        _replace("min_inferences = 500", "min_inferences = 1" + "0" * 400),
        "gates.health.min_inferences: must be finite",
    ),
    "percent huge integer": (
        _replace("percent = 10\n", "percent = 1" + "0" * 400 + "\n"),
        "finite",
    ),
    "soak huge integer": (_replace('soak = "30m"', "soak = 1" + "0" * 400), "soak: must be finite"),
    "other health key as text": (
        _replace("min_inferences = 500", 'min_inferences = 500\nmax_drift = "psi"'),
        "gates.health.max_drift: a number",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_plans_are_refused_with_a_clear_error(case: str) -> None:
    text, words = BAD[case]
    with pytest.raises(PlanError) as e:
        plan_from_toml(text)
    assert words in str(e.value), str(e.value)
    assert e.value.exit_code == ExitCode.INPUT


def test_drift_metric_is_chosen_per_plan_and_reaches_the_gates() -> None:
    from ota.rollout._health import HealthThresholds

    assert default_plan().health["drift_metric"] == "js"  # the default plan says it
    psi = plan_from_toml(
        _replace("min_inferences = 500", 'min_inferences = 500\ndrift_metric = "psi"')
    )
    assert psi.health["drift_metric"] == "psi"
    again = plan_from_dict(json.loads(json.dumps(psi.to_dict())))  # as stored with a rollout
    assert again == psi and again.digest() != plan_from_toml(GOOD).digest()
    th = HealthThresholds.from_mapping({"drift_metric": again.health["drift_metric"]})
    assert th.drift_metric == "psi"


def test_cli_refuses_an_unknown_drift_metric_with_exit_3(tmp_path: Path) -> None:
    _register()
    bad = tmp_path / "bad.toml"
    bad.write_text(_replace("min_inferences = 500", 'min_inferences = 500\ndrift_metric = "kl"'))
    db = tmp_path / "fleet.sqlite3"
    args = ["--project", str(tmp_path), "--db", f"sqlite:///{db}", "--json"]
    r = CliRunner().invoke(cli, ["rollout", "start", "m", "1.0.0", "--plan", str(bad), *args])
    assert r.exit_code == ExitCode.INPUT, r.output
    assert "drift_metric" in json.loads(r.stdout)["message"]
    assert not db.exists()  # nothing was opened, nothing started
    r = CliRunner().invoke(cli, ["rollout", "plan", str(bad)])
    assert r.exit_code == ExitCode.INPUT


def test_oversized_or_binary_plans_are_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.toml"
    big.write_text(GOOD + "#" * 70_000)
    with pytest.raises(PlanError, match="larger than"):
        load_plan(big)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe" + GOOD.encode())
    with pytest.raises(PlanError, match="UTF-8"):
        load_plan(binary)
    with pytest.raises(PlanError, match="cannot read"):
        load_plan(tmp_path / "absent.toml")


def test_cli_refuses_a_bad_plan_with_exit_3_before_touching_anything(tmp_path: Path) -> None:
    _register()
    bad = tmp_path / "bad.toml"
    bad.write_text(_replace('ring = "ga"', 'ring = "canary"'))
    db = tmp_path / "fleet.sqlite3"
    r = CliRunner().invoke(
        cli,
        [
            "rollout",
            "start",
            "m",
            "1.0.0",
            "--plan",
            str(bad),
            "--project",
            str(tmp_path),
            "--db",
            f"sqlite:///{db}",
            "--json",
        ],
    )
    assert r.exit_code == ExitCode.INPUT, r.output
    doc = json.loads(r.stdout)
    assert doc["kind"] == "input" and "rings go canary" in doc["message"]
    assert not db.exists()  # refused before the database was even opened
    ok = CliRunner().invoke(cli, ["rollout", "plan", str(tmp_path / "none.toml")])
    assert ok.exit_code == ExitCode.INPUT
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    ok = CliRunner().invoke(cli, ["rollout", "plan", str(good), "--json"])
    assert ok.exit_code == 0 and json.loads(ok.stdout)["on_failure"] == "rollback"


def test_psi_smooths_empty_bins_as_documented() -> None:
    """The runbook's PSI: proportions + 1e-4, renormalised, then sum (a - e) ln(a / e) over
    the bins plus under, over and NaN: an empty bin gives a finite value, this one."""
    import math

    from ota.client._telemetry_format import OutputSpec, OutputSummary
    from ota.repository._drift import EPS, jensen_shannon, psi

    spec = OutputSpec("y", "hist", 0.0, 1.0, 2)
    e, a = OutputSummary(spec, 10, (10, 0)), OutputSummary(spec, 10, (0, 10))
    assert EPS == 1e-4  # the value the runbook gives
    k = 5  # two bins + under, over, NaN
    pe = [(x + EPS) / (1 + k * EPS) for x in (1.0, 0.0, 0.0, 0.0, 0.0)]
    pa = [(x + EPS) / (1 + k * EPS) for x in (0.0, 1.0, 0.0, 0.0, 0.0)]
    want = sum((x - y) * math.log(x / y) for x, y in zip(pa, pe, strict=True))
    assert math.isfinite(psi(e, a)) and abs(psi(e, a) - want) < 1e-9
    assert abs(jensen_shannon(e, a) - 1.0) < 1e-6  # disjoint: the JS distance's maximum
