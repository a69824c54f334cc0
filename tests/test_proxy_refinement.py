"""Refinement with a previous mask (`mask_id`), in process: the store, the prompt field, and
what reaches the decoder. Parity with SamPredictor(mask_input=...) over the real Triton is in
test_proxy_refinement_parity.py."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from common.settings import Settings
from proxy.app import create_app
from proxy.errors import PromptError
from proxy.mask_store import MaskStore, is_mask_id
from proxy.prompts import parse_prompts

from .standins import StandInGateway, random_decoder
from .test_proxy_api import assert_problem, png_bytes

MASK_BYTES = 256 * 256 * 4
LIMITS = {"width": 100, "height": 80, "max_prompts": 8, "max_points": 4, "coordinate_margin": 10}


def logits(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(256, 256)).astype(np.float32)


# --- the store --------------------------------------------------------------------------------


def test_store_keeps_copies_under_ids_of_their_content() -> None:
    store = MaskStore(budget_bytes=10 * MASK_BYTES)
    answer = np.stack([logits(1), logits(2)])
    ids = [store.put(("model", "image"), mask) for mask in answer]
    assert len(set(ids)) == 2 and all(is_mask_id(mask_id) for mask_id in ids)
    assert store.put(("model", "image"), logits(2)) == ids[1], "the same answer, the same id"
    assert store.put(("model", "other"), logits(2)) != ids[1], "another image, another id"
    assert len(store) == 3 and store.used_bytes == 3 * MASK_BYTES
    answer[:] = 0  # the decoder's buffer may be reused: the store holds its own copy
    kept = store.get(ids[1])
    assert kept is not None and kept.image_key == ("model", "image")
    np.testing.assert_array_equal(kept.logits, logits(2))
    assert kept.logits.base is None, "a view would pin the whole decoder answer"
    assert store.get("0" * 32) is None


def test_store_is_bounded_in_bytes_and_evicts_the_least_recently_used() -> None:
    store = MaskStore(budget_bytes=3 * MASK_BYTES)
    first, second, third = (store.put(("m", "i"), logits(seed)) for seed in range(3))
    assert store.get(first) is not None  # now the most recently used
    fourth = store.put(("m", "i"), logits(3))
    assert store.get(second) is None, "the least recently used goes first"
    assert all(store.get(mask_id) is not None for mask_id in (first, third, fourth))
    assert len(store) == 3 and store.used_bytes == 3 * MASK_BYTES


# --- the prompt field -------------------------------------------------------------------------


def test_prompt_items_accept_a_mask_id() -> None:
    mask_id = "0123456789abcdef" * 2
    (prompt,) = parse_prompts(
        json.dumps([{"points": [[5, 5]], "labels": [1], "mask_id": mask_id}]), **LIMITS
    )
    assert prompt.mask_id == mask_id and prompt.mask_input is None


@pytest.mark.parametrize(
    ("item", "code", "where"),
    [
        ({"points": [[5, 5]], "mask_id": "not-a-handle"}, "invalid_mask_id", "prompts[0].mask_id"),
        ({"points": [[5, 5]], "mask_id": "ABCDEF" * 6}, "invalid_mask_id", "prompts[0].mask_id"),
        ({"points": [[5, 5]], "mask_id": 12}, "invalid_mask_id", "prompts[0].mask_id"),
        ({"mask_id": "0" * 32}, "empty_prompt", "prompts[0]"),
    ],
)
def test_bad_mask_ids_are_refused(item: dict, code: str, where: str) -> None:
    with pytest.raises(PromptError) as raised:
        parse_prompts(json.dumps([item]), **LIMITS)
    assert raised.value.code == code and raised.value.location == where


# --- through the routes -------------------------------------------------------------------------


class RecordingDecoder:
    """The stand-in's random decoder, keeping every answer it gave."""

    def __init__(self) -> None:
        self.decode = random_decoder(seed=5)
        self.answers: list[tuple[np.ndarray, np.ndarray]] = []

    def __call__(self, embedding, coords, labels):
        answer = self.decode(embedding, coords, labels)
        self.answers.append(answer)
        return answer


@pytest.fixture
def decoder() -> RecordingDecoder:
    return RecordingDecoder()


@pytest.fixture
def gateway(decoder: RecordingDecoder) -> StandInGateway:
    return StandInGateway(decode=decoder)


@pytest.fixture
def client(gateway: StandInGateway) -> Iterator[TestClient]:
    app = create_app(Settings(), lambda settings, metrics: gateway)
    with TestClient(app) as client:
        yield client


def segment(client: TestClient, prompts: list[dict], upload: bytes | None = None, **form):
    files = {"file": ("image", upload)} if upload is not None else None
    return client.post("/segment-image", data={"prompts": json.dumps(prompts), **form}, files=files)


def test_each_mask_gets_an_id_that_sends_its_logits_back_as_mask_input(
    client, gateway, decoder
) -> None:
    first = segment(client, [{"points": [[40, 30]], "labels": [1]}], png_bytes(seed=11))
    assert first.status_code == 200, first.text
    body = first.json()
    masks = body["results"][0]["masks"]
    assert len(masks) == 3 and all(is_mask_id(mask["mask_id"]) for mask in masks)
    assert gateway.mask_inputs == [None], "no previous mask: the one unused mask input"

    # The second-ranked candidate: its own token's logits must come back, not the best's.
    low_res, iou = decoder.answers[0]
    tokens = 1 + np.argsort(-iou[0, 1:], kind="stable")
    chosen = masks[1]
    assert chosen["predicted_iou"] == pytest.approx(float(iou[0, tokens[1]]))
    second = segment(
        client,
        [{"points": [[40, 30], [90, 70]], "labels": [1, 0], "mask_id": chosen["mask_id"]}],
        image_id=body["image_id"],
        multimask_output="false",
    )
    assert second.status_code == 200, second.text
    assert len(second.json()["results"][0]["masks"]) == 1
    mask_input, has_mask_input = gateway.mask_inputs[1]
    assert mask_input.shape == (1, 1, 256, 256)
    np.testing.assert_array_equal(mask_input[0, 0], low_res[0, tokens[1]])
    np.testing.assert_array_equal(has_mask_input, [1])
    assert gateway.calls["encode"] == 1


def test_prompts_with_and_without_masks_share_a_decoder_call(client, gateway, decoder) -> None:
    first = segment(client, [{"points": [[40, 30]]}], png_bytes(seed=12)).json()
    mask_id = first["results"][0]["masks"][0]["mask_id"]
    low_res, iou = decoder.answers[0]
    best = low_res[0, 1 + int(np.argmax(iou[0, 1:]))]
    prompts = [
        {"points": [[10, 10]]},  # a point and upstream's padding point: 2
        {"points": [[50, 40]], "mask_id": mask_id},  # 2
        {"box": [5, 5, 60, 50], "mask_id": mask_id},  # two corners: 2
        {"points": [[10, 10], [20, 20]], "labels": [1, 0], "mask_id": mask_id},  # 3
    ]
    response = segment(client, prompts, image_id=first["image_id"])
    assert response.status_code == 200, response.text
    (two_masks, two_used), (three_masks, three_used) = gateway.mask_inputs[1:]
    np.testing.assert_array_equal(two_used, [0, 1, 1])
    assert two_masks.shape == (3, 1, 256, 256) and not two_masks[0].any()
    for masks in (two_masks[1, 0], two_masks[2, 0], three_masks[0, 0]):
        np.testing.assert_array_equal(masks, best)
    np.testing.assert_array_equal(three_used, [1])
    ids = [mask["mask_id"] for result in response.json()["results"] for mask in result["masks"]]
    assert len(set(ids)) == 12


def test_unknown_mask_ids_are_404_before_any_inference(client, gateway) -> None:
    prompts = [{"points": [[40, 30]], "mask_id": "f" * 32}]
    body = assert_problem(segment(client, prompts, png_bytes(seed=13)), 404, "unknown_mask_id")
    assert "prompts[0].mask_id" in body["detail"]
    assert gateway.calls == {"encode": 0, "decode": 0}


def test_a_mask_of_another_image_is_refused(client, gateway) -> None:
    first = segment(client, [{"points": [[40, 30]]}], png_bytes(seed=14)).json()
    mask_id = first["results"][0]["masks"][0]["mask_id"]
    prompts = [{"points": [[40, 30]]}, {"points": [[40, 30]], "mask_id": mask_id}]
    body = assert_problem(segment(client, prompts, png_bytes(seed=15)), 422, "mask_image_mismatch")
    assert "prompts[1].mask_id" in body["detail"]
    assert gateway.calls["encode"] == 1, "refused before the second image's encoder"


def test_malformed_mask_ids_are_422(client, gateway) -> None:
    prompts = [{"points": [[40, 30]], "mask_id": "../../etc"}]
    assert_problem(segment(client, prompts, png_bytes(seed=16)), 422, "invalid_mask_id")
    assert gateway.calls["encode"] == 0
