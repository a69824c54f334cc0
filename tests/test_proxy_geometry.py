"""proxy.geometry against upstream `ResizeLongestSide`: identical bytes and coordinates."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from proxy.geometry import (
    apply_boxes,
    apply_coords,
    pad_to_square,
    prepare_image,
    preprocess_shape,
    resize_longest_side,
)

LONG_SIDE = 1024

# (height, width): landscape, portrait, square, tiny, odd, phone-sized, extreme aspect ratios.
SHAPES = [
    (480, 640),
    (640, 480),
    (1024, 1024),
    (1024, 768),
    (1023, 1025),
    (333, 777),
    (1080, 1920),
    (3024, 4032),
    (1, 1),
    (1, 3),
    (3, 1),
    (2, 2),
    (17, 2001),
    (5, 4096),
    (2000, 1),
]


def photo_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth colour fields, hard-edged shapes and sensor noise: what resizing meets in photos."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.float32)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(6):
        color = rng.uniform(0, 255, 3).tolist()
        center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        radius = int(rng.integers(1, max(2, min(height, width) // 3 + 1)))
        cv2.circle(image, center, radius, color, thickness=-1)
    image += 8 * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def upstream():
    from mobile_sam.utils.transforms import ResizeLongestSide

    return ResizeLongestSide(LONG_SIDE)


@pytest.mark.parametrize(("height", "width"), SHAPES)
def test_preprocess_shape_matches_upstream(upstream, height: int, width: int) -> None:
    assert preprocess_shape(height, width, LONG_SIDE) == upstream.get_preprocess_shape(
        height, width, LONG_SIDE
    )


def test_preprocess_shape_rounding_over_many_sizes(upstream) -> None:
    for height in range(1, 3000, 7):
        for width in (1, 2, 3, 511, 1000, 1023, 1024, 1025, 2999, 4000):
            assert preprocess_shape(height, width, LONG_SIDE) == upstream.get_preprocess_shape(
                height, width, LONG_SIDE
            )


@pytest.mark.parametrize(("height", "width"), SHAPES)
def test_resize_is_byte_identical_to_upstream_apply_image(upstream, height, width) -> None:
    image = photo_like(height, width, seed=height * 7919 + width)
    ours = resize_longest_side(image, LONG_SIDE)
    theirs = upstream.apply_image(image)
    assert ours.dtype == np.uint8
    assert ours.shape == theirs.shape
    assert max(ours.shape[:2]) == LONG_SIDE
    np.testing.assert_array_equal(ours, theirs)


def test_resize_refuses_a_side_that_would_vanish(upstream) -> None:
    image = photo_like(1, 3000)
    assert preprocess_shape(1, 3000, LONG_SIDE) == (0, LONG_SIDE)
    with pytest.raises(ValueError, match="would resize to 1024x0"):
        resize_longest_side(image, LONG_SIDE)
    with pytest.raises(ValueError):  # upstream cannot do it either
        upstream.apply_image(image)


def test_pad_to_square_pads_bottom_right_with_zeros() -> None:
    image = photo_like(768, 1024)
    padded = pad_to_square(image, LONG_SIDE)
    assert padded.shape == (LONG_SIDE, LONG_SIDE, 3)
    np.testing.assert_array_equal(padded[:768], image)
    assert not padded[768:].any()
    with pytest.raises(ValueError, match="does not fit"):
        pad_to_square(photo_like(10, 1025), LONG_SIDE)


@pytest.mark.parametrize(("height", "width"), [(480, 640), (640, 480), (1, 1), (17, 2001)])
def test_prepare_image_gives_encoder_inputs(upstream, height, width) -> None:
    image = photo_like(height, width)
    images, input_size = prepare_image(image, LONG_SIDE)
    resized = upstream.apply_image(image)
    assert input_size == resized.shape[:2]
    np.testing.assert_array_equal(images[: input_size[0], : input_size[1]], resized)
    assert images.shape == (LONG_SIDE, LONG_SIDE, 3)
    assert images.sum() == resized.sum(dtype=np.int64)


@pytest.mark.parametrize(("height", "width"), SHAPES)
def test_apply_coords_and_boxes_match_upstream(upstream, height, width) -> None:
    rng = np.random.default_rng(height + width)
    coords = rng.uniform(-0.5, 1.5, (5, 3, 2)) * [width, height]
    int_coords = rng.integers(0, max(height, width), (7, 2))
    boxes = np.sort(rng.uniform(0, 1, (4, 2, 2)) * [width, height], axis=1).reshape(4, 4)
    original = (height, width)
    for points in (coords, int_coords, coords[0, 0]):
        ours = apply_coords(points, original, LONG_SIDE)
        theirs = upstream.apply_coords(points, original)
        assert ours.dtype == theirs.dtype == np.float64
        np.testing.assert_array_equal(ours, theirs)
    for box in (boxes, boxes[0]):
        np.testing.assert_array_equal(
            apply_boxes(box, original, LONG_SIDE), upstream.apply_boxes(box, original)
        )


def test_apply_coords_does_not_modify_its_input() -> None:
    coords = np.array([[10.0, 20.0]])
    apply_coords(coords, (100, 200), LONG_SIDE)
    np.testing.assert_array_equal(coords, [[10.0, 20.0]])
