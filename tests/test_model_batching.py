"""model_repository/*/1/batching.py: requests packed into runtime calls of bounded work.

The decoder-shaped stand-in computes every output from its own prompt alone (as the real
decoder does), so any packing or splitting must reproduce the unsplit answer exactly.
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from common import contract
from common.settings import PROJECT_ROOT

_spec = importlib.util.spec_from_file_location(
    "batching", PROJECT_ROOT / "model_repository" / contract.ENCODER_MODEL / "1" / "batching.py"
)
batching = importlib.util.module_from_spec(_spec)
sys.modules["batching"] = batching  # dataclasses look their module up while defining them
_spec.loader.exec_module(batching)

PROMPT_TENSORS = (
    contract.POINT_COORDS,
    contract.POINT_LABELS,
    contract.MASK_INPUT,
    contract.HAS_MASK_INPUT,
    *contract.DECODER_OUTPUTS,
)
OUTPUTS = list(contract.DECODER_OUTPUTS)


class StandInDecoder:
    """[B, P, ...] prompts -> [B, P, 4, 2, 2] masks and [B, P, 4] scores, per prompt."""

    def __init__(self) -> None:
        self.calls: list[int] = []  # prompts per call

    def __call__(self, batch: dict[str, np.ndarray]) -> list[np.ndarray]:
        coords = batch[contract.POINT_COORDS]  # [B, P, N, 2]
        labels = batch[contract.POINT_LABELS]  # [B, P, N]
        masks = batch[contract.MASK_INPUT]  # [B, M, 1, 2, 2], M = 1 or P
        used = batch[contract.HAS_MASK_INPUT]  # [B, M]
        embedding = batch[contract.IMAGE_EMBEDDINGS]  # [B, E]
        self.calls.append(coords.shape[0] * coords.shape[1])
        per_prompt = coords.sum(axis=(2, 3)) + 10 * labels.sum(axis=2)  # [B, P]
        mask_term = (masks[:, :, 0] * used[:, :, None, None]).sum(axis=(2, 3))  # [B, M]
        value = per_prompt + mask_term + embedding.sum(axis=1)[:, None]
        low_res = np.broadcast_to(value[:, :, None, None, None], (*value.shape, 4, 2, 2))
        iou = value[:, :, None] * np.arange(1, 5)
        return [low_res.copy(), iou]


def decoder_request(rng, items: int, prompts: int, points: int, per_prompt_masks: bool):
    masks = prompts if per_prompt_masks else 1
    return {
        contract.IMAGE_EMBEDDINGS: rng.random((items, 3)),
        contract.POINT_COORDS: rng.random((items, prompts, points, 2)),
        contract.POINT_LABELS: rng.integers(-1, 2, (items, prompts, points)).astype(float),
        contract.MASK_INPUT: rng.random((items, masks, 1, 2, 2)),
        contract.HAS_MASK_INPUT: rng.integers(0, 2, (items, masks)).astype(float),
    }


@pytest.mark.parametrize("max_work", [1, 3, 8, 32, 1000])
def test_packed_and_split_calls_give_the_unsplit_answers(max_work: int) -> None:
    rng = np.random.default_rng(max_work)
    requests = [
        decoder_request(rng, 1, 5, 2, False),
        decoder_request(rng, 1, 5, 2, False),  # same shapes: merged with the first
        decoder_request(rng, 1, 70, 2, True),  # larger than most bounds: split by prompts
        decoder_request(rng, 3, 4, 3, True),  # several items: split by items first
        decoder_request(rng, 1, 1, 5, False),
        decoder_request(rng, 2, 5, 2, False),  # same shapes as the first two again
    ]
    decoder = StandInDecoder()
    results = batching.run_all(requests, decoder, OUTPUTS, max_work, PROMPT_TENSORS)

    assert max(decoder.calls) <= max(max_work, 1)
    assert sum(decoder.calls) == sum(
        r[contract.POINT_COORDS].shape[0] * r[contract.POINT_COORDS].shape[1] for r in requests
    )
    for request, result in zip(requests, results, strict=True):
        expected = StandInDecoder()(request)
        for name, array in zip(OUTPUTS, expected, strict=True):
            np.testing.assert_array_equal(result[name], array)


def test_requests_that_fit_share_one_call() -> None:
    rng = np.random.default_rng(0)
    requests = [decoder_request(rng, 1, 8, 2, False) for _ in range(4)]
    decoder = StandInDecoder()
    batching.run_all(requests, decoder, OUTPUTS, 32, PROMPT_TENSORS)
    assert decoder.calls == [32]
    decoder = StandInDecoder()
    batching.run_all(requests, decoder, OUTPUTS, 16, PROMPT_TENSORS)
    assert decoder.calls == [16, 16]


def test_without_a_prompt_axis_work_is_batch_items() -> None:
    images = [{contract.IMAGES: np.full((count, 2), count)} for count in (1, 3, 2)]
    seen: list[int] = []

    def encoder(batch):
        seen.append(len(batch[contract.IMAGES]))
        return [batch[contract.IMAGES] * 2]

    results = batching.run_all(images, encoder, ["out"], 4)
    assert seen == [4, 2]  # 1 + 3 together, then 2
    for request, result in zip(images, results, strict=True):
        np.testing.assert_array_equal(result["out"], request[contract.IMAGES] * 2)
