"""The proxy's masks and scores equal upstream `SamPredictor`'s, with the same checkpoint.

Every transform is on the line here: decoding, resize, pad, coordinate mapping, the decoder
contract, upsampling, cropping and thresholding.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from proxy.encodings import decode_rle
from testkit.masks import mask_iou
from testkit.photos import Photo, photos

MIN_MASK_IOU = 0.98
MAX_SCORE_DIFFERENCE = 0.01


def prompt_sets(width: int, height: int) -> dict[str, list[dict]]:
    """Prompt sets in original-image pixels, scaled to the picture."""

    def at(fx: float, fy: float) -> list[float]:
        return [round(fx * (width - 1), 1), round(fy * (height - 1), 1)]

    box = [*at(0.2, 0.25), *at(0.75, 0.8)]
    return {
        "single point": [{"points": [at(0.5, 0.5)], "labels": [1]}],
        "points with negatives": [
            {
                "points": [at(0.45, 0.5), at(0.1, 0.1), at(0.6, 0.55), at(0.9, 0.85)],
                "labels": [1, 0, 1, 0],
            }
        ],
        "box": [{"box": box}],
        "box with points": [{"box": box, "points": [at(0.5, 0.5), at(0.3, 0.7)], "labels": [1, 0]}],
        "several prompts": [
            {"points": [at(0.3, 0.3)], "labels": [1]},
            {"points": [at(0.7, 0.6)], "labels": [1]},
            {"box": [*at(0.1, 0.1), *at(0.5, 0.6)]},
            {"points": [at(0.5, 0.5), at(0.2, 0.8)], "labels": [1, 0]},
        ],
    }


def upstream_predict(predictor, prompt: dict, multimask: bool):
    points = np.array(prompt["points"], dtype=np.float32) if "points" in prompt else None
    labels = np.array(prompt["labels"]) if "labels" in prompt else None
    box = np.array(prompt["box"], dtype=np.float32) if "box" in prompt else None
    masks, scores, _ = predictor.predict(points, labels, box, multimask_output=multimask)
    order = np.argsort(-scores, kind="stable")
    return masks[order], scores[order]


@pytest.mark.parametrize("photo", photos(), ids=lambda photo: photo.name)
def test_prompted_masks_match_sam_predictor(http, predictor, photo: Photo) -> None:
    rgb = photo.rgb()
    height, width = rgb.shape[:2]
    predictor.set_image(rgb)
    image_id = None
    worst_iou, worst_score = 1.0, 0.0
    # Every prompt set with multimask on; with it off, token 0 instead of 1..3 is the only
    # difference, so three sets (one point, box with points, several prompts) cover it.
    matrix = [(True, name) for name in prompt_sets(width, height)]
    matrix += [(False, "single point"), (False, "box with points"), (False, "several prompts")]
    for multimask, name in matrix:
        prompts = prompt_sets(width, height)[name]
        form = {"prompts": json.dumps(prompts), "multimask_output": str(multimask).lower()}
        if image_id is None:
            response = http.post(
                "/segment-image", data=form, files={"file": (photo.name, photo.data)}
            )
        else:
            response = http.post("/segment-image", data={**form, "image_id": image_id})
        assert response.status_code == 200, response.text
        body = response.json()
        image_id = body["image_id"]
        assert (body["width"], body["height"]) == (width, height)
        assert len(body["results"]) == len(prompts)
        for prompt, result in zip(prompts, body["results"], strict=True):
            expected_masks, expected_scores = upstream_predict(predictor, prompt, multimask)
            assert len(result["masks"]) == len(expected_masks) == (3 if multimask else 1)
            for record, expected, score in zip(
                result["masks"], expected_masks, expected_scores, strict=True
            ):
                mask = decode_rle(record["segmentation"])
                iou = mask_iou(mask, expected)
                difference = abs(record["predicted_iou"] - float(score))
                context = f"{photo.name} / {name} / multimask={multimask}"
                assert iou >= MIN_MASK_IOU, f"{context}: mask IoU {iou:.4f}"
                assert difference <= MAX_SCORE_DIFFERENCE, f"{context}: score diff"
                assert record["area"] == int(mask.sum())
                worst_iou = min(worst_iou, iou)
                worst_score = max(worst_score, difference)
    print(f"{photo.name}: worst mask IoU {worst_iou:.5f}, worst score diff {worst_score:.2e}")
