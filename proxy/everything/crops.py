"""The crops of segment-everything and the decoder prompts of their grid points."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from common.contract import FOREGROUND_LABEL, PADDING_LABEL
from proxy.everything.params import AmgParams
from proxy.everything.upstream import (
    batch_iterator,
    build_all_layer_point_grids,
    generate_crop_boxes,
)
from proxy.geometry import Size, apply_coords, preprocess_shape

Box = tuple[int, int, int, int]  # XYXY, x1 and y1 exclusive


@dataclass(frozen=True, eq=False)
class CropJob:
    """One crop of the image and the grid points to prompt on it.

    box: XYXY in original pixels (x1, y1 exclusive); layer: its crop layer (0 = whole
    image); points: [n, 2] float64 (x, y) in crop pixels, upstream's `points_for_image`.
    """

    box: Box
    layer: int
    points: np.ndarray

    @property
    def size(self) -> Size:
        """(height, width) of the crop: the `original_size` of its encoder call."""
        x0, y0, x1, y1 = self.box
        return y1 - y0, x1 - x0

    def crop(self, image: np.ndarray) -> np.ndarray:
        """The crop of an HxWxC image (a view), what upstream passes to `set_image`."""
        x0, y0, x1, y1 = self.box
        return image[y0:y1, x0:x1]

    def batches(self, points_per_batch: int) -> Iterator[np.ndarray]:
        """The points in decoder batches of points_per_batch, in upstream's order."""
        for (points,) in batch_iterator(points_per_batch, self.points):
            yield points


def crop_plan(original_size: Size, params: AmgParams, image_side: int) -> list[CropJob]:
    """Upstream's crops (`generate_crop_boxes`) with their point grids, in upstream's order.

    Crops whose resized size would have a zero side (only possible for images a few pixels
    wide) are left out: upstream fails on them in `set_image`.
    """
    height, width = original_size
    if height < 1 or width < 1:
        raise ValueError(f"cannot segment a {width}x{height} image")
    grids = build_all_layer_point_grids(
        params.points_per_side, params.crop_n_layers, params.crop_n_points_downscale_factor
    )
    crop_boxes, layer_idxs = generate_crop_boxes(
        original_size, params.crop_n_layers, params.crop_overlap_ratio
    )
    jobs = []
    for box, layer in zip(crop_boxes, layer_idxs, strict=True):
        x0, y0, x1, y1 = box
        crop_size = (y1 - y0, x1 - x0)
        if min(crop_size) < 1 or min(preprocess_shape(*crop_size, image_side)) < 1:
            continue
        points_scale = np.array(crop_size)[None, ::-1]
        jobs.append(CropJob((x0, y0, x1, y1), layer, grids[layer] * points_scale))
    return jobs


def decoder_inputs(
    points: np.ndarray, crop_size: Size, image_side: int
) -> tuple[np.ndarray, np.ndarray]:
    """Decoder `point_coords` [P, 2, 2] and `point_labels` [P, 2] float32 for grid points.

    Each prompt is one foreground point mapped to the resized crop (`apply_coords`, float64,
    cast once) plus upstream's padding point (0, 0) labelled -1, which
    `PromptEncoder._embed_points` appends when there is no box: exactly what
    `SamPredictor.predict_torch` embeds in `_process_batch`.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    coords = np.zeros((len(points), 2, 2), dtype=np.float32)
    coords[:, 0] = apply_coords(points, crop_size, image_side)
    labels = np.empty((len(points), 2), dtype=np.float32)
    labels[:, 0] = FOREGROUND_LABEL
    labels[:, 1] = PADDING_LABEL
    return coords, labels
