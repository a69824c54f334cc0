"""The routes, the service and the error mapping in process, with a stand-in for Triton.

The same app `python -m proxy` serves (`create_app`), its gateway replaced by
`tests.standins.StandInGateway`: every domain error reaches the client as the problem document
the README's error table promises, without a server. The real-server versions of these checks
are in test_proxy_api.py and test_proxy_operations.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from common.settings import Settings
from proxy import errors
from proxy.app import create_app
from proxy.problems import STATUS, status_of

from .standins import StandInGateway
from .test_proxy_api import POINT, assert_problem, png_bytes


@pytest.fixture
def gateway() -> StandInGateway:
    return StandInGateway()


@pytest.fixture
def client(gateway: StandInGateway) -> Iterator[TestClient]:
    app = create_app(Settings(triton_retry_after_s=7), lambda settings, metrics: gateway)
    with TestClient(app) as client:
        yield client


def post(client: TestClient, data: bytes | None = None, **form) -> object:
    files = {"file": ("image", data)} if data is not None else None
    return client.post("/segment-image", data=form, files=files)


def test_a_prompt_is_answered_and_its_image_cached(client, gateway) -> None:
    first = post(client, png_bytes(seed=1), prompts=POINT)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["cache_hit"] is False and (body["width"], body["height"]) == (160, 120)
    assert [len(result["masks"]) for result in body["results"]] == [3]
    again = post(client, image_id=body["image_id"], prompts=POINT, multimask_output="false")
    assert again.status_code == 200 and again.json()["cache_hit"] is True
    assert [len(result["masks"]) for result in again.json()["results"]] == [1]
    assert gateway.calls == {"encode": 1, "decode": 2}


def test_bad_prompts_are_refused_before_the_encoder(client, gateway) -> None:
    response = post(client, png_bytes(seed=2), prompts='[{"points": [[1e9, 5]]}]')
    body = assert_problem(response, 422, "coordinate_out_of_range")
    assert "prompts[0].points[0][0]" in body["detail"]
    assert gateway.calls["encode"] == 0


@pytest.mark.parametrize(
    ("form", "upload", "status", "code"),
    [
        ({"prompts": POINT}, None, 422, "image_required"),
        ({"prompts": POINT, "image_id": "0" * 64}, b"x", 422, "image_required"),
        ({"prompts": POINT, "image_id": "0" * 64}, None, 404, "unknown_image_id"),
        ({"prompts": POINT}, b"", 422, "empty_file"),
        ({"prompts": POINT}, b"plain text, not a picture", 415, "unsupported_media_type"),
        ({"prompts": POINT}, png_bytes()[:60], 422, "corrupt_image"),
        ({"prompts": "[{"}, png_bytes(), 422, "malformed_json"),
        ({"points_per_side": "65"}, png_bytes(), 422, "invalid_parameter"),
    ],
)
def test_bad_requests_get_their_problem(client, form, upload, status, code) -> None:
    assert_problem(post(client, upload, **form), status, code)


@pytest.mark.parametrize(
    ("failure", "status", "code"),
    [
        (errors.TritonUnavailable("queue full"), 503, "triton_unavailable"),
        (errors.TritonTimeout("too slow"), 504, "triton_timeout"),
        (errors.TritonFailed("model error"), 502, "triton_error"),
    ],
)
def test_triton_failures_map_to_gateway_statuses(client, gateway, failure, status, code) -> None:
    gateway.fail = failure
    response = post(client, png_bytes(seed=3), prompts=POINT)
    assert_problem(response, status, code)
    assert ("retry-after" in response.headers) == (status == 503)
    if status == 503:
        assert response.headers["retry-after"] == "7"


def test_readiness_follows_the_gateway(client, gateway) -> None:
    assert client.get("/readyz").status_code == 200
    gateway.fail = errors.TritonUnavailable("down")
    body = assert_problem(client.get("/readyz"), 503, "not_ready")
    assert body["triton"]["server"] is False


def test_everything_without_prompts(client) -> None:
    response = post(client, png_bytes(seed=4), points_per_side="4", pred_iou_thresh="0")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["count"] == len(body["masks"])


def test_every_domain_error_has_a_status() -> None:
    def subclasses(cls: type) -> list[type]:
        return [cls, *(c for sub in cls.__subclasses__() for c in subclasses(sub))]

    for cls in subclasses(errors.ServiceError)[1:]:
        assert 400 <= status_of(cls) < 600, cls
        # PromptError takes its code per instance (one per kind of mistake).
        assert cls is errors.PromptError or cls.code != errors.ServiceError.code, cls
    # Only bad input is 4xx; Triton's trouble is 5xx.
    assert all(status < 500 for cls, status in STATUS.items() if issubclass(cls, ValueError))
    assert status_of(errors.UnsupportedImageFormat) == 415
    assert status_of(errors.DegenerateImage) == 422
