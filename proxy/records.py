"""Decoder answers for prompts -> the API's mask records (upstream's names and arithmetic)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from proxy import encodings, postprocess
from proxy.geometry import Size


def prompt_records(
    low_res: np.ndarray,
    iou: np.ndarray,
    input_size: Size,
    original_size: Size,
    image_side: int,
    multimask_output: bool,
    output_format: encodings.OutputFormat,
    mask_ids: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """One prompt's answer ([4, 256, 256] logits, [4] IoU) -> its records, best IoU first.

    Tokens as `SamPredictor.predict` picks them (1..3 with multimask, else 0), upsampled to the
    image as `Sam.postprocess_masks` does, one mask at a time through one float plane (a
    40-megapixel image's three masks would otherwise hold 480 MB of logits at once).
    `mask_ids`, one per chosen token, go with them.
    """
    chosen_masks, chosen_iou = postprocess.select_masks(low_res[None], iou[None], multimask_output)
    logits = np.empty(original_size, dtype=np.float32)
    records = []
    for mask, score in zip(chosen_masks[0], chosen_iou[0], strict=True):
        postprocess.postprocess_mask(mask, input_size, original_size, image_side, out=logits)
        records.append(mask_record(logits, float(score), output_format))
    if mask_ids is not None:
        for record, mask_id in zip(records, mask_ids, strict=True):
            record["mask_id"] = mask_id
    records.sort(key=lambda record: record["predicted_iou"], reverse=True)
    return records


def mask_record(
    logits: np.ndarray, predicted_iou: float, output_format: encodings.OutputFormat
) -> dict[str, Any]:
    mask = postprocess.threshold_masks(logits)
    stability = float(postprocess.stability_score(logits))
    box = postprocess.batched_mask_to_box(mask)
    return {
        "segmentation": encodings.encode_mask(mask, output_format, box),
        "predicted_iou": predicted_iou,
        # Upstream's score is NaN when no logit passes -offset; JSON has no NaN, and such a
        # mask (empty at every threshold) has no stability to speak of.
        "stability_score": stability if np.isfinite(stability) else 0.0,
        "area": int(np.count_nonzero(mask)),
        "bbox": [int(v) for v in postprocess.box_xyxy_to_xywh(box)],
    }
