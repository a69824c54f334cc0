"""Mask wire formats: COCO RLE (pycocotools-exact, without pycocotools), PNG and polygons.

Polygons are outer boundaries only (`cv2.RETR_EXTERNAL`). COCO polygons have no notion of
holes: pycocotools rasterises a polygon list as the union of the polygons, so emitting hole
contours would *fill* the holes. Clients that need holes or exact masks use RLE or PNG.
Vertices are OpenCV's pixel indices (a pixel's centre is at integer coordinates), so
`cv2.fillPoly` reproduces a hole-free mask exactly; regions of fewer than 3 vertices (isolated
pixels, 2-pixel runs) are dropped because they have no area as polygons.
"""

from __future__ import annotations

import base64
from enum import StrEnum
from typing import Any

import cv2
import numpy as np


class OutputFormat(StrEnum):
    RLE = "rle"
    PNG = "png"
    POLYGON = "polygon"


def encode_mask(mask: np.ndarray, output_format: OutputFormat) -> Any:
    """The JSON-ready encoding of one HxW boolean mask."""
    if output_format is OutputFormat.RLE:
        return encode_rle(mask)
    if output_format is OutputFormat.PNG:
        return encode_png(mask)
    return encode_polygons(mask)


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """pycocotools' `mask.encode` of an HxW mask, with `counts` as str instead of bytes."""
    return encode_rle_counts(rle_counts(mask), mask.shape)


def encode_rle_counts(counts: np.ndarray, size: tuple[int, int]) -> dict[str, Any]:
    """Compressed COCO RLE from uncompressed column-major run lengths of an HxW mask."""
    height, width = size
    return {
        "size": [int(height), int(width)],
        "counts": _counts_to_string(np.asarray(counts, dtype=np.int64)),
    }


def rle_counts(mask: np.ndarray) -> np.ndarray:
    """Uncompressed COCO RLE counts: alternating 0/1 run lengths in column-major order.

    The first run counts zeros (and is 0 when the mask starts with a 1), as pycocotools.
    """
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return np.zeros(1, dtype=np.int64)
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate(([0], changes, [flat.size]))
    runs = np.diff(edges)
    if flat[0]:
        runs = np.concatenate(([0], runs))
    return runs.astype(np.int64)


def _counts_to_string(counts: np.ndarray) -> str:
    """pycocotools' `rleToString`, vectorised.

    Each count (minus the count two places back, from the fourth on) is written as
    little-endian 5-bit groups in two's complement, 0x20 marking "more groups follow",
    offset by 48 into printable ASCII. A value needs the fewest groups k whose 5k bits hold
    it as a signed number: k = bit_length(v if v >= 0 else ~v) // 5 + 1.
    """
    values = counts.astype(np.int64)
    if values.size > 3:
        values[3:] -= counts[1:-2]
    magnitude = np.where(values < 0, ~values, values)
    n_groups = np.frexp(magnitude.astype(np.float64))[1] // 5 + 1  # frexp's exponent = bit_length
    first = np.cumsum(n_groups) - n_groups
    group = np.arange(int(n_groups.sum())) - np.repeat(first, n_groups)
    chunks = (np.repeat(values, n_groups) >> (5 * group)) & 0x1F  # arithmetic shift keeps sign
    more = group < np.repeat(n_groups - 1, n_groups)
    return ((chunks | (more * 0x20)) + 48).astype(np.uint8).tobytes().decode("ascii")


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """Compressed COCO RLE (str or bytes counts, as pycocotools' `rleFrString`) -> HxW bool."""
    height, width = rle["size"]
    counts = rle["counts"]
    text = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    runs = _string_to_counts(text)
    values = np.arange(len(runs)) % 2 == 1
    flat = np.repeat(values, runs)
    if flat.size != height * width:
        raise ValueError(f"RLE covers {flat.size} pixels, size says {height}x{width}")
    return flat.reshape(width, height).T


def _string_to_counts(text: bytes) -> list[int]:
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            group = text[position] - 48
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position += 1
            shift += 5
            if not more and group & 0x10:
                value -= 1 << shift  # sign-extend
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def encode_png(mask: np.ndarray) -> str:
    """Base64 of a 1-bit grayscale PNG (decoders show it as 0/255), the smallest lossless form."""
    image = np.asarray(mask, dtype=bool).astype(np.uint8) * 255
    ok, buffer = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_BILEVEL, 1])
    if not ok:
        raise ValueError(f"OpenCV could not encode a {image.shape} mask as PNG")
    return base64.b64encode(buffer.tobytes()).decode("ascii")


def decode_png(data: str) -> np.ndarray:
    """Inverse of `encode_png`, for tests and Python clients."""
    buffer = np.frombuffer(base64.b64decode(data), dtype=np.uint8)
    image = cv2.imdecode(buffer, cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ValueError("not a PNG image")
    return image > 127


def encode_polygons(mask: np.ndarray) -> list[list[float]]:
    """Outer contours as flat [x0, y0, x1, y1, ...] lists (see the module docstring)."""
    image = np.asarray(mask, dtype=bool).astype(np.uint8)
    contours, _ = cv2.findContours(image, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [contour.reshape(-1).astype(float).tolist() for contour in contours if len(contour) >= 3]


def decode_polygons(polygons: list[list[float]], size: tuple[int, int]) -> np.ndarray:
    """Rasterise `encode_polygons` output back to an HxW bool mask with OpenCV."""
    image = np.zeros(size, dtype=np.uint8)
    for polygon in polygons:  # One at a time: a union, like pycocotools, not even-odd.
        points = np.round(np.asarray(polygon).reshape(-1, 2)).astype(np.int32)
        cv2.fillPoly(image, [points], 1)
    return image.astype(bool)
