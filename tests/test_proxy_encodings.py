"""proxy.encodings: COCO RLE identical to pycocotools, PNG and polygon round trips."""

from __future__ import annotations

import base64
import io

import cv2
import numpy as np
import pytest
from PIL import Image

from proxy.encodings import (
    OutputFormat,
    decode_png,
    decode_polygons,
    decode_rle,
    encode_mask,
    encode_png,
    encode_polygons,
    encode_rle,
    rle_counts,
)

mask_utils = pytest.importorskip("pycocotools.mask")


def blobs(height: int, width: int, seed: int, count: int = 4) -> np.ndarray:
    """Filled ellipses: the kind of regions SAM returns."""
    rng = np.random.default_rng(seed)
    canvas = np.zeros((height, width), np.uint8)
    for _ in range(count):
        center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(1, max(2, width // 3))), int(rng.integers(1, max(2, height // 3))))
        cv2.ellipse(canvas, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, thickness=-1)
    return canvas.astype(bool)


def sample_masks() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    masks = [
        np.zeros((1, 1), bool),
        np.ones((1, 1), bool),
        np.zeros((480, 640), bool),
        np.ones((480, 640), bool),
        blobs(480, 640, 1),
        blobs(640, 480, 2),
        blobs(37, 53, 3),
        blobs(1024, 768, 4),
        blobs(2448, 3264, 5, count=8),
        rng.random((97, 131)) < 0.5,  # many short runs
        rng.random((300, 7)) < 0.01,
        rng.random((1, 5000)) < 0.3,
    ]
    long_run = np.zeros((1500, 1500), bool)
    long_run[:, 1:] = True  # one run of 2248500: a 5-character count
    masks.append(long_run)
    return masks


@pytest.mark.parametrize("index", range(len(sample_masks())))
def test_rle_is_identical_to_pycocotools(index: int) -> None:
    mask = sample_masks()[index]
    expected = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    ours = encode_rle(mask)
    assert ours == {"size": list(mask.shape), "counts": expected["counts"].decode("ascii")}
    np.testing.assert_array_equal(decode_rle(ours), mask)
    np.testing.assert_array_equal(mask_utils.decode(ours), mask)  # str counts are accepted
    assert mask_utils.area(expected) == mask.sum()


def test_decode_rle_reads_pycocotools_bytes() -> None:
    mask = blobs(200, 300, 7)
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    np.testing.assert_array_equal(decode_rle(encoded), mask)


def test_uncompressed_counts_start_with_zeros() -> None:
    mask = np.array([[1, 0], [1, 1]], bool)  # column-major: 1 1 0 1
    np.testing.assert_array_equal(rle_counts(mask), [0, 2, 1, 1])
    np.testing.assert_array_equal(rle_counts(np.zeros((2, 3), bool)), [6])
    np.testing.assert_array_equal(rle_counts(np.zeros((0, 3), bool)), [0])


def test_decode_rle_refuses_a_size_mismatch() -> None:
    rle = encode_rle(blobs(20, 30, 1))
    with pytest.raises(ValueError, match="covers 600 pixels"):
        decode_rle({**rle, "size": [20, 31]})


@pytest.mark.parametrize("index", [0, 1, 3, 4, 6, 9])
def test_png_round_trip(index: int) -> None:
    mask = sample_masks()[index]
    encoded = encode_png(mask)
    data = base64.b64decode(encoded)
    assert data.startswith(b"\x89PNG")
    np.testing.assert_array_equal(decode_png(encoded), mask)
    with Image.open(io.BytesIO(data)) as image:  # 1-bit grayscale, readable by Pillow too
        assert image.mode == "1"
        np.testing.assert_array_equal(np.asarray(image.convert("L")) > 127, mask)


def test_polygons_round_trip_hole_free_masks_exactly() -> None:
    for seed, shape in enumerate([(480, 640), (640, 480), (37, 53), (1024, 768)]):
        mask = blobs(*shape, seed)
        mask = fill_holes(mask)
        polygons = encode_polygons(mask)
        assert polygons and all(len(p) >= 6 and len(p) % 2 == 0 for p in polygons)
        assert all(isinstance(v, float) for p in polygons for v in p)
        np.testing.assert_array_equal(decode_polygons(polygons, shape), mask)


def test_polygons_are_outer_boundaries_only() -> None:
    ring = np.zeros((50, 50), bool)
    ring[10:40, 10:40] = True
    ring[20:30, 20:30] = False  # a hole
    polygons = encode_polygons(ring)
    assert len(polygons) == 1
    np.testing.assert_array_equal(decode_polygons(polygons, ring.shape), fill_holes(ring))
    # pycocotools rasterises polygons as a union too (its own half-pixel convention aside).
    coco = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, 50, 50)))
    assert abs(int(coco.sum()) - 30 * 30) <= 2 * 30 + 1


def test_degenerate_polygons_are_dropped() -> None:
    mask = np.zeros((20, 20), bool)
    mask[3, 3] = True  # 1 vertex
    mask[10, 5:7] = True  # 2 vertices
    mask[15:18, 12:16] = True  # a real region
    polygons = encode_polygons(mask)
    assert len(polygons) == 1
    assert sorted(polygons[0]) == sorted([12.0, 15.0, 12.0, 17.0, 15.0, 17.0, 15.0, 15.0])
    assert encode_polygons(np.zeros((5, 5), bool)) == []


def test_output_format_dispatch() -> None:
    mask = blobs(40, 60, 3)
    assert [f.value for f in OutputFormat] == ["rle", "png", "polygon"]
    assert OutputFormat("rle") is OutputFormat.RLE
    assert encode_mask(mask, OutputFormat.RLE) == encode_rle(mask)
    assert encode_mask(mask, OutputFormat.PNG) == encode_png(mask)
    assert encode_mask(mask, OutputFormat.POLYGON) == encode_polygons(mask)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    filled = np.zeros(mask.shape, np.uint8)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled.astype(bool)
