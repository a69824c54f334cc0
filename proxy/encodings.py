"""Mask encodings: COCO RLE (pycocotools-exact, without pycocotools), PNG and polygons.

RLE is also how masks are held between steps (segment-everything keeps hundreds of them), so
the uncompressed run lengths can be built from a window of a larger image (`rle_counts`) and
read back a window at a time (`rle_window`, `rle_box`) without decoding the whole mask.

Polygons are outer boundaries only (`cv2.RETR_EXTERNAL`). COCO polygons have no notion of
holes: pycocotools rasterises a polygon list as the union of the polygons, so emitting hole
contours would *fill* the holes. Clients that need holes or exact masks use RLE or PNG.
Vertices are OpenCV's pixel indices (a pixel's centre is at integer coordinates), so
`cv2.fillPoly` reproduces a hole-free mask exactly; regions of fewer than 3 vertices (isolated
pixels, 2-pixel runs) are dropped because they have no area as polygons.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import cv2
import numpy as np

from proxy import postprocess
from proxy.geometry import Size


class OutputFormat(StrEnum):
    RLE = "rle"
    PNG = "png"
    POLYGON = "polygon"


def encode_mask(
    mask: np.ndarray, output_format: OutputFormat, box: Sequence[int] | None = None
) -> Any:
    """The JSON-ready encoding of one HxW boolean mask (`box`: its XYXY box, if known)."""
    if output_format is OutputFormat.RLE:
        return encode_rle(mask, box)
    if output_format is OutputFormat.PNG:
        return encode_png(mask)
    return encode_polygons(mask)


def encode_rle(mask: np.ndarray, box: Sequence[int] | None = None) -> dict[str, Any]:
    """pycocotools' `mask.encode` of an HxW mask, with `counts` as str instead of bytes."""
    return encode_rle_counts(rle_counts(mask, box=box), mask.shape)


def encode_rle_counts(counts: np.ndarray, size: tuple[int, int]) -> dict[str, Any]:
    """Compressed COCO RLE from uncompressed column-major run lengths of an HxW mask."""
    height, width = size
    return {
        "size": [int(height), int(width)],
        "counts": _counts_to_string(np.asarray(counts, dtype=np.int64)),
    }


def _counts_dtype(size: Size) -> type[np.integer]:
    return np.int32 if size[0] * size[1] < 2**31 else np.int64


def rle_counts(
    mask: np.ndarray,
    size: Size | None = None,
    offset: tuple[int, int] = (0, 0),
    box: Sequence[int] | None = None,
) -> np.ndarray:
    """Uncompressed COCO RLE counts of `mask`, placed at offset (x, y) in a zero image of
    `size` (h, w; default: the mask's own).

    Alternating 0/1 run lengths in column-major order, zeros first (0 when the first pixel is
    set), as pycocotools and upstream's `mask_to_rle_pytorch(uncrop_masks(mask))`, without
    building the padded mask: only the mask's bounding box is read. `box` (XYXY inclusive,
    `batched_mask_to_box`) saves finding it.
    """
    mask = np.asarray(mask, dtype=bool)
    height, width = mask.shape if size is None else size
    dtype = _counts_dtype((height, width))
    if box is None:
        box = postprocess.batched_mask_to_box(mask)
    bx0, by0, bx1, by1 = (int(v) for v in box)
    sub = mask[by0 : by1 + 1, bx0 : bx1 + 1]
    if not sub.any():
        return np.array([height * width], dtype=dtype)
    sub_h, sub_w = sub.shape
    # Columns of the box, each followed by one unset pixel, so no run crosses a column here.
    columns = np.zeros((sub_w, sub_h + 1), dtype=np.uint8)
    target = columns[:, :sub_h]
    transposed = cv2.transpose(sub.view(np.uint8), dst=target)  # ~4x numpy's `sub.T` copy
    if not np.shares_memory(transposed, columns):
        target[...] = transposed
    flat = columns.ravel()
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    if flat[0]:
        changes = np.concatenate(([0], changes))
    starts, ends = changes[0::2], changes[1::2]  # every run ends, at the latest on its pad
    x0, y0 = offset[0] + bx0, offset[1] + by0
    column_stride = sub_h + 1

    def to_frame(index: np.ndarray) -> np.ndarray:
        col, row = np.divmod(index, column_stride)
        return (x0 + col).astype(np.int64) * height + y0 + row

    starts, ends = to_frame(starts), to_frame(ends)
    # A run reaching the bottom of a column continues into the next column's top run.
    joined = ends[:-1] == starts[1:]
    if joined.any():
        starts = starts[np.concatenate(([True], ~joined))]
        ends = ends[np.concatenate((~joined, [True]))]
    edges = np.empty(2 * len(starts) + 2, dtype=np.int64)
    edges[0] = 0
    edges[1:-1:2] = starts
    edges[2:-1:2] = ends
    edges[-1] = height * width
    counts = np.diff(edges)
    if counts[-1] == 0:  # the last run reaches the end: upstream has no trailing zero count
        counts = counts[:-1]
    return counts.astype(dtype)


def rle_window(counts: np.ndarray, size: Size, window: Sequence[int]) -> np.ndarray:
    """The [y0:y1, x0:x1] part (window XYXY, exclusive) of an RLE mask, as HxW bool.

    Reads only the columns x0..x1 of the column-major runs; the whole mask is
    `rle_window(counts, size, (0, 0, w, h))`.
    """
    height, _ = size
    x0, y0, x1, y1 = window
    edges = np.concatenate(([0], np.cumsum(counts, dtype=np.int64)))
    lo, hi = x0 * height, x1 * height
    lengths = np.diff(np.clip(edges, lo, hi))
    values = np.arange(len(counts)) % 2 == 1
    band = np.repeat(values, lengths)
    return band.reshape(x1 - x0, height).T[y0:y1]


def rle_box(counts: np.ndarray, size: Size) -> np.ndarray:
    """`batched_mask_to_box` of an RLE mask without decoding it: XYXY inclusive int64."""
    height, _ = size
    edges = np.concatenate(([0], np.cumsum(counts, dtype=np.int64)))
    starts, ends = edges[1:-1:2], edges[2::2]
    if len(ends) < len(starts):  # defensive: a final run without its end
        ends = np.append(ends, edges[-1])
    keep = ends > starts
    starts, ends = starts[keep], ends[keep] - 1
    if len(starts) == 0:
        return np.zeros(4, dtype=np.int64)
    start_col, start_row = np.divmod(starts, height)
    end_col, end_row = np.divmod(ends, height)
    spans = end_col > start_col  # such a run covers the column's bottom and the next's top
    top = np.where(spans, 0, start_row).min()
    bottom = np.where(spans, height - 1, end_row).max()
    return np.array([start_col.min(), top, end_col.max(), bottom], dtype=np.int64)


def rle_area(counts: np.ndarray) -> int:
    """Pixels set in an RLE mask (upstream `area_from_rle`)."""
    return int(np.sum(np.asarray(counts)[1::2], dtype=np.int64))


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
