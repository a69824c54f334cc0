"""proxy.postprocess against upstream's torch code: `Sam.postprocess_masks` and `utils.amg`."""

from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from proxy.geometry import preprocess_shape
from proxy.postprocess import (
    batched_mask_to_box,
    box_xyxy_to_xywh,
    mask_area,
    postprocess_mask,
    postprocess_masks,
    select_masks,
    stability_score,
    threshold_masks,
)

torch = pytest.importorskip("torch")

LONG_SIDE = 1024
ORIGINAL_SIZES = [
    (480, 640),
    (640, 480),
    (1024, 1024),
    (1023, 1025),
    (333, 777),
    (1080, 1920),
    (2448, 3264),
    (1, 1),
    (2, 3),
    (17, 2001),
]


def decoder_like_logits(count: int, seed: int) -> np.ndarray:
    """[count, 256, 256] float32 logits shaped like the decoder's: smooth blobs, soft edges."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(0, 6, (16, 16, count)).astype(np.float32) - 2
    logits = cv2.resize(coarse, (256, 256), interpolation=cv2.INTER_CUBIC).reshape(256, 256, -1)
    logits += rng.normal(0, 0.3, logits.shape).astype(np.float32)
    return np.ascontiguousarray(logits.transpose(2, 0, 1))


def upstream_postprocess(low_res: np.ndarray, input_size, original_size) -> np.ndarray:
    from mobile_sam.modeling import Sam

    # `postprocess_masks` only reads `self.image_encoder.img_size`.
    sam = SimpleNamespace(image_encoder=SimpleNamespace(img_size=LONG_SIDE))
    with torch.no_grad():
        return Sam.postprocess_masks(sam, torch.from_numpy(low_res), input_size, original_size)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    union = np.count_nonzero(a | b, axis=(-2, -1))
    inter = np.count_nonzero(a & b, axis=(-2, -1))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


@pytest.mark.parametrize("original_size", ORIGINAL_SIZES)
def test_postprocess_masks_matches_upstream(original_size) -> None:
    input_size = preprocess_shape(*original_size, LONG_SIDE)
    prompts = 1 if original_size[0] * original_size[1] > 2_000_000 else 2  # keep it quick
    low_res = decoder_like_logits(3 * prompts, seed=sum(original_size))
    low_res = low_res.reshape(prompts, 3, 256, 256)

    ours = postprocess_masks(low_res, input_size, original_size)
    theirs = upstream_postprocess(low_res, input_size, original_size).numpy()

    assert ours.shape == theirs.shape == (prompts, 3, *original_size)
    assert ours.dtype == np.float32
    # Measured: max |diff| 5e-7..5e-5 (float rounding); at most 16 of 48M pixels flip.
    assert np.abs(ours - theirs).max() < 1e-4
    ious = iou(threshold_masks(ours), threshold_masks(theirs))
    assert ious.mean() >= 0.9999
    assert ious.min() >= 0.999


def test_cropped_upsampling_equals_upsample_then_crop() -> None:
    """The shortcut (upsample only what survives the crop) is exact, not approximate."""
    low_res = decoder_like_logits(2, seed=5)
    for original_size in [(480, 640), (640, 480), (17, 2001), (1023, 1025), (1, 1)]:
        input_size = preprocess_shape(*original_size, LONG_SIDE)
        for mask in low_res:
            full = cv2.resize(mask, (LONG_SIDE, LONG_SIDE), interpolation=cv2.INTER_LINEAR)
            cropped = np.ascontiguousarray(full[: input_size[0], : input_size[1]])
            expected = cv2.resize(cropped, original_size[::-1], interpolation=cv2.INTER_LINEAR)
            ours = postprocess_mask(mask, input_size, original_size)
            np.testing.assert_array_equal(ours, expected)


def test_postprocess_mask_writes_into_a_given_buffer() -> None:
    buffer = np.full((480, 640), np.nan, dtype=np.float32)
    result = postprocess_mask(decoder_like_logits(1, 0)[0], (768, 1024), (480, 640), out=buffer)
    assert result is buffer and np.isfinite(buffer).all()


def test_select_masks_slices_like_mask_decoder() -> None:
    low_res = np.arange(2 * 4 * 2 * 2, dtype=np.float32).reshape(2, 4, 2, 2)
    iou_predictions = np.arange(8, dtype=np.float32).reshape(2, 4)
    multi, multi_iou = select_masks(low_res, iou_predictions, multimask_output=True)
    single, single_iou = select_masks(low_res, iou_predictions, multimask_output=False)
    np.testing.assert_array_equal(multi, low_res[:, 1:])
    np.testing.assert_array_equal(multi_iou, [[1, 2, 3], [5, 6, 7]])
    np.testing.assert_array_equal(single, low_res[:, :1])
    np.testing.assert_array_equal(single_iou, [[0], [4]])
    assert np.shares_memory(multi, low_res)  # views, no copies


@pytest.mark.parametrize("original_size", [(480, 640), (1, 1), (333, 777)])
def test_stability_score_matches_upstream(original_size) -> None:
    from mobile_sam.utils.amg import calculate_stability_score

    input_size = preprocess_shape(*original_size, LONG_SIDE)
    logits = postprocess_masks(decoder_like_logits(8, seed=3), input_size, original_size)
    logits[0] = -5.0  # empty union: NaN on both sides
    ours = stability_score(logits, 0.0, 1.0)
    theirs = calculate_stability_score(torch.from_numpy(logits), 0.0, 1.0).numpy()
    assert ours.dtype == theirs.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs)
    assert np.isnan(ours[0])
    assert stability_score(logits[1]).shape == ()


def box_masks() -> np.ndarray:
    masks = np.zeros((7, 37, 53), dtype=bool)
    masks[1, 5, 7] = True  # one pixel
    masks[2] = True  # everything
    masks[3, 10:20, 3:50] = True
    masks[4, 0, :] = True  # first row
    masks[5, :, -1] = True  # last column
    masks[6, 30:, :4] = True
    masks[6, 2, 40] = True  # two separate parts
    return masks


def test_boxes_match_upstream_batched_mask_to_box_and_xywh() -> None:
    from mobile_sam.utils.amg import batched_mask_to_box as upstream_boxes
    from mobile_sam.utils.amg import box_xyxy_to_xywh as upstream_xywh

    masks = box_masks()
    theirs_xyxy = upstream_boxes(torch.from_numpy(masks))
    np.testing.assert_array_equal(batched_mask_to_box(masks), theirs_xyxy.numpy())
    theirs_xywh = np.stack([upstream_xywh(box).numpy() for box in theirs_xyxy])
    ours_xywh = box_xyxy_to_xywh(batched_mask_to_box(masks))
    np.testing.assert_array_equal(ours_xywh, theirs_xywh)
    np.testing.assert_array_equal(ours_xywh[0], [0, 0, 0, 0])  # empty mask
    np.testing.assert_array_equal(ours_xywh[1], [7, 5, 0, 0])  # inclusive x1, y1


def test_boxes_keep_leading_dimensions_and_handle_empty_batches() -> None:
    masks = box_masks()[:6].reshape(2, 3, 37, 53)
    assert batched_mask_to_box(masks).shape == (2, 3, 4)
    assert batched_mask_to_box(np.zeros((0, 5, 5), bool)).shape == (0, 4)
    np.testing.assert_array_equal(box_xyxy_to_xywh(np.array([2, 3, 10, 4])), [2, 3, 8, 1])


def test_mask_area_counts_pixels() -> None:
    np.testing.assert_array_equal(mask_area(box_masks()), [0, 1, 37 * 53, 470, 53, 37, 29])


def test_threshold_is_strict_like_upstream() -> None:
    np.testing.assert_array_equal(threshold_masks(np.array([-1.0, 0.0, 1e-7])), [0, 0, 1])
