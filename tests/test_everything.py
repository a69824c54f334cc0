"""Segment everything over the real proxy and Triton, against SamAutomaticMaskGenerator."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from proxy.encodings import decode_rle
from testkit.photos import photos

from .test_proxy_api import POINT, assert_problem, encoder_executions, png_bytes

MIN_MATCH_IOU = 0.95
COUNT_TOLERANCE = 0.02

# Random-init weights give logits within about +-0.5 and masks that cover most of the
# picture, so upstream's defaults keep nothing. These settings keep many masks (no IoU
# filter, a stability offset small enough to spread the scores, no box NMS), so that the
# count and the one-to-one matching have teeth. tests/test_everything_steps.py adds a synthetic
# decoder with distinct, ragged masks per point for the filtering and NMS logic.
MANY_MASKS = {
    "points_per_side": 8,
    "pred_iou_thresh": 0.0,
    "stability_score_thresh": 0.4,  # about half of these random-weight masks pass
    "stability_score_offset": 0.05,
    "box_nms_thresh": 1.0,
}
SETTINGS = {
    "many masks": MANY_MASKS,
    "box NMS": {**MANY_MASKS, "stability_score_thresh": 0.0, "box_nms_thresh": 0.9},
    "crop layer": {**MANY_MASKS, "points_per_side": 4, "crop_n_layers": 1, "crop_nms_thresh": 1.0},
    "small regions removed": {**MANY_MASKS, "min_mask_region_area": 400},
}


def upstream_masks(sam, rgb: np.ndarray, settings: dict) -> list[dict]:
    from mobile_sam import SamAutomaticMaskGenerator

    return SamAutomaticMaskGenerator(sam, **settings).generate(rgb)


def match_masks(expected: list[np.ndarray], actual: list[np.ndarray]) -> np.ndarray:
    """IoUs of a one-to-one matching (Hungarian, maximising IoU) of expected to actual."""
    from scipy.optimize import linear_sum_assignment

    if not expected or not actual:
        return np.zeros(len(expected))
    a = np.stack([mask.ravel() for mask in expected]).astype(np.float32)
    b = np.stack([mask.ravel() for mask in actual]).astype(np.float32)
    intersections = a @ b.T
    unions = a.sum(1)[:, None] + b.sum(1)[None, :] - intersections
    ious = np.where(unions > 0, intersections / np.maximum(unions, 1), 1.0)
    rows, cols = linear_sum_assignment(-ious)
    matched = np.zeros(len(expected))
    matched[rows] = ious[rows, cols]
    return matched


CASES = [
    ("landscape-png", "many masks"),
    ("portrait-jpeg", "many masks"),
    ("portrait-jpeg", "box NMS"),
    ("landscape-png", "crop layer"),
    ("landscape-png", "small regions removed"),
]


@pytest.mark.parametrize(("photo_name", "setting"), CASES, ids=" / ".join)
def test_everything_matches_sam_automatic_mask_generator(http, sam, photo_name, setting):
    photo = next(photo for photo in photos() if photo.name == photo_name)
    settings = SETTINGS[setting]
    expected = upstream_masks(sam, photo.rgb(), settings)
    response = http.post(
        "/segment-image",
        data={k: str(v) for k, v in settings.items()},
        files={"file": (photo.name, photo.data)},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["count"] == len(body["masks"])
    assert expected, "settings must keep masks to compare"
    assert abs(body["count"] - len(expected)) <= max(1, COUNT_TOLERANCE * len(expected)), (
        f"{body['count']} masks, upstream {len(expected)}"
    )
    actual = [decode_rle(record["segmentation"]) for record in body["masks"]]
    ious = match_masks([record["segmentation"] for record in expected], actual)
    assert min(ious) >= MIN_MATCH_IOU, f"worst match IoU {min(ious):.4f}"
    for record in body["masks"]:
        assert set(record) == {
            "segmentation",
            "area",
            "bbox",
            "predicted_iou",
            "stability_score",
            "point_coords",
            "crop_box",
        }
    print(
        f"{photo.name} / {setting}: {body['count']} masks (upstream {len(expected)}), "
        f"worst match IoU {min(ious):.4f}"
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("points_per_side", "0"),
        ("points_per_side", "65"),
        ("pred_iou_thresh", "1.5"),
        ("box_nms_thresh", "-0.1"),
        ("crop_n_layers", "4"),
        ("min_mask_region_area", "-1"),
        ("points_per_batch", "1000"),
    ],
)
def test_out_of_range_parameters_are_422(http, field, value) -> None:
    response = http.post(
        "/segment-image", data={field: value}, files={"file": ("a.png", png_bytes(seed=40))}
    )
    body = assert_problem(response, 422, "invalid_parameter")
    assert body["field"] == field and field in body["detail"]


def test_non_numeric_parameter_is_422(http) -> None:
    response = http.post(
        "/segment-image",
        data={"points_per_side": "many"},
        files={"file": ("a.png", png_bytes(seed=40))},
    )
    body = assert_problem(response, 422, "invalid_request")
    assert "points_per_side" in body["detail"]


def test_overlay_is_a_png_of_the_image_with_the_count(http) -> None:
    photo = photos()[0]
    response = http.post(
        "/segment-image",
        data={**{k: str(v) for k, v in MANY_MASKS.items()}, "return_overlay": "true"},
        files={"file": (photo.name, photo.data)},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    picture = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    assert picture.format == "PNG"
    assert picture.size == (body["width"], body["height"])
    assert body["count"] == len(body["masks"]) > 0
    # The overlay changed the image where there are masks.
    original = photo.rgb().astype(int)
    drawn = np.asarray(picture.convert("RGB")).astype(int)
    union = np.any([decode_rle(m["segmentation"]) for m in body["masks"]], axis=0)
    assert np.abs(drawn - original)[union].mean() > 5


def test_accept_image_png_returns_the_picture(http) -> None:
    photo = photos()[0]
    response = http.post(
        "/segment-image",
        data={k: str(v) for k, v in MANY_MASKS.items()},
        files={"file": (photo.name, photo.data)},
        headers={"accept": "image/png"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    picture = Image.open(io.BytesIO(response.content))
    assert picture.size == photo.rgb().shape[1::-1]
    count = int(response.headers["x-object-count"])
    as_json = http.post(
        "/segment-image",
        data={k: str(v) for k, v in MANY_MASKS.items()},
        files={"file": (photo.name, photo.data)},
    ).json()
    assert count == as_json["count"]


def test_everything_and_prompts_share_the_cached_embedding(http, triton_client, settings):
    data = png_bytes(width=200, height=150, seed=41)
    before = encoder_executions(triton_client, settings)
    prompted = http.post("/segment-image", data={"prompts": POINT}, files={"file": ("a.png", data)})
    assert prompted.status_code == 200 and prompted.json()["cache_hit"] is False
    image_id = prompted.json()["image_id"]
    everything = http.post(
        "/segment-image", data={"image_id": image_id, **{k: str(v) for k, v in MANY_MASKS.items()}}
    )
    assert everything.status_code == 200, everything.text
    assert everything.json()["cache_hit"] is True
    again = http.post("/segment-image", data={"prompts": POINT}, files={"file": ("a.png", data)})
    assert again.json()["cache_hit"] is True
    assert encoder_executions(triton_client, settings) == before + 1


def test_crops_are_encoded_once_and_cached(http, triton_client, settings):
    data = png_bytes(width=300, height=200, seed=42)
    form = {
        **{k: str(v) for k, v in MANY_MASKS.items()},
        "points_per_side": "4",
        "crop_n_layers": "1",
    }
    before = encoder_executions(triton_client, settings)
    first = http.post("/segment-image", data=form, files={"file": ("a.png", data)})
    assert first.status_code == 200, first.text
    assert encoder_executions(triton_client, settings) == before + 5  # image + 4 crops
    second = http.post("/segment-image", data={**form, "image_id": first.json()["image_id"]})
    assert second.status_code == 200
    assert encoder_executions(triton_client, settings) == before + 5
    assert second.json()["masks"] == first.json()["masks"]
