"""Segment-everything as server-sent events (`Accept: text/event-stream`): progress, then the
same body as the plain request, or a problem document if the run fails midway.

In process with a stand-in decoder first; then once over the real proxy and Triton.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from common import contract
from common.settings import Settings
from proxy import errors
from proxy.app import create_app
from testkit.photos import photos

from .standins import StandInGateway
from .test_proxy_api import assert_problem, png_bytes

EVENT_STREAM = {"Accept": "text/event-stream"}
GRID = {
    "points_per_side": "6",
    "points_per_batch": "8",
    "pred_iou_thresh": "0",
    "stability_score_thresh": "0",
}


def disc_decoder(embedding, coords, labels):
    """Discs around each prompt's first point, one radius per mask token: deterministic, so a
    streamed run and a plain one must give the same masks."""
    side = contract.LOW_RES_SIDE
    rows, cols = np.mgrid[0:side, 0:side].astype(np.float32) * (1024 / side)
    logits = np.empty((len(coords), contract.MASK_TOKENS, side, side), dtype=np.float32)
    for prompt, (x, y) in enumerate(coords[:, 0]):
        distance = np.hypot(cols - x, rows - y)
        for token in range(contract.MASK_TOKENS):
            logits[prompt, token] = (60 + 40 * token - distance) / 4
    iou = np.tile(np.linspace(0.9, 0.6, contract.MASK_TOKENS, dtype=np.float32), (len(coords), 1))
    return logits, iou


def read_events(response) -> list[tuple[str, dict]]:
    events = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


@pytest.fixture
def gateway() -> StandInGateway:
    return StandInGateway(decode=disc_decoder)


@pytest.fixture
def client(gateway: StandInGateway) -> Iterator[TestClient]:
    app = create_app(Settings(triton_retry_after_s=7), lambda settings, metrics: gateway)
    with TestClient(app) as client:
        yield client


def test_progress_then_the_plain_requests_body(client) -> None:
    upload = {"file": ("image", png_bytes(width=200, height=150, seed=21))}
    plain = client.post("/segment-image", data=GRID, files=upload)
    assert plain.status_code == 200, plain.text
    streamed = client.post("/segment-image", data=GRID, files=upload, headers=EVENT_STREAM)
    assert streamed.status_code == 200
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.headers["cache-control"] == "no-cache"
    events = read_events(streamed)
    names = [name for name, _ in events]
    assert names[-1] == "result" and set(names[:-1]) == {"progress"}
    progress = [data for name, data in events if name == "progress"]
    total = 6 * 6
    assert progress[0] == {"done": 0, "total": total} and progress[-1]["done"] == total
    assert all(data["total"] == total for data in progress)
    done = [data["done"] for data in progress]
    assert done == sorted(done) and len(done) > 2, "one count per decoder batch of 8 points"
    result, expected = events[-1][1], plain.json()
    assert result["count"] == expected["count"] > 0
    assert result["masks"] == expected["masks"]
    assert result.keys() == expected.keys()


def test_a_failure_midway_is_an_error_event(client, gateway) -> None:
    embedded = client.post("/embed-image", files={"file": ("image", png_bytes(seed=22))})
    gateway.fail = errors.TritonUnavailable("queue full")
    streamed = client.post(
        "/segment-image",
        data={**GRID, "image_id": embedded.json()["image_id"]},
        headers=EVENT_STREAM,
    )
    assert streamed.status_code == 200, "the stream had started"
    (*_, (name, problem)) = read_events(streamed)
    assert name == "error"
    assert problem["status"] == 503 and problem["code"] == "triton_unavailable"
    assert problem["retry_after_s"] == 7


def test_refusals_before_the_run_are_plain_problems(client, gateway) -> None:
    response = client.post(
        "/segment-image",
        data={"points_per_side": "65"},
        files={"file": ("image", png_bytes(seed=23))},
        headers=EVENT_STREAM,
    )
    assert_problem(response, 422, "invalid_parameter")
    response = client.post(
        "/segment-image",
        files={"file": ("notes.txt", b"plain text")},
        headers=EVENT_STREAM,
    )
    assert_problem(response, 415, "unsupported_media_type")
    assert gateway.calls == {"encode": 0, "decode": 0}


def test_prompted_requests_stay_json(client) -> None:
    response = client.post(
        "/segment-image",
        data={"prompts": '[{"points": [[20, 20]]}]'},
        files={"file": ("image", png_bytes(seed=24))},
        headers=EVENT_STREAM,
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert len(response.json()["results"]) == 1


def test_streamed_everything_over_the_real_stack_matches_the_plain_request(http) -> None:
    photo = next(photo for photo in photos() if photo.name == "landscape-png")
    form = {"points_per_side": "4", "pred_iou_thresh": "0", "stability_score_thresh": "0"}
    plain = http.post("/segment-image", data=form, files={"file": (photo.name, photo.data)})
    assert plain.status_code == 200, plain.text
    form["image_id"] = plain.json()["image_id"]
    with http.stream("POST", "/segment-image", data=form, headers=EVENT_STREAM) as streamed:
        assert streamed.status_code == 200
        streamed.read()
    events = read_events(streamed)
    assert events[0] == ("progress", {"done": 0, "total": 16})
    assert events[-2] == ("progress", {"done": 16, "total": 16})
    name, result = events[-1]
    assert name == "result" and result["cache_hit"] is True
    assert result["count"] == plain.json()["count"] > 0
    assert result["masks"] == plain.json()["masks"]
