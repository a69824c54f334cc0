"""Segment-everything's mask bookkeeping: upstream's `MaskData`, `_process_batch`, the crop
and merge steps and the records, in numpy.

Masks are stored as uncompressed COCO RLE counts in the original image frame (upstream's
`rles`), built straight from the crop-frame mask and its offset: no whole-image boolean or
float mask is ever held for more than one mask at a time.

Where this differs from upstream, for speed and memory, with the same results (up to the float
rounding of the upsampling, `proxy.postprocess`: about 1e-5 on logits):

* The predicted-IoU filter runs before upsampling (upstream upsamples all P x 3 masks of a
  batch to the crop size first); the filter does not depend on the masks.
* Masks are upsampled one at a time into one reused float32 buffer (`Workspace`), and the
  thresholds, counts, box and RLE only read the window where the logits can exceed the lowest
  threshold (`logit_reach`, a conservative bound from the low-res logits).

Upstream bugs not reproduced: with crops, a crop that yields no mask makes upstream fail in
`box_area` (an empty `torch.tensor([])` has no box axis); here it simply contributes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from proxy import encodings, postprocess
from proxy.encodings import OutputFormat, rle_area, rle_counts, rle_window
from proxy.everything.params import AmgParams
from proxy.everything.upstream import (
    batched_nms,
    box_area,
    is_box_near_crop_edge,
    uncrop_boxes_xyxy,
    uncrop_points,
)
from proxy.geometry import Size, preprocess_shape

EDGE_TOLERANCE = 20.0  # upstream `is_box_near_crop_edge` atol, in pixels


@dataclass
class MaskData:
    """Upstream's `MaskData` for one image, masks kept as RLE counts in the image frame.

    boxes: [n, 4] int64 XYXY (inclusive; crop frame inside `process_batch` output, image
    frame after `finish_crop`), iou_preds [n] float32, points [n, 2] float64 (x, y; crop
    frame, then image frame), stability_score [n] float32, crop_boxes [n, 4] int64 XYXY.
    """

    size: Size
    rles: list[np.ndarray]
    boxes: np.ndarray
    iou_preds: np.ndarray
    points: np.ndarray
    stability_score: np.ndarray
    crop_boxes: np.ndarray

    @classmethod
    def empty(cls, size: Size) -> MaskData:
        return cls(
            size=size,
            rles=[],
            boxes=np.zeros((0, 4), dtype=np.int64),
            iou_preds=np.zeros(0, dtype=np.float32),
            points=np.zeros((0, 2), dtype=np.float64),
            stability_score=np.zeros(0, dtype=np.float32),
            crop_boxes=np.zeros((0, 4), dtype=np.int64),
        )

    @classmethod
    def concatenate(cls, items: Sequence[MaskData], size: Size) -> MaskData:
        """Upstream `MaskData.cat`, in order."""
        items = [item for item in items if len(item)]
        if not items:
            return cls.empty(size)
        return cls(
            size=size,
            rles=[rle for item in items for rle in item.rles],
            boxes=np.concatenate([item.boxes for item in items]),
            iou_preds=np.concatenate([item.iou_preds for item in items]),
            points=np.concatenate([item.points for item in items]),
            stability_score=np.concatenate([item.stability_score for item in items]),
            crop_boxes=np.concatenate([item.crop_boxes for item in items]),
        )

    def __len__(self) -> int:
        return len(self.rles)

    def take(self, indices: np.ndarray) -> MaskData:
        """Upstream `MaskData.filter` with an index tensor: select and reorder."""
        indices = np.asarray(indices, dtype=np.int64)
        return MaskData(
            size=self.size,
            rles=[self.rles[i] for i in indices],
            boxes=self.boxes[indices],
            iou_preds=self.iou_preds[indices],
            points=self.points[indices],
            stability_score=self.stability_score[indices],
            crop_boxes=self.crop_boxes[indices],
        )

    def mask(self, index: int) -> np.ndarray:
        """One whole-image boolean mask (decode only where it is needed)."""
        height, width = self.size
        return np.ascontiguousarray(rle_window(self.rles[index], self.size, (0, 0, width, height)))

    def areas(self) -> list[int]:
        return [rle_area(counts) for counts in self.rles]


class LazyMasks(Sequence[np.ndarray]):
    """The masks of a MaskData, decoded from their RLE one at a time on access."""

    def __init__(self, data: MaskData) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index):  # type: ignore[override]
        return self.data.mask(index)


class Workspace:
    """Reused scratch planes for `process_batch`: the float32 logits of one mask at the crop's
    size, and boolean planes for its thresholded window.

    A full-resolution float mask is 4 bytes per pixel (48 MB at 12 MP); hundreds of masks go
    through these planes one after the other instead of being held together.
    """

    def __init__(self) -> None:
        self._logits = np.empty((0, 0), dtype=np.float32)
        self._bools: dict[str, np.ndarray] = {}

    def logits_plane(self, size: Size) -> np.ndarray:
        if self._logits.shape != tuple(size):
            self._logits = np.empty(size, dtype=np.float32)
        return self._logits

    def bool_plane(self, name: str, shape: tuple[int, int]) -> np.ndarray:
        """A C-contiguous bool array of `shape`, backed by a buffer that only grows."""
        count = shape[0] * shape[1]
        buffer = self._bools.get(name)
        if buffer is None or buffer.size < count:
            buffer = self._bools[name] = np.empty(max(count, 1), dtype=bool)
        return buffer[:count].reshape(shape)


def logit_reach(
    low_res: np.ndarray, threshold: float, input_size: Size, output_size: Size, image_side: int
) -> tuple[int, int, int, int]:
    """Rows y0:y1 and columns x0:x1 of `postprocess_mask(low_res, ...)` outside which no
    logit exceeds threshold. Empty (0, 0, 0, 0) when none can.

    Each upsampled logit is a convex combination of the 2x2 nearest low-res logits (bilinear,
    twice), so it cannot exceed the largest of them. The bound takes every low-res logit above
    threshold minus a margin far larger than float rounding, and widens the reach of each
    resampling stage by a pixel or two: conservative, hence exact.
    """
    low_h, low_w = low_res.shape
    in_h, in_w = input_size
    out_h, out_w = output_size
    margin = 1e-3 + 1e-5 * float(np.abs(low_res).max(initial=0.0))
    active = low_res > threshold - margin
    rows = np.flatnonzero(active.any(axis=1))
    if len(rows) == 0:
        return 0, 0, 0, 0
    cols = np.flatnonzero(active.any(axis=0))

    def reach(first: int, last: int, low_n: int, in_n: int, out_n: int) -> tuple[int, int]:
        factor = image_side / low_n  # low-res pixel -> resized-frame pixels
        start = max(0, math.floor((first - 1) * factor) - 1)
        stop = min(in_n, math.ceil((last + 2) * factor) + 1)
        scale = out_n / in_n  # resized frame -> output pixels
        return max(0, math.floor((start - 1) * scale) - 2), min(
            out_n, math.ceil((stop + 1) * scale) + 2
        )

    y0, y1 = reach(int(rows[0]), int(rows[-1]), low_h, in_h, out_h)
    x0, x1 = reach(int(cols[0]), int(cols[-1]), low_w, in_w, out_w)
    if y0 >= y1 or x0 >= x1:
        return 0, 0, 0, 0
    return y0, y1, x0, x1


def process_batch(
    low_res_masks: np.ndarray,
    iou_predictions: np.ndarray,
    points: np.ndarray,
    crop_box: Sequence[int],
    original_size: Size,
    params: AmgParams,
    *,
    image_side: int,
    input_size: Size | None = None,
    workspace: Workspace | None = None,
) -> MaskData:
    """Upstream `_process_batch` on the decoder's answer for one batch of grid points.

    low_res_masks [P, 4, 256, 256] and iou_predictions [P, 4] are the decoder outputs for
    `decoder_inputs(points, crop size, image_side)`; points [P, 2] are the batch's points in
    crop pixels; input_size is the crop's resized (h, w) (derived when omitted).

    Tokens 1..3; predicted-IoU filter (``> pred_iou_thresh`` when that is > 0); then per
    surviving mask: logits upsampled to the crop, stability score (``>=`` filter when the
    threshold is > 0), mask = logits > 0, its box, the near-crop-edge filter, and its RLE in
    the image frame. Order: point-major, token-minor, as upstream's `flatten(0, 1)`.
    """
    x0, y0, x1, y1 = (int(v) for v in crop_box)
    orig_h, orig_w = original_size
    crop_size = (y1 - y0, x1 - x0)
    if input_size is None:
        input_size = preprocess_shape(*crop_size, image_side)
    masks, iou = postprocess.select_masks(low_res_masks, iou_predictions, multimask_output=True)
    n_tokens = masks.shape[1]
    iou_flat = np.asarray(iou, dtype=np.float32).reshape(-1)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(points) != masks.shape[0]:
        raise ValueError(f"{len(points)} points for {masks.shape[0]} decoder answers")

    candidates = np.arange(len(iou_flat))
    if params.pred_iou_thresh > 0.0:
        candidates = np.flatnonzero(iou_flat > np.float32(params.pred_iou_thresh))

    workspace = workspace or Workspace()
    logits = workspace.logits_plane(crop_size)
    threshold = np.float32(postprocess.MASK_THRESHOLD)
    high = np.float32(postprocess.MASK_THRESHOLD + params.stability_score_offset)
    low = np.float32(postprocess.MASK_THRESHOLD - params.stability_score_offset)
    stability_thresh = np.float32(params.stability_score_thresh)
    crop = np.array([x0, y0, x1, y1])
    image_box = np.array([0, 0, orig_w, orig_h])

    kept, rles, boxes, scores = [], [], [], []
    for index in candidates:
        prompt, token = divmod(int(index), n_tokens)
        low_res = masks[prompt, token]
        postprocess.postprocess_mask(low_res, input_size, crop_size, image_side, out=logits)
        # Every threshold below is >= low: only the window where logits can exceed low counts.
        wy0, wy1, wx0, wx1 = logit_reach(low_res, low, input_size, crop_size, image_side)
        window = logits[wy0:wy1, wx0:wx1]
        scratch = workspace.bool_plane("scratch", window.shape)
        intersections = np.float32(np.count_nonzero(np.greater(window, high, out=scratch)))
        unions = np.float32(np.count_nonzero(np.greater(window, low, out=scratch)))
        with np.errstate(invalid="ignore", divide="ignore"):
            stability = intersections / unions  # NaN for an empty union, as upstream
        if params.stability_score_thresh > 0.0 and not stability >= stability_thresh:
            continue
        mask = np.greater(window, threshold, out=workspace.bool_plane("mask", window.shape))
        local_box = postprocess.batched_mask_to_box(mask)
        box = local_box + np.array([wx0, wy0, wx0, wy0]) if mask.any() else local_box
        if is_box_near_crop_edge(box[None], crop, image_box, EDGE_TOLERANCE)[0]:
            continue
        kept.append(index)
        boxes.append(box)
        scores.append(stability)
        rles.append(rle_counts(mask, original_size, (x0 + wx0, y0 + wy0), local_box))

    kept = np.asarray(kept, dtype=np.int64)
    return MaskData(
        size=(orig_h, orig_w),
        rles=rles,
        boxes=np.asarray(boxes, dtype=np.int64).reshape(-1, 4),
        iou_preds=iou_flat[kept],
        points=points[kept // n_tokens],
        stability_score=np.asarray(scores, dtype=np.float32),
        crop_boxes=np.tile(crop, (len(kept), 1)).astype(np.int64),
    )


def finish_crop(
    batches: Sequence[MaskData], crop_box: Sequence[int], params: AmgParams
) -> MaskData:
    """The end of upstream `_process_crop`: box NMS within the crop (by predicted IoU), then
    boxes and points back to the image frame."""
    if not batches:
        raise ValueError("finish_crop needs the process_batch results of at least one batch")
    data = MaskData.concatenate(batches, batches[0].size)
    keep = batched_nms(
        data.boxes.astype(np.float32),
        data.iou_preds,
        np.zeros(len(data), dtype=np.int64),
        params.box_nms_thresh,
    )
    data = data.take(keep)
    data.boxes = uncrop_boxes_xyxy(data.boxes, crop_box)
    data.points = uncrop_points(data.points, crop_box)
    data.crop_boxes = np.tile(np.asarray(crop_box, dtype=np.int64), (len(data), 1))
    return data


def merge_crops(crops: Sequence[MaskData], params: AmgParams, size: Size | None = None) -> MaskData:
    """The end of upstream `_generate_masks`: concatenate the crops and, when there is more
    than one crop, drop duplicates across crops by box NMS preferring smaller crops."""
    if size is None:
        if not crops:
            raise ValueError("merge_crops needs the image size when there are no crops")
        size = crops[0].size
    data = MaskData.concatenate(crops, size)
    if len(crops) > 1 and len(data):
        scores = np.float32(1) / box_area(data.crop_boxes).astype(np.float32)
        keep = batched_nms(
            data.boxes.astype(np.float32),
            scores,
            np.zeros(len(data), dtype=np.int64),
            params.crop_nms_thresh,
        )
        data = data.take(keep)
    return data


def to_records(data: MaskData, output_format: OutputFormat) -> list[dict[str, Any]]:
    """Upstream's records, in data order, with the mask encoded in output_format.

    segmentation, area, bbox [x, y, w, h], predicted_iou, point_coords [[x, y]],
    stability_score, crop_box [x, y, w, h]. RLE is encoded straight from the stored counts
    (pycocotools' compressed form, upstream's "coco_rle"); PNG and polygons decode one mask at
    a time. A NaN stability score (possible only with stability_score_thresh = 0 and a mask
    empty at every threshold) is reported as 0.0, JSON having no NaN.
    """
    return [record(data, index, output_format) for index in range(len(data))]


def record(data: MaskData, index: int, output_format: OutputFormat) -> dict[str, Any]:
    """Record `index` of `to_records`, to encode (or stream) one mask at a time."""
    height, width = data.size
    counts = data.rles[index]
    if output_format is OutputFormat.RLE:
        segmentation: Any = encodings.encode_rle_counts(counts, (height, width))
    else:
        segmentation = encodings.encode_mask(data.mask(index), output_format)
    stability = float(data.stability_score[index])
    return {
        "segmentation": segmentation,
        "area": rle_area(counts),
        "bbox": postprocess.box_xyxy_to_xywh(data.boxes[index]).tolist(),
        "predicted_iou": float(data.iou_preds[index]),
        "point_coords": [data.points[index].tolist()],
        "stability_score": stability if math.isfinite(stability) else 0.0,
        "crop_box": postprocess.box_xyxy_to_xywh(data.crop_boxes[index]).tolist(),
    }
