"""Segment-everything settings: upstream `SamAutomaticMaskGenerator`'s names and defaults."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np

from common import contract
from proxy.errors import InvalidParameter


@dataclass(frozen=True, slots=True)
class AmgParams:
    """Upstream `SamAutomaticMaskGenerator` settings, same names and defaults.

    Accepted ranges (`LIMITS`, inclusive), checked on construction:

    ===============================  ===========  ===============================================
    points_per_side                  1 .. 64      grid of n x n points on the first crop layer
    points_per_batch                 1 .. 256     prompts per decoder call
    pred_iou_thresh                  -1 .. 1      <= 0 disables the filter (upstream's ``> 0``)
    stability_score_thresh           0 .. 1       0 disables the filter
    stability_score_offset           0 .. 16      logit offset of the stability score
    box_nms_thresh                   0 .. 1       IoU above which a box is a duplicate in a crop
    crop_n_layers                    0 .. 3       layer i adds (2**i)**2 crops (3 layers: 85)
    crop_nms_thresh                  0 .. 1       duplicate IoU between crops
    crop_overlap_ratio               0 .. 0.9     overlap of first-layer crops, of the short side
    crop_n_points_downscale_factor   1 .. 16      layer i has points_per_side / factor**i points
    min_mask_region_area             0 .. 10**7   pixels; 0 disables the clean-up
    ===============================  ===========  ===============================================

    Every crop layer must keep at least one point per side:
    ``points_per_side // crop_n_points_downscale_factor**crop_n_layers >= 1``
    (upstream would divide by zero). Upstream's alternative `point_grids` is not offered.
    """

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0

    LIMITS: ClassVar[dict[str, tuple[float, float]]] = {
        "points_per_side": (1, 64),
        "points_per_batch": (1, contract.MAX_PROMPTS_PER_DECODER_CALL),
        "pred_iou_thresh": (-1.0, 1.0),
        "stability_score_thresh": (0.0, 1.0),
        "stability_score_offset": (0.0, 16.0),
        "box_nms_thresh": (0.0, 1.0),
        "crop_n_layers": (0, 3),
        "crop_nms_thresh": (0.0, 1.0),
        "crop_overlap_ratio": (0.0, 0.9),
        "crop_n_points_downscale_factor": (1, 16),
        "min_mask_region_area": (0, 10_000_000),
    }

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            low, high = self.LIMITS[field.name]
            if field.type == "int":
                if isinstance(value, bool) or not isinstance(value, int | np.integer):
                    raise InvalidParameter(field.name, f"must be an integer, got {value!r}")
                object.__setattr__(self, field.name, int(value))
            else:
                if isinstance(value, bool) or not isinstance(value, int | float | np.number):
                    raise InvalidParameter(field.name, f"must be a number, got {value!r}")
                if not math.isfinite(value):
                    raise InvalidParameter(field.name, f"must be a finite number, got {value!r}")
                object.__setattr__(self, field.name, float(value))
            if not low <= value <= high:
                raise InvalidParameter(
                    field.name, f"{value!r} is outside the allowed range {low} to {high}"
                )
        last_layer = self.crop_n_points_downscale_factor**self.crop_n_layers
        if int(self.points_per_side / last_layer) < 1:
            raise InvalidParameter(
                "crop_n_points_downscale_factor",
                f"{self.points_per_side} points per side divided by "
                f"{self.crop_n_points_downscale_factor}**{self.crop_n_layers} leaves no point "
                "on the last crop layer",
            )

    def decoder_prompts(self) -> int:
        """Decoder prompts a run asks for: crop layer i has (2**i)**2 crops of
        (points_per_side / crop_n_points_downscale_factor**i)**2 grid points each. An upper
        bound (crops too thin to encode, on images a few pixels wide, are skipped)."""
        return sum(
            4**layer * int(self.points_per_side / self.crop_n_points_downscale_factor**layer) ** 2
            for layer in range(self.crop_n_layers + 1)
        )

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> AmgParams:
        """Build from a JSON object; unknown names are an error (a typo must not pass)."""
        names = {field.name for field in fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise InvalidParameter(
                unknown[0],
                f"unknown parameter(s) {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(sorted(names))}",
            )
        return cls(**raw)
