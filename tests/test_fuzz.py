"""schemathesis against the proxy's own OpenAPI document: every route, generated requests.

Checks: no 5xx, every status documented for its route, and every response's content type,
headers and body as documented (errors as `Problem` in application/problem+json). Examples
are derandomized, so a run is reproducible, and bounded per route. The proxy runs in front
of the real Triton with a low segment-everything prompt limit, so that a generated run that
happens to be valid stays cheap.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from common.settings import Settings
from testkit.processes import ServerProcess, proxy_process

from .conftest import BUILD
from .test_proxy_api import png_bytes

EXAMPLES_PER_ROUTE = 60
# Generated requests rarely get past the first check (random bytes are not pictures), so a
# few real requests go through the same checks too: they reach the cache and Triton, and their
# answers are validated against the success schemas.
PICTURE = png_bytes(48, 32, seed=50)
REAL_REQUESTS = {
    "POST /embed-image": [{"file": PICTURE}],
    "POST /segment-image": [
        {"file": PICTURE, "prompts": '[{"points": [[10, 12]], "labels": [1]}]'},
        {
            "file": PICTURE,
            "prompts": '[{"box": [2, 3, 40, 30]}, {"points": [[5, 5], [30, 20]]}]',
            "multimask_output": "false",
            "output_format": "polygon",
        },
        {"file": PICTURE, "points_per_side": "3", "return_overlay": "true"},
        {"file": PICTURE, "points_per_side": "2", "output_format": "png"},
    ],
}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def fuzzed_proxy(settings: Settings, triton_server) -> ServerProcess:
    env = {"MAX_EVERYTHING_PROMPTS": "64", "REQUEST_TIMEOUT_S": "60"}
    with proxy_process(settings, BUILD / "logs" / "proxy-fuzz.log", env, "/readyz") as process:
        yield process


@pytest.fixture(scope="module")
def operations(fuzzed_proxy: ServerProcess) -> dict:
    schema = schemathesis.openapi.from_url(f"{fuzzed_proxy.base_url}/openapi.json")
    found = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        found[f"{operation.method.upper()} {operation.path}"] = operation
    return found


def test_every_route_is_fuzzed(operations) -> None:
    assert set(operations) >= {
        "POST /segment-image",
        "POST /embed-image",
        "GET /healthz",
        "GET /readyz",
        "GET /metrics",
    }


@pytest.mark.parametrize(
    "route",
    ["POST /segment-image", "POST /embed-image", "GET /healthz", "GET /readyz", "GET /metrics"],
)
def test_generated_requests_get_documented_answers(operations, route: str) -> None:
    @given(case=operations[route].as_strategy())
    @settings(
        max_examples=EXAMPLES_PER_ROUTE,
        derandomize=True,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def call(case) -> None:
        case.call_and_validate(checks=CHECKS, timeout=90)

    call()


@pytest.mark.parametrize("route", sorted(REAL_REQUESTS))
def test_real_requests_get_documented_answers(operations, route: str) -> None:
    for body in REAL_REQUESTS[route]:
        case = operations[route].Case(body=body, media_type="multipart/form-data")
        response = case.call_and_validate(checks=CHECKS, timeout=120)
        assert response.status_code == 200, response.text
