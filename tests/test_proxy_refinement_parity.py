"""Refining with a previous mask (`mask_id`) equals `SamPredictor.predict(mask_input=...)` with
the same checkpoint, over the real proxy and Triton, on the real photographs.

Each photo goes through a chain, as an interactive client would: a click with three
candidates; a refinement from the best of them with a negative point and one answer; a
refinement of that answer with a box and three candidates; then one request mixing prompts
with and without previous masks (the second-ranked candidate among them). Upstream is fed the
logits of the same candidate at every step.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from proxy.encodings import decode_rle
from testkit.masks import mask_iou
from testkit.photos import Photo, photos

from .test_proxy_parity import MAX_SCORE_DIFFERENCE, MIN_MASK_IOU


def upstream_predict(predictor, prompt: dict, mask_input: np.ndarray | None, multimask: bool):
    """Masks, scores and low-res logits ranked as the proxy ranks its records."""
    points = np.array(prompt["points"], dtype=np.float32) if "points" in prompt else None
    labels = np.array(prompt["labels"]) if "labels" in prompt else None
    box = np.array(prompt["box"], dtype=np.float32) if "box" in prompt else None
    masks, scores, logits = predictor.predict(
        points,
        labels,
        box,
        mask_input=None if mask_input is None else mask_input[None],
        multimask_output=multimask,
    )
    order = np.argsort(-scores, kind="stable")
    return masks[order], scores[order], logits[order]


def assert_same(records: list[dict], expected, context: str) -> None:
    masks, scores, _ = expected
    assert len(records) == len(masks), context
    for rank, (record, mask, score) in enumerate(zip(records, masks, scores, strict=True)):
        iou = mask_iou(decode_rle(record["segmentation"]), mask)
        assert iou >= MIN_MASK_IOU, f"{context}, mask {rank}: IoU {iou:.4f}"
        difference = abs(record["predicted_iou"] - float(score))
        assert difference <= MAX_SCORE_DIFFERENCE, f"{context}, mask {rank}: score {difference}"


@pytest.mark.parametrize("photo", photos(), ids=lambda photo: photo.name)
def test_refinement_matches_sam_predictor_mask_input(http, predictor, photo: Photo) -> None:
    rgb = photo.rgb()
    height, width = rgb.shape[:2]
    predictor.set_image(rgb)

    def at(fx: float, fy: float) -> list[float]:
        return [round(fx * (width - 1), 1), round(fy * (height - 1), 1)]

    def ask(prompts: list[dict], multimask: bool, **form) -> list[list[dict]]:
        data = {"prompts": json.dumps(prompts), "multimask_output": str(multimask).lower()}
        response = http.post("/segment-image", data={**data, **form}, **upload)
        assert response.status_code == 200, response.text
        upload.clear()
        image_id.append(response.json()["image_id"])
        return [result["masks"] for result in response.json()["results"]]

    upload = {"files": {"file": (photo.name, photo.data)}}
    image_id: list[str] = []

    click = {"points": [at(0.5, 0.5)], "labels": [1]}
    (first,) = ask([click], True)
    first_expected = upstream_predict(predictor, click, None, True)
    assert_same(first, first_expected, f"{photo.name} / click")

    refined = {"points": [at(0.5, 0.5), at(0.2, 0.3)], "labels": [1, 0]}
    (second,) = ask([{**refined, "mask_id": first[0]["mask_id"]}], False, image_id=image_id[-1])
    second_expected = upstream_predict(predictor, refined, first_expected[2][0], False)
    assert_same(second, second_expected, f"{photo.name} / refined with the best mask")

    boxed = {**refined, "box": [*at(0.2, 0.25), *at(0.8, 0.85)]}
    (third,) = ask([{**boxed, "mask_id": second[0]["mask_id"]}], True, image_id=image_id[-1])
    third_expected = upstream_predict(predictor, boxed, second_expected[2][0], True)
    assert_same(third, third_expected, f"{photo.name} / refined again with a box")

    other = {"points": [at(0.3, 0.6)], "labels": [1]}
    mixed = [
        {**click, "mask_id": first[1]["mask_id"]},  # the second-ranked candidate
        other,  # same length, no mask: the same decoder call
        {**boxed, "mask_id": third[2]["mask_id"]},
    ]
    answers = ask(mixed, True, image_id=image_id[-1])
    expectations = [
        upstream_predict(predictor, click, first_expected[2][1], True),
        upstream_predict(predictor, other, None, True),
        upstream_predict(predictor, boxed, third_expected[2][2], True),
    ]
    for index, (records, expected) in enumerate(zip(answers, expectations, strict=True)):
        assert_same(records, expected, f"{photo.name} / mixed prompt {index}")
