"""proxy.prompts: precise rejections, and decoder arrays that embed exactly as upstream's."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from proxy.problems import status_of
from proxy.prompts import (
    Prompt,
    PromptError,
    group_prompts_by_length,
    parse_prompts,
    prompt_to_decoder_arrays,
    stack_prompts,
    validate_prompts,
)

LONG_SIDE = 1024
WIDTH, HEIGHT = 640, 480
LIMITS = {
    "width": WIDTH,
    "height": HEIGHT,
    "max_prompts": 4,
    "max_points": 3,
    "coordinate_margin": 320.0,  # pixels
}


def parse(raw: str | Any) -> list[Prompt]:
    return parse_prompts(raw if isinstance(raw, str) else json.dumps(raw), **LIMITS)


# --- validation -------------------------------------------------------------------------------


def test_accepts_points_boxes_and_both() -> None:
    prompts = parse(
        [
            {"points": [[10, 20], [30.5, 40]], "labels": [1, 0]},
            {"box": [0, 0, 639, 479]},
            {"points": [[5, 5]], "labels": [0], "box": [1, 2, 3, 4]},
            {"points": [[-320, 800]], "box": None},  # on the margin; labels default to 1
        ]
    )
    assert prompts == [
        Prompt(points=((10.0, 20.0), (30.5, 40.0)), labels=(1, 0)),
        Prompt(box=(0.0, 0.0, 639.0, 479.0)),
        Prompt(points=((5.0, 5.0),), labels=(0,), box=(1.0, 2.0, 3.0, 4.0)),
        Prompt(points=((-320.0, 800.0),), labels=(1,)),
    ]


def test_validate_prompts_takes_decoded_json() -> None:
    assert validate_prompts([{"box": [1, 2, 3, 4]}], **LIMITS) == [Prompt(box=(1, 2, 3, 4))]


def test_degenerate_box_is_allowed_like_upstream() -> None:
    assert parse([{"box": [5, 5, 5, 5]}]) == [Prompt(box=(5.0, 5.0, 5.0, 5.0))]


INVALID = [
    # (raw, code, location, words the message must contain)
    ("{", "malformed_json", "prompts", "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "malformed_json", "prompts", "not valid JSON"),
    ({"points": [[1, 2]]}, "prompts_not_a_list", "prompts", "got an object"),
    ("null", "prompts_not_a_list", "prompts", "got null"),
    ([], "no_prompts", "prompts", "empty"),
    ([{"box": [1, 2, 3, 4]}] * 5, "too_many_prompts", "prompts", "5 prompts given; the limit is 4"),
    ([{"box": [1, 2, 3, 4]}, 7], "prompt_not_an_object", "prompts[1]", "got the number 7"),
    ([[1, 2]], "prompt_not_an_object", "prompts[0]", "got a list"),
    ([{"box": [1, 2, 3, 4], "mask": 1}], "unknown_field", "prompts[0]", "'mask'"),
    ([{}], "empty_prompt", "prompts[0]", 'needs "points" or a "box"'),
    ([{"points": [], "labels": []}], "empty_prompt", "prompts[0]", "needs"),
    ('[{"points": [[1, NaN]]}]', "invalid_number", "prompts[0].points[0][1]", "finite"),
    ('[{"points": [[Infinity, 1]]}]', "invalid_number", "prompts[0].points[0][0]", "finite"),
    ('[{"box": [1, 2, 3, 1e400]}]', "invalid_number", "prompts[0].box[3]", "finite"),
    ([{"points": [[True, 1]]}], "invalid_number", "prompts[0].points[0][0]", "got true"),
    ([{"points": [[1, "2"]]}], "invalid_number", "prompts[0].points[0][1]", 'got "2"'),
    ([{"box": [1, None, 3, 4]}], "invalid_number", "prompts[0].box[1]", "got null"),
    ([{"points": [[1, 2, 3]]}], "invalid_points", "prompts[0].points[0]", "[x, y] pair"),
    ([{"points": [1, 2]}], "invalid_points", "prompts[0].points[0]", "[x, y] pair"),
    ([{"points": {"x": 1}}], "invalid_points", "prompts[0].points", "list of [x, y] pairs"),
    (
        [{"points": [[1, 2]], "labels": [1, 0]}],
        "label_count_mismatch",
        "prompts[0].labels",
        "2 labels for 1 point(s)",
    ),
    ([{"points": [[1, 2]], "labels": [2]}], "invalid_label", "prompts[0].labels[0]", "got 2"),
    ([{"points": [[1, 2]], "labels": [-1]}], "invalid_label", "prompts[0].labels[0]", "got -1"),
    ([{"points": [[1, 2]], "labels": [1.0]}], "invalid_label", "prompts[0].labels[0]", "1.0"),
    ([{"points": [[1, 2]], "labels": [True]}], "invalid_label", "prompts[0].labels[0]", "true"),
    ([{"points": [[1, 2]], "labels": 1}], "invalid_labels", "prompts[0].labels", "list of 0/1"),
    ([{"labels": [1], "box": [1, 2, 3, 4]}], "invalid_labels", "prompts[0].labels", "without"),
    ([{"box": [1, 2, 3]}], "invalid_box", "prompts[0].box", "[x0, y0, x1, y1]"),
    ([{"box": [1, 2, 3, 4, 5]}], "invalid_box", "prompts[0].box", "got [1, 2, 3, 4, 5]"),
    ([{"box": "1,2,3,4"}], "invalid_box", "prompts[0].box", "[x0, y0, x1, y1]"),
    ([{"box": [30, 2, 10, 4]}], "invalid_box", "prompts[0].box", "x0 <= x1"),
    ([{"box": [1, 40, 3, 4]}], "invalid_box", "prompts[0].box", "y0 <= y1"),
    (
        [{"points": [[10_000, 2]]}],
        "coordinate_out_of_range",
        "prompts[0].points[0][0]",
        "x = 10000 is far outside the image (allowed -320 to 960)",
    ),
    (
        [{"box": [0, 0, 10, 1000]}],
        "coordinate_out_of_range",
        "prompts[0].box[3]",
        "y = 1000 is far outside the image (allowed -320 to 800)",
    ),
    (
        [{"box": [1, 2, 3, 4]}, {"points": [[-321, 0]]}],
        "coordinate_out_of_range",
        "prompts[1].points[0][0]",
        "x = -321",
    ),
    (
        [{"points": [[1, 1]] * 4}],
        "too_many_points",
        "prompts[0].points",
        "4 points given; the limit is 3",
    ),
]


@pytest.mark.parametrize(
    ("raw", "code", "location", "words"), INVALID, ids=[case[1] for case in INVALID]
)
def test_invalid_prompts_are_refused_precisely(raw, code: str, location: str, words: str) -> None:
    with pytest.raises(PromptError) as info:
        parse(raw)
    error = info.value
    assert isinstance(error, ValueError)
    assert (error.code, error.location, status_of(error)) == (code, location, 422)
    assert str(error).startswith(f"{location}: ")
    assert words in str(error)


# --- decoder arrays against upstream ----------------------------------------------------------


class _Captured(Exception):
    """Stops upstream's predictor right after the prompt encoder has run."""


@pytest.fixture(scope="module")
def prompt_encoder():
    import torch
    from mobile_sam.modeling import PromptEncoder

    torch.manual_seed(0)  # random positional-encoding matrix and embeddings
    return PromptEncoder(
        embed_dim=256,
        image_embedding_size=(64, 64),
        input_image_size=(LONG_SIDE, LONG_SIDE),
        mask_in_chans=16,
    ).eval()


def upstream_prompt_encoding(prompt_encoder, prompt: Prompt, original_size):
    """What `SamPredictor.predict` hands the prompt encoder, and the sparse embedding it gets."""
    import torch
    from mobile_sam.predictor import SamPredictor

    captured: dict[str, Any] = {}

    def record(points, boxes, masks):
        captured["points"], captured["boxes"] = points, boxes
        captured["sparse"] = prompt_encoder(points=points, boxes=boxes, masks=masks)[0]
        raise _Captured

    model = SimpleNamespace(
        image_encoder=SimpleNamespace(img_size=LONG_SIDE),
        prompt_encoder=record,
        device=torch.device("cpu"),
    )
    predictor = SamPredictor(model)
    predictor.is_image_set, predictor.original_size = True, original_size
    with pytest.raises(_Captured):
        predictor.predict(
            point_coords=np.array(prompt.points) if prompt.points else None,
            point_labels=np.array(prompt.labels) if prompt.points else None,
            box=np.array(prompt.box) if prompt.box is not None else None,
        )
    return captured


def exported_sparse_embedding(prompt_encoder, coords: np.ndarray, labels: np.ndarray):
    """The sparse embedding the exported decoder graph computes from our arrays."""
    import torch

    from export.graphs import DecoderGraph

    graph = SimpleNamespace(image_size=LONG_SIDE, prompt_encoder=prompt_encoder)
    with torch.no_grad():
        return DecoderGraph._embed_points(
            graph, torch.from_numpy(coords)[None], torch.from_numpy(labels)[None]
        )


# In fractions of the image size, so that every prompt fits every image size below.
RELATIVE_PROMPTS = [
    Prompt(points=((0.2, 0.4),), labels=(1,)),
    Prompt(points=((0.0, 0.0), (1.0, 1.0), (0.5, 0.03)), labels=(1, 0, 1)),
    Prompt(box=(0.02, 0.04, 0.94, 0.98)),
    Prompt(points=((0.47, 0.42), (0.08, 0.13)), labels=(0, 1), box=(0.01, 0.01, 0.78, 0.83)),
    Prompt(points=((-0.15, 1.45),), labels=(0,)),
]


def scaled(prompt: Prompt, original_size: tuple[int, int]) -> Prompt:
    height, width = original_size
    box = None
    if prompt.box is not None:
        x0, y0, x1, y1 = prompt.box
        box = (x0 * width, y0 * height, x1 * width, y1 * height)
    return Prompt(
        points=tuple((x * width, y * height) for x, y in prompt.points),
        labels=prompt.labels,
        box=box,
    )


ORIGINAL_SIZES = [(480, 640), (640, 480), (1, 1), (333, 777), (3024, 4032), (17, 2001)]


@pytest.mark.parametrize("original_size", ORIGINAL_SIZES)
@pytest.mark.parametrize("relative", RELATIVE_PROMPTS)
def test_decoder_arrays_are_what_upstream_embeds(prompt_encoder, relative, original_size) -> None:
    import torch

    prompt = scaled(relative, original_size)
    coords, labels = prompt_to_decoder_arrays(prompt, original_size, LONG_SIDE)
    upstream = upstream_prompt_encoding(prompt_encoder, prompt, original_size)

    assert coords.dtype == labels.dtype == np.float32
    n_points = len(prompt.points)
    if prompt.points:  # the transformed points come first, exactly as upstream's tensor
        points, point_labels = upstream["points"]
        np.testing.assert_array_equal(coords[:n_points], points[0].numpy())
        np.testing.assert_array_equal(labels[:n_points], point_labels[0].numpy())
    if prompt.box is None:  # upstream's padding point, only without a box
        np.testing.assert_array_equal(coords[n_points:], [[0.0, 0.0]])
        np.testing.assert_array_equal(labels[n_points:], [-1.0])
    else:  # box corners last, top-left labelled 2, bottom-right 3, no padding point
        np.testing.assert_array_equal(coords[n_points:], upstream["boxes"].reshape(2, 2).numpy())
        np.testing.assert_array_equal(labels[n_points:], [2.0, 3.0])

    # Same arithmetic; upstream embeds points and box corners in two matmuls, the graph in one,
    # so float32 rounding may differ in the last bits.
    ours = exported_sparse_embedding(prompt_encoder, coords, labels)
    assert ours.shape == upstream["sparse"].shape
    torch.testing.assert_close(ours, upstream["sparse"], rtol=0, atol=1e-5)


def test_an_extra_padding_point_would_change_the_embedding(prompt_encoder) -> None:
    """Why prompts of different lengths are never padded into one batch."""
    import torch

    coords, labels = prompt_to_decoder_arrays(
        scaled(RELATIVE_PROMPTS[2], (480, 640)), (480, 640), LONG_SIDE
    )
    padded_coords = np.concatenate([coords, [[0.0, 0.0]]]).astype(np.float32)
    padded_labels = np.concatenate([labels, [-1.0]]).astype(np.float32)
    plain = exported_sparse_embedding(prompt_encoder, coords, labels)
    padded = exported_sparse_embedding(prompt_encoder, padded_coords, padded_labels)
    assert padded.shape[1] == plain.shape[1] + 1
    torch.testing.assert_close(padded[:, :-1], plain)  # the extra token is a real extra token


def test_grouping_batches_equal_lengths_only() -> None:
    arrays = [
        prompt_to_decoder_arrays(scaled(p, (480, 640)), (480, 640), LONG_SIDE)
        for p in RELATIVE_PROMPTS
    ]
    # lengths: 1+pad=2, 3+pad=4, box=2, 2+box=4, 1+pad=2
    groups = group_prompts_by_length(arrays)
    assert groups == {2: [0, 2, 4], 4: [1, 3]}
    coords, labels = stack_prompts(arrays, groups[2])
    assert coords.shape == (3, 2, 2) and labels.shape == (3, 2)
    np.testing.assert_array_equal(labels, [[1, -1], [2, 3], [0, -1]])
    np.testing.assert_array_equal(coords[1], arrays[2][0])
