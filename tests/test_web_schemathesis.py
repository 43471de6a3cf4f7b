"""The live management API fuzzed from its own OpenAPI document with schemathesis: no
server error, every status and body as documented, input the document forbids refused."""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from panel import panel_process
from schemathesis import checks
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi import checks as openapi_checks

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "12"))  # per operation; more for a deep run
CHECKS = [
    checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.negative_data_rejection,
]


@pytest.fixture(scope="module")
def panel(tmp_path_factory):
    with panel_process(tmp_path_factory.mktemp("schemathesis")) as info:
        yield info


@pytest.fixture(scope="module")
def api_schema(panel):
    return schemathesis.openapi.from_url(panel["url"] + "/api/v1/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_document(case, panel):
    # The key goes with every case but those whose headers are the invalid part (the
    # Authorization header left out): adding it would make them valid requests again.
    meta = case.meta
    negative_headers = meta is not None and meta.is_negative_at(ParameterLocation.HEADER)
    case.call_and_validate(
        base_url=panel["url"] + "/api/v1",
        headers=None if negative_headers else {"authorization": f"Bearer {panel['keys']['rw']}"},
        checks=CHECKS,
        timeout=30,
    )
