"""The OpenAPI 3.1 document the service serves is valid, and schemathesis over it (positive and
negative cases for every operation, with an admin token and with none) finds no 5xx and no
response that breaks the documented schema, on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import jsonschema_rs
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
)
from schemathesis.core.result import Ok

from tests.fleet_fixtures import (  # noqa: F401
    FleetService,
    call,
    fleet_backend,
    fleet_service,
    postgres,
)

EXAMPLES = 25
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]


def test_served_document_is_valid_openapi_3_1(fleet_service: FleetService) -> None:
    r = call("GET", f"{fleet_service.url}/v1/openapi.json")
    assert r.status == 200 and r.doc["openapi"] == "3.1.0"
    schema = schemathesis.openapi.from_dict(r.doc)
    schema.validate()  # against the OpenAPI 3.1 meta-schema
    broken = dict(r.doc, paths={"/x": {"get": {"responses": 5}}})
    with pytest.raises(jsonschema_rs.ValidationError):  # the validator is no rubber stamp
        schemathesis.openapi.from_dict(broken).validate()


def test_schemathesis_finds_no_server_error_and_no_schema_break(
    fleet_service: FleetService,
) -> None:
    svc = fleet_service
    cred = svc.enroll("dev-1")
    doc = call("GET", f"{svc.url}/v1/openapi.json").doc
    schema = schemathesis.openapi.from_dict(doc)
    operations = [r.ok() for r in schema.get_all_operations() if isinstance(r, Ok)]
    assert len(operations) == sum(len(ops) for ops in doc["paths"].values())
    calls = {"n": 0, "ok": 0, "no_negative": 0}
    for op in operations:
        device_call = op.method.upper() == "POST" and op.path in (
            "/v1/devices/{device_id}/events",
            "/v1/devices/{device_id}/credential",
        )
        for mode in GenerationMode:
            # device calls name the enrolled device, so generated reports reach the parser
            strategy = (
                op.as_strategy(mode, path_parameters={"device_id": "dev-1"})
                if device_call
                else op.as_strategy(mode)
            )
            try:
                _fuzz(strategy, svc.url, cred if device_call else svc.admin_token, calls)
            except Unsatisfiable:
                # no invalid variant exists (no parameter or body to break)
                assert mode is GenerationMode.NEGATIVE, op.path
                calls["no_negative"] += 1
    assert calls["no_negative"] < len(operations) / 2
    assert calls["n"] >= len(operations) * 2
    assert calls["ok"] > 0  # the generated calls were not all refused
    assert call("GET", f"{svc.url}/v1/health").status == 200


def _fuzz(strategy: Any, base_url: str, token: str, calls: dict[str, int]) -> None:
    """Run schemathesis' cases from ``strategy``, each with ``token`` and with no credential."""

    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        for headers in ({"Authorization": f"Bearer {token}"}, {}):
            resp = case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS)
            calls["n"] += 1
            calls["ok"] += resp.status_code < 300

    run()
