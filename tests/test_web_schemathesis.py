"""The live management API fuzzed from its own OpenAPI document with schemathesis: no
server error, every status and body as documented, input the document forbids refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from harness import env, wait_for

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis import checks  # noqa: E402
from schemathesis.specs.openapi import checks as openapi_checks  # noqa: E402

HERE = Path(__file__).resolve().parent
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
    tmp = tmp_path_factory.mktemp("schemathesis")
    info_file = tmp / "panel.json"
    with open(tmp / "panel.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(HERE / "panel_server.py"), str(tmp / "panel"), str(info_file)],
            env=env(), stdout=log, stderr=log,
        )  # fmt: skip
    try:
        def ready():
            if process.poll() is not None:
                raise RuntimeError((tmp / "panel.log").read_text())
            return info_file.exists()

        wait_for(ready, what="the panel server")
        yield json.loads(info_file.read_text())
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def api_schema(panel):
    return schemathesis.openapi.from_url(panel["url"] + "/api/v1/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_document(case, panel):
    case.call_and_validate(
        base_url=panel["url"] + "/api/v1",
        headers={"authorization": f"Bearer {panel['keys']['rw']}"},
        checks=CHECKS,
        timeout=30,
    )
