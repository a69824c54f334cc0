"""Segment everything: upstream `SamAutomaticMaskGenerator.generate` with the model behind a
`MaskModel`. The service runs this loop with Triton; the tests run the same loop with
stand-in models (a synthetic decoder, upstream's PyTorch networks).

    for each crop (the whole image first):
        embedding of the crop                          MaskModel.crop_embedding
        for each batch of points_per_batch grid points:
            low-res logits and IoU of every point      MaskModel.decode, two calls in flight
            filters, upsampling, RLE                   process_batch
        box NMS within the crop                        finish_crop
    NMS across crops, small-region clean-up            merge_crops, postprocess_small_regions

Decoder calls are kept `DECODER_WINDOW` deep, so the model computes the next batch while this
process post-processes the last one. CPU-heavy steps run in worker threads. An optional
`progress(done, total)` hears how many grid points (of all crops) have been decoded.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from functools import partial
from typing import Protocol, TypeVar

import numpy as np
from anyio import to_thread

from proxy.cache import CachedImage
from proxy.everything.crops import CropJob, crop_plan, decoder_inputs
from proxy.everything.masks import MaskData, Workspace, finish_crop, merge_crops, process_batch
from proxy.everything.params import AmgParams
from proxy.everything.regions import postprocess_small_regions
from proxy.geometry import Size
from proxy.timings import Timings

# Decoder calls in flight per crop: one computing, one queued.
DECODER_WINDOW = 2
T = TypeVar("T")
R = TypeVar("R")
Progress = Callable[[int, int], None]


class MaskModel(Protocol):
    """The networks, as segment-everything needs them."""

    async def crop_embedding(self, job: CropJob) -> CachedImage:
        """The encoder's answer for one crop (its embedding and resized size)."""

    async def decode(
        self, embedding: np.ndarray, point_coords: np.ndarray, point_labels: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Prompts [P, 2, 2] and [P, 2] -> low-res logits [P, 4, 256, 256] and IoU [P, 4]."""


async def generate_masks(
    model: MaskModel,
    original_size: Size,
    params: AmgParams,
    image_side: int,
    timings: Timings,
    progress: Progress | None = None,
) -> MaskData:
    """Every mask upstream's generator would keep, in its order."""
    workspace = Workspace()
    crops = []
    jobs = crop_plan(original_size, params, image_side)
    total = sum(len(job.points) for job in jobs)
    done = 0
    if progress is not None:
        progress(done, total)
    for job in jobs:
        entry = await model.crop_embedding(job)

        async def decode(points: np.ndarray, job: CropJob = job, entry: CachedImage = entry):
            coords, labels = decoder_inputs(points, job.size, image_side)
            with timings.stage("decoder"):
                return await model.decode(entry.embedding, coords, labels)

        batches = []
        answers = windowed(list(job.batches(params.points_per_batch)), decode, DECODER_WINDOW)
        async with aclosing(answers):
            async for points, (low_res, iou) in answers:
                with timings.stage("postprocess"):
                    batches.append(
                        await to_thread.run_sync(
                            partial(
                                process_batch,
                                low_res,
                                iou,
                                points,
                                job.box,
                                original_size,
                                params,
                                image_side=image_side,
                                input_size=entry.input_size,
                                workspace=workspace,
                            )
                        )
                    )
                done += len(points)
                if progress is not None:
                    progress(done, total)
        crops.append(finish_crop(batches, job.box, params))
    with timings.stage("postprocess"):
        return await to_thread.run_sync(partial(merge_all, crops, params, original_size))


def merge_all(crops: Sequence[MaskData], params: AmgParams, size: Size) -> MaskData:
    """NMS across crops, then upstream's optional small-region clean-up."""
    data = merge_crops(crops, params, size)
    if params.min_mask_region_area > 0:
        data = postprocess_small_regions(
            data,
            params.min_mask_region_area,
            max(params.box_nms_thresh, params.crop_nms_thresh),
        )
    return data


async def windowed(
    items: list[T], call: Callable[[T], Awaitable[R]], window: int
) -> AsyncIterator[tuple[T, R]]:
    """`call` over items, in order, with at most `window` calls in flight at once.

    Closing the iterator early (an error, a cancelled request) cancels the calls in flight.
    """
    pending: deque[tuple[T, asyncio.Task[R]]] = deque()
    upcoming = iter(items)
    try:
        while True:
            while len(pending) < window:
                item = next(upcoming, None)
                if item is None:
                    break
                pending.append((item, asyncio.ensure_future(call(item))))
            if not pending:
                return
            item, task = pending.popleft()
            yield item, await task
    finally:
        for _, task in pending:
            task.cancel()
