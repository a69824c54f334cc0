"""The segmentation pipeline: image -> (cached) embedding -> batched decoder calls -> records.

No HTTP here: routes parse the request and hand over bytes and prompts. CPU-heavy steps
(decoding, resizing, post-processing) run in worker threads so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import aclosing, contextmanager
from functools import partial
from typing import TypeVar

import numpy as np
from anyio import to_thread

from proxy import amg, encodings, geometry, imaging, overlay, postprocess
from proxy.cache import CachedImage, EmbeddingCache
from proxy.metrics import ProxyMetrics
from proxy.problems import ProblemError
from proxy.prompts import Prompt, group_prompts_by_length, prompt_to_decoder_arrays
from proxy.triton_client import TritonGateway
from serving.settings import Settings

# Decoder calls in flight per crop in segment-everything: one computing, one queued.
DECODER_WINDOW = 2
T = TypeVar("T")
R = TypeVar("R")
SizeCheck = Callable[[tuple[int, int]], None]


class Timings:
    """Milliseconds per pipeline stage, reported back to the client."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.ms: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = (time.perf_counter() - started) * 1000
            self.ms[name] = round(self.ms.get(name, 0.0) + elapsed, 2)

    def report(self) -> dict[str, float]:
        return {**self.ms, "total": round((time.perf_counter() - self.started) * 1000, 2)}


def model_identity(settings: Settings) -> str:
    """What the cached embeddings depend on: the encoder and the checkpoint it came from."""
    manifest = settings.model_repository / settings.encoder_model / "1" / "export.json"
    try:
        checkpoint = json.loads(manifest.read_text())["checkpoint_sha256"]
    except (OSError, ValueError, KeyError):
        checkpoint = "unknown-checkpoint"
    return f"{settings.encoder_model}@{checkpoint}"


def image_id_for(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class SegmentationService:
    def __init__(
        self,
        settings: Settings,
        gateway: TritonGateway,
        cache: EmbeddingCache,
        metrics: ProxyMetrics,
    ) -> None:
        self.settings = settings
        self.gateway = gateway
        self.cache = cache
        self.metrics = metrics
        self.identity = model_identity(settings)

    # --- embeddings ------------------------------------------------------------------------

    async def embed(
        self,
        data: bytes | None,
        image_id: str | None,
        timings: Timings,
        validate: SizeCheck | None = None,
    ) -> tuple[str, CachedImage, bool]:
        """The embedding of an upload or of an earlier image_id; returns (id, entry, hit).

        `validate` sees the image size after decoding and before the encoder runs, so that
        bad prompts are rejected without spending an encoder call on them.
        """
        if data is not None:
            image_id = image_id_for(data)
        key = (self.identity, image_id)
        if data is None:
            entry = self.cache.get(key)
            if entry is None:
                self.metrics.cache_lookups.labels(result="miss").inc()
                raise ProblemError(
                    404,
                    "unknown_image_id",
                    f"image_id {image_id} is not (or no longer) cached; upload the file again",
                )
            hit = True
        else:
            entry, hit = await self.cache.get_or_compute(
                key, partial(self._encode, data, timings, validate)
            )
        self.metrics.cache_lookups.labels(result="hit" if hit else "miss").inc()
        self.metrics.cache_bytes.set(self.cache.used_bytes)
        self.metrics.cache_entries.set(len(self.cache))
        return image_id, entry, hit

    async def _encode(
        self, data: bytes, timings: Timings, validate: SizeCheck | None
    ) -> CachedImage:
        image = await self._decode_pixels(data, timings)
        if validate is not None:
            validate(image.shape[:2])
        return await self._encode_pixels(image, timings, source=data)

    async def _decode_pixels(self, data: bytes, timings: Timings) -> np.ndarray:
        with timings.stage("decode_image"):
            try:
                return await to_thread.run_sync(
                    partial(
                        imaging.decode_image,
                        data,
                        max_pixels=self.settings.max_image_pixels,
                        max_side=self.settings.max_image_side,
                    )
                )
            except imaging.ImageError as exc:
                raise ProblemError(exc.status, exc.code, str(exc)) from exc

    async def _encode_pixels(
        self, image: np.ndarray, timings: Timings, source: bytes = b""
    ) -> CachedImage:
        side = await self.gateway.image_side()
        if min(geometry.preprocess_shape(*image.shape[:2], side)) < 1:
            raise ProblemError(
                422,
                "degenerate_image",
                f"a {image.shape[1]}x{image.shape[0]} image would be less than one pixel "
                f"wide once its longest side is resized to {side}",
            )
        with timings.stage("preprocess"):
            resized = await to_thread.run_sync(geometry.resize_longest_side, image, side)
            padded = geometry.pad_to_square(resized, side)
        with timings.stage("encoder"):
            embedding = await self.gateway.encode(padded, resized.shape[:2])
        return CachedImage(embedding, image.shape[:2], resized.shape[:2], source=source)

    # --- prompts -------------------------------------------------------------------------

    async def segment(
        self,
        entry: CachedImage,
        prompts: list[Prompt],
        multimask_output: bool,
        output_format: encodings.OutputFormat,
        timings: Timings,
    ) -> list[list[dict]]:
        side = await self.gateway.image_side()
        wire = [prompt_to_decoder_arrays(p, entry.original_size, side) for p in prompts]
        low_res: list[np.ndarray] = [np.empty(0)] * len(prompts)
        scores: list[np.ndarray] = [np.empty(0)] * len(prompts)
        with timings.stage("decoder"):
            groups = list(group_prompts_by_length(wire).values())
            answers = await asyncio.gather(
                *(self._decode_group(entry, [wire[i] for i in members]) for members in groups)
            )
        for members, (masks, iou) in zip(groups, answers, strict=True):
            for row, index in enumerate(members):
                low_res[index], scores[index] = masks[row], iou[row]
        with timings.stage("postprocess"):
            return await to_thread.run_sync(
                partial(
                    self._records, entry, side, low_res, scores, multimask_output, output_format
                )
            )

    # --- segment everything ----------------------------------------------------------------

    async def segment_everything(
        self,
        image_id: str,
        entry: CachedImage,
        params: amg.AmgParams,
        output_format: encodings.OutputFormat,
        want_overlay: bool,
        timings: Timings,
    ) -> tuple[list[dict], bytes | None]:
        """Upstream `SamAutomaticMaskGenerator.generate` with Triton as the model.

        The whole-image crop reuses the cached embedding; other crops are encoded (and
        cached) as images of their own. Decoder calls for a crop are kept DECODER_WINDOW deep,
        so Triton computes the next batch while this process post-processes the last one.
        """
        side = await self.gateway.image_side()
        height, width = entry.original_size
        jobs = amg.crop_plan(entry.original_size, params, side)
        needs_pixels = want_overlay or any(job.box != (0, 0, width, height) for job in jobs)
        image = await self._decode_pixels(entry.source, timings) if needs_pixels else None
        workspace = amg.Workspace()
        crops = []
        for job in jobs:
            crop_entry = entry
            if job.box != (0, 0, width, height):
                crop_entry = await self._crop_embedding(image_id, job, image, timings)
            batches = []
            point_batches = list(job.batches(params.points_per_batch))
            answers = windowed(
                point_batches,
                partial(self._decode_points, crop_entry, job.size, side, timings),
                DECODER_WINDOW,
            )
            async with aclosing(answers):
                async for points, (low_res, iou) in answers:
                    with timings.stage("postprocess"):
                        batches.append(
                            await to_thread.run_sync(
                                partial(
                                    amg.process_batch,
                                    low_res,
                                    iou,
                                    points,
                                    job.box,
                                    entry.original_size,
                                    params,
                                    image_side=side,
                                    input_size=crop_entry.input_size,
                                    workspace=workspace,
                                )
                            )
                        )
            crops.append(amg.finish_crop(batches, job.box, params))
        with timings.stage("postprocess"):
            data = await to_thread.run_sync(
                partial(self._finish, crops, params, entry.original_size)
            )
            records = await to_thread.run_sync(amg.to_records, data, output_format)
        overlay = None
        if want_overlay:
            with timings.stage("overlay"):
                overlay = await to_thread.run_sync(render_overlay_png, image, data)
        return records, overlay

    @staticmethod
    def _finish(crops: list, params: amg.AmgParams, size: tuple[int, int]):
        data = amg.merge_crops(crops, params, size)
        if params.min_mask_region_area > 0:
            data = amg.postprocess_small_regions(
                data,
                params.min_mask_region_area,
                max(params.box_nms_thresh, params.crop_nms_thresh),
            )
        return data

    async def _crop_embedding(
        self, image_id: str, job: amg.CropJob, image: np.ndarray, timings: Timings
    ) -> CachedImage:
        """A crop is encoded as an image of its own, and cached under its own key."""
        x0, y0, x1, y1 = job.box
        key = (self.identity, f"{image_id}#crop={x0},{y0},{x1},{y1}")

        async def encode() -> CachedImage:
            return await self._encode_pixels(np.ascontiguousarray(job.crop(image)), timings)

        entry, hit = await self.cache.get_or_compute(key, encode)
        self.metrics.cache_lookups.labels(result="hit" if hit else "miss").inc()
        return entry

    async def _decode_points(
        self,
        entry: CachedImage,
        crop_size: tuple[int, int],
        side: int,
        timings: Timings,
        points: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        coords, labels = amg.decoder_inputs(points, crop_size, side)
        with timings.stage("decoder"):
            return await self.gateway.decode(entry.embedding, coords, labels)

    async def _decode_group(
        self, entry: CachedImage, wire: list[tuple[np.ndarray, np.ndarray]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Prompts with the same point count go in one call: no cross-prompt padding."""
        coords = np.stack([c for c, _ in wire])
        labels = np.stack([lab for _, lab in wire])
        return await self.gateway.decode(entry.embedding, coords, labels)

    @staticmethod
    def _records(
        entry: CachedImage,
        side: int,
        low_res: list[np.ndarray],
        scores: list[np.ndarray],
        multimask_output: bool,
        output_format: encodings.OutputFormat,
    ) -> list[list[dict]]:
        results = []
        for masks, iou in zip(low_res, scores, strict=True):
            chosen_masks, chosen_iou = postprocess.select_masks(
                masks[None], iou[None], multimask_output
            )
            logits = postprocess.postprocess_masks(
                chosen_masks[0], entry.input_size, entry.original_size, image_size=side
            )
            records = [
                mask_record(mask_logits, float(score), output_format)
                for mask_logits, score in zip(logits, chosen_iou[0], strict=True)
            ]
            records.sort(key=lambda record: record["predicted_iou"], reverse=True)
            results.append(records)
        return results


async def windowed(
    items: list[T], call: Callable[[T], Awaitable[R]], window: int
) -> AsyncIterator[tuple[T, R]]:
    """`call` over items, in order, with at most `window` calls in flight at once."""
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


class LazyMasks(Sequence[np.ndarray]):
    """The masks of a MaskData, decoded from their RLE one at a time on access."""

    def __init__(self, data: amg.MaskData) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index):  # type: ignore[override]
        return self.data.mask(index)


def render_overlay_png(image: np.ndarray, data: amg.MaskData) -> bytes:
    count = len(data)
    label = f"{count} object" + ("" if count == 1 else "s")
    areas = [amg.area_from_rle({"counts": counts}) for counts in data.rles]
    return overlay.encode_png(overlay.render_overlay(image, LazyMasks(data), label, areas))


def mask_record(
    logits: np.ndarray, predicted_iou: float, output_format: encodings.OutputFormat
) -> dict:
    mask = postprocess.threshold_masks(logits)
    stability = float(postprocess.stability_score(logits))
    return {
        "segmentation": encodings.encode_mask(mask, output_format),
        "predicted_iou": predicted_iou,
        # Upstream's score is NaN when no logit passes -offset; JSON has no NaN, and such a
        # mask (empty at every threshold) has no stability to speak of.
        "stability_score": stability if np.isfinite(stability) else 0.0,
        "area": int(mask.sum()),
        "bbox": [int(v) for v in postprocess.mask_to_box_xywh(mask)],
    }
