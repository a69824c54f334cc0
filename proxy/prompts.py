"""Client prompts: strict validation, then exactly the arrays upstream's PromptEncoder embeds.

A request carries a JSON list of prompt items in original-image pixels::

    [{"points": [[x, y], ...], "labels": [1, 0, ...]},   # 1 foreground, 0 background
     {"box": [x0, y0, x1, y1]},
     {"points": [[x, y]], "labels": [1], "box": [x0, y0, x1, y1]},
     {"points": [[x, y], [x, y]], "labels": [1, 0], "mask_id": "9c0e..."}]  # refine

`mask_id` names a mask of an earlier answer (`proxy.mask_store`): its low-resolution logits go
to the decoder as `mask_input`, as upstream refines with `SamPredictor.predict(mask_input=...)`.

`labels` may be omitted, meaning all points are foreground. Every rejection is a `PromptError`
whose message names the item and field (``prompts[2].box[3]: ...``), because a 422 that says
only "invalid prompt" leaves the client guessing.

Each prompt is decoded as upstream `SamPredictor.predict` would decode it alone. Upstream adds
a padding point (label -1) to point-only prompts and none when a box is present; an extra
padding point changes the masks, so prompts are batched only with prompts of the same length
(`group_prompts_by_length`), never padded to a common length.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.contract import (
    BACKGROUND_LABEL,
    BOX_BOTTOM_RIGHT_LABEL,
    BOX_TOP_LEFT_LABEL,
    FOREGROUND_LABEL,
    PADDING_LABEL,
)
from proxy.errors import PromptError
from proxy.geometry import Size, apply_boxes, apply_coords
from proxy.mask_store import is_mask_id

PROMPT_FIELDS = ("points", "labels", "box", "mask_id")

Point = tuple[float, float]
Box = tuple[float, float, float, float]


@dataclass(frozen=True, slots=True)
class Prompt:
    """One validated prompt in original-image pixels.

    `mask_input` is the previous answer's [256, 256] logits that `mask_id` names, filled in
    by the service once it has found them.
    """

    points: tuple[Point, ...] = ()
    labels: tuple[int, ...] = ()
    box: Box | None = None
    mask_id: str | None = None
    mask_input: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class _Limits:
    width: int
    height: int
    max_points: int
    coordinate_margin: float

    def x_range(self) -> tuple[float, float]:
        return -self.coordinate_margin, self.width + self.coordinate_margin

    def y_range(self) -> tuple[float, float]:
        return -self.coordinate_margin, self.height + self.coordinate_margin


def parse_prompts(
    raw: str | bytes,
    *,
    width: int,
    height: int,
    max_prompts: int,
    max_points: int,
    coordinate_margin: float,
) -> list[Prompt]:
    """Parse and validate the JSON prompt list for an image of width x height.

    `coordinate_margin` is in pixels: x may lie in [-margin, width + margin], y in
    [-margin, height + margin]. A click just outside the picture is a plausible UI artefact;
    one far outside is a client bug worth reporting.
    """
    try:
        items = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError.
        raise PromptError("malformed_json", f"not valid JSON ({exc})") from exc
    return validate_prompts(
        items,
        width=width,
        height=height,
        max_prompts=max_prompts,
        max_points=max_points,
        coordinate_margin=coordinate_margin,
    )


def validate_prompts(
    items: Any,
    *,
    width: int,
    height: int,
    max_prompts: int,
    max_points: int,
    coordinate_margin: float,
) -> list[Prompt]:
    """`parse_prompts` for an already-decoded JSON value."""
    if not isinstance(items, list):
        raise PromptError(
            "prompts_not_a_list", f"must be a JSON list of prompt objects, got {_kind(items)}"
        )
    if not items:
        raise PromptError("no_prompts", "the list is empty; omit prompts to segment everything")
    if len(items) > max_prompts:
        raise PromptError(
            "too_many_prompts", f"{len(items)} prompts given; the limit is {max_prompts}"
        )
    limits = _Limits(width, height, max_points, coordinate_margin)
    return [_parse_item(item, f"prompts[{i}]", limits) for i, item in enumerate(items)]


def _parse_item(item: Any, where: str, limits: _Limits) -> Prompt:
    if not isinstance(item, dict):
        raise PromptError(
            "prompt_not_an_object",
            f'must be an object with "points"/"labels" and/or "box", got {_kind(item)}',
            where,
        )
    unknown = sorted(set(item) - set(PROMPT_FIELDS))
    if unknown:
        raise PromptError(
            "unknown_field",
            f"unknown field(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(PROMPT_FIELDS)}",
            where,
        )
    points = _parse_points(item.get("points"), f"{where}.points", limits)
    labels = _parse_labels(item.get("labels"), len(points), f"{where}.labels")
    box = _parse_box(item.get("box"), f"{where}.box", limits)
    mask_id = _parse_mask_id(item.get("mask_id"), f"{where}.mask_id")
    if not points and box is None:
        # Upstream embeds a mask alone with no point at all; the decoder graph needs one.
        raise PromptError("empty_prompt", 'needs "points" or a "box" (or both)', where)
    return Prompt(points=points, labels=labels, box=box, mask_id=mask_id)


def _parse_points(raw: Any, where: str, limits: _Limits) -> tuple[Point, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise PromptError(
            "invalid_points", f"must be a list of [x, y] pairs, got {_kind(raw)}", where
        )
    if len(raw) > limits.max_points:
        raise PromptError(
            "too_many_points", f"{len(raw)} points given; the limit is {limits.max_points}", where
        )
    return tuple(_parse_point(point, f"{where}[{i}]", limits) for i, point in enumerate(raw))


def _parse_point(raw: Any, where: str, limits: _Limits) -> Point:
    if not isinstance(raw, list) or len(raw) != 2:
        raise PromptError("invalid_points", f"must be an [x, y] pair, got {_short(raw)}", where)
    x = _coordinate(raw[0], f"{where}[0]", "x", limits.x_range())
    y = _coordinate(raw[1], f"{where}[1]", "y", limits.y_range())
    return x, y


def _parse_labels(raw: Any, n_points: int, where: str) -> tuple[int, ...]:
    if raw is None:
        return (FOREGROUND_LABEL,) * n_points
    if not isinstance(raw, list):
        raise PromptError("invalid_labels", f"must be a list of 0/1, got {_kind(raw)}", where)
    if n_points == 0 and raw:
        raise PromptError("invalid_labels", "labels given without points", where)
    if len(raw) != n_points:
        raise PromptError(
            "label_count_mismatch",
            f"{len(raw)} labels for {n_points} point(s); give one label per point",
            where,
        )
    for i, label in enumerate(raw):
        if not _is_int(label) or label not in (FOREGROUND_LABEL, BACKGROUND_LABEL):
            raise PromptError(
                "invalid_label",
                f"must be 1 (foreground) or 0 (background), got {_short(label)}",
                f"{where}[{i}]",
            )
    return tuple(raw)


def _parse_box(raw: Any, where: str, limits: _Limits) -> Box | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) != 4:
        raise PromptError("invalid_box", f"must be [x0, y0, x1, y1], got {_short(raw)}", where)
    ranges = (limits.x_range(), limits.y_range()) * 2
    x0, y0, x1, y1 = (
        _coordinate(value, f"{where}[{i}]", "xyxy"[i], ranges[i]) for i, value in enumerate(raw)
    )
    if x1 < x0 or y1 < y0:
        raise PromptError(
            "invalid_box",
            f"corners must be top-left then bottom-right (x0 <= x1, y0 <= y1), got {raw}",
            where,
        )
    return x0, y0, x1, y1


def _parse_mask_id(raw: Any, where: str) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not is_mask_id(raw):
        raise PromptError(
            "invalid_mask_id",
            f"must be a mask_id from an earlier answer (32 hex digits), got {_short(raw)}",
            where,
        )
    return raw


def _coordinate(raw: Any, where: str, axis: str, allowed: tuple[float, float]) -> float:
    value = _finite_number(raw, where)
    low, high = allowed
    if not low <= value <= high:
        raise PromptError(
            "coordinate_out_of_range",
            f"{axis} = {value:g} is far outside the image (allowed {low:g} to {high:g})",
            where,
        )
    return value


def _finite_number(raw: Any, where: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise PromptError("invalid_number", f"must be a number, got {_short(raw)}", where)
    try:
        value = float(raw)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise PromptError("invalid_number", f"must be a finite number, got {_short(raw)}", where)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"the number {_short(value)}"
    return kinds.get(type(value), f"a {type(value).__name__}")


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value) if _is_json(value) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def prompt_to_decoder_arrays(
    prompt: Prompt, original_size: Size, image_side: int
) -> tuple[np.ndarray, np.ndarray]:
    """(point_coords [N, 2], point_labels [N]) float32, as `SamPredictor.predict` embeds them.

    Points first (mapped by `apply_coords`), then the box as its two corners labelled 2 and 3
    (mapped by `apply_boxes`); upstream appends the padding point (0, 0) labelled -1 only when
    there is no box. Coordinates are computed in float64 and cast once, as upstream does.
    """
    coords: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    if prompt.points:
        coords.append(apply_coords(np.array(prompt.points), original_size, image_side))
        labels.append(np.array(prompt.labels, dtype=np.float32))
    if prompt.box is not None:
        coords.append(apply_boxes(np.array(prompt.box), original_size, image_side).reshape(2, 2))
        labels.append(np.array([BOX_TOP_LEFT_LABEL, BOX_BOTTOM_RIGHT_LABEL], dtype=np.float32))
    else:
        coords.append(np.zeros((1, 2)))
        labels.append(np.array([PADDING_LABEL], dtype=np.float32))
    return np.concatenate(coords).astype(np.float32), np.concatenate(labels)


def group_prompts_by_length(
    arrays: Sequence[tuple[np.ndarray, np.ndarray]],
) -> dict[int, list[int]]:
    """Prompt indices by point count N, so each group is one decoder call without padding."""
    groups: dict[int, list[int]] = {}
    for index, (_, labels) in enumerate(arrays):
        groups.setdefault(len(labels), []).append(index)
    return groups


def stack_prompts(
    arrays: Sequence[tuple[np.ndarray, np.ndarray]], indices: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Decoder inputs for one group: point_coords [P, N, 2] and point_labels [P, N]."""
    coords = np.stack([arrays[i][0] for i in indices])
    labels = np.stack([arrays[i][1] for i in indices])
    return coords, labels


def stack_mask_inputs(
    prompts: Sequence[Prompt], indices: Sequence[int]
) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """Decoder `mask_input` [P, 1, 256, 256] and `has_mask_input` [P] for one group; (None,
    None) when no prompt of the group has a previous mask (the gateway then sends one unused
    mask for all, which lets the decoder share its per-image work between the prompts)."""
    given = [prompts[i].mask_input for i in indices if prompts[i].mask_input is not None]
    if not given:
        return None, None
    masks = np.zeros((len(indices), 1, *given[0].shape), dtype=np.float32)
    used = np.zeros(len(indices), dtype=np.float32)
    for row, index in enumerate(indices):
        if prompts[index].mask_input is not None:
            masks[row, 0] = prompts[index].mask_input
            used[row] = 1
    return masks, used
