"""Mask parity between runtimes and precisions, through the real proxy.

bf16 is opt-in because it changes the answers a little; how little is this figure: the same
photographs and prompts sent through the proxy of each variant, and each mask's IoU with the
fp32 mask of the reference variant, plus the largest predicted-IoU difference. One mask per
prompt (`multimask_output=false`), so masks pair up without depending on a score ranking.

With random-init weights the masks are not objects, and the figure is a property of these
weights as much as of the precision: read it as "how far bf16 moves a mask", and re-measure
with the real checkpoint before relying on it.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np

from benchmarks.assets import Upload
from benchmarks.loadgen import percentile
from benchmarks.workloads import SEGMENT, several_prompts
from proxy.encodings import decode_rle
from testkit.masks import mask_iou


def collect_masks(base_url: str, uploads: list[Upload], timeout_s: float = 120) -> list[dict]:
    """One record per (photo, prompt): the COCO RLE mask and its predicted IoU."""
    records = []
    with httpx.Client(base_url=base_url, timeout=timeout_s) as client:
        for upload in uploads:
            prompts = several_prompts(upload.width, upload.height)
            response = client.post(
                SEGMENT,
                data={"prompts": json.dumps(prompts), "multimask_output": "false"},
                files={"file": (upload.name, upload.data, upload.content_type)},
            )
            response.raise_for_status()
            for index, result in enumerate(response.json()["results"]):
                (mask,) = result["masks"]
                records.append(
                    {
                        "photo": upload.name,
                        "prompt": index,
                        "segmentation": mask["segmentation"],
                        "predicted_iou": mask["predicted_iou"],
                    }
                )
    return records


def compare(reference: list[dict], candidate: list[dict]) -> dict[str, Any]:
    """IoU of every candidate mask with its reference mask, and the score differences."""
    pairs = {(r["photo"], r["prompt"]): r for r in reference}
    ious, score_diffs = [], []
    for record in candidate:
        ref = pairs[(record["photo"], record["prompt"])]
        ious.append(mask_iou(decode_rle(ref["segmentation"]), decode_rle(record["segmentation"])))
        score_diffs.append(abs(ref["predicted_iou"] - record["predicted_iou"]))
    return {
        "masks": len(ious),
        "photos": len({record["photo"] for record in candidate}),
        "iou_mean": float(np.mean(ious)) if ious else None,
        "iou_min": min(ious) if ious else None,
        "iou_p5": percentile(ious, 5) if ious else None,
        "score_diff_max": max(score_diffs) if score_diffs else None,
    }


def everything_masks(
    base_url: str, upload: Upload, settings: dict[str, float], timeout_s: float = 600
) -> list[dict]:
    """Segment everything on one photo: its masks (COCO RLE) as the API returns them."""
    response = httpx.post(
        f"{base_url}{SEGMENT}",
        data={name: str(value) for name, value in settings.items()},
        files={"file": (upload.name, upload.data, upload.content_type)},
        timeout=timeout_s,
    )
    response.raise_for_status()
    return [{"photo": upload.name, **mask} for mask in response.json()["masks"]]


def match_everything(
    reference: list[dict], candidate: list[dict], threshold: float = 0.9
) -> dict[str, Any]:
    """The share of reference masks that some candidate mask of the same photo matches at
    IoU >= `threshold` (each candidate used once, best pairs first), and the counts."""
    matched = 0
    for photo in sorted({record["photo"] for record in reference}):
        ours = [decode_rle(r["segmentation"]) for r in reference if r["photo"] == photo]
        theirs = [decode_rle(r["segmentation"]) for r in candidate if r["photo"] == photo]
        pairs = sorted(
            ((mask_iou(a, b), i, j) for i, a in enumerate(ours) for j, b in enumerate(theirs)),
            reverse=True,
        )
        used_ref: set[int] = set()
        used_cand: set[int] = set()
        for iou, i, j in pairs:
            if iou < threshold:
                break
            if i not in used_ref and j not in used_cand:
                used_ref.add(i)
                used_cand.add(j)
        matched += len(used_ref)
    return {
        "threshold": threshold,
        "reference_masks": len(reference),
        "candidate_masks": len(candidate),
        "matched": matched,
        "share": matched / len(reference) if reference else None,
        "photos": len({record["photo"] for record in reference}),
    }
