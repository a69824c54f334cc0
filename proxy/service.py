"""The segmentation service: image -> (cached) embedding -> decoder calls -> mask records.

No HTTP here: the routes parse a request and call these steps in order,

    image = await service.open_image(upload, image_id)    # decoded, or found in the cache
    prompts = await service.parse_prompts(raw, image)     # rejected before any inference
    embedded = await service.embed(image)                 # the encoder, unless cached
    results = await service.segment(embedded, prompts)    # the decoder, then the records

or `segment_everything(embedded, params)` instead of the last two, once
`check_everything_cost(params)` has passed and `admit_everything` has given it a place.

Memory is admitted before it is used (`proxy.admission`): the upload's bytes before it is
read, the decoder's peak from the header before decoding, then what the request's `Work`
holds per pixel; a request keeps its share in its `scope` until it is done. CPU-heavy steps
(decoding, resizing, post-processing) run in worker threads so that the event loop keeps
serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, Protocol

import numpy as np
from anyio import to_thread

from common.settings import Settings
from proxy import encodings, geometry, imaging, overlay, postprocess
from proxy.admission import Admission, Reservation
from proxy.allocator import release_free_memory
from proxy.cache import CachedImage, EmbeddingCache
from proxy.errors import DegenerateImage, PromptError, TooMuchWork, UnknownImageId, UnknownMaskId
from proxy.everything.crops import CropJob
from proxy.everything.masks import LazyMasks, MaskData, to_records
from proxy.everything.params import AmgParams
from proxy.everything.pipeline import Progress, generate_masks
from proxy.geometry import Size
from proxy.mask_store import MaskStore, StoredMask
from proxy.metrics import ProxyMetrics
from proxy.prompts import (
    Prompt,
    group_prompts_by_length,
    parse_prompts,
    prompt_to_decoder_arrays,
    stack_mask_inputs,
    stack_prompts,
)
from proxy.records import prompt_records
from proxy.timings import Timings


class ModelGateway(Protocol):
    """The networks behind the service: `proxy.triton_client.TritonGateway` in production."""

    async def image_side(self) -> int: ...

    async def encode(self, padded_image: np.ndarray, input_size: Size) -> np.ndarray: ...

    async def decode(
        self,
        embedding: np.ndarray,
        point_coords: np.ndarray,
        point_labels: np.ndarray,
        mask_input: np.ndarray | None = None,
        has_mask_input: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]: ...

    async def readiness(self) -> dict[str, bool]: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class OpenedImage:
    """An image whose size is known: decoded from an upload, or found in the cache."""

    image_id: str
    size: Size  # (height, width)
    cached: CachedImage | None  # the cache entry, when the encoder already ran
    pixels: np.ndarray | None = None  # HxWx3 uint8, when decoded by this request
    source: bytes = b""  # the uploaded file, kept with the embedding


@dataclass(frozen=True)
class EmbeddedImage:
    """An image with its embedding; `cache_hit` when this request did not run the encoder."""

    image_id: str
    entry: CachedImage
    cache_hit: bool
    pixels: np.ndarray | None = None

    @property
    def size(self) -> Size:
        return self.entry.original_size


@dataclass(frozen=True)
class EverythingResult:
    masks: MaskData
    records: list[dict[str, Any]]
    overlay_png: bytes | None


def model_identity(settings: Settings) -> str:
    """What the cached embeddings depend on: the encoder, the checkpoint it came from and the
    precision profile (a bf16 embedding is not an fp32 one)."""
    manifest = settings.model_repository / settings.encoder_model / "1" / "export.json"
    try:
        checkpoint = json.loads(manifest.read_text())["checkpoint_sha256"]
    except (OSError, ValueError, KeyError):
        checkpoint = "unknown-checkpoint"
    identity = f"{settings.encoder_model}@{checkpoint}"
    return identity if settings.precision == "fp32" else f"{identity}/{settings.precision}"


def image_id_for(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Memory while Pillow decodes an image into our RGB array: Pillow holds RGB as 4 bytes per
# pixel, the array 3 more, plus the codec's buffers (measured 9.1 for 12 and 40 MP JPEGs).
DECODE_PEAK_BYTES_PER_PIXEL = 10
# Freed decoder memory goes back to the system at once for images this large.
TRIM_AFTER_PIXELS = 4_000_000


class Work(Enum):
    """What a request does with its image, and the memory that takes, in bytes per pixel of
    the image, once it is decoded (measured in RELIABILITY.md)."""

    EMBED = 3  # the decoded pixels, until they are encoded
    PROMPTS = 8  # then one mask at a time: float logits (4), the mask (1), its encoding
    EVERYTHING = 10  # the pixels for crops and overlay (3), one mask's planes (5), the overlay


class SegmentationService:
    def __init__(
        self,
        settings: Settings,
        gateway: ModelGateway,
        cache: EmbeddingCache,
        metrics: ProxyMetrics,
        masks: MaskStore | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.settings = settings
        self.gateway = gateway
        self.cache = cache
        self.metrics = metrics
        self.masks = masks if masks is not None else MaskStore(settings.mask_cache_bytes)
        self.admission = admission or Admission(settings, metrics)
        self.identity = model_identity(settings)

    # --- images and embeddings ---------------------------------------------------------------

    async def admit_upload(self, nbytes: int, scope: AsyncExitStack) -> None:
        """Room for an upload of `nbytes`, held until the request is done."""
        await scope.enter_async_context(self.admission.image(nbytes))

    async def open_image(
        self,
        data: bytes | None,
        image_id: str | None,
        work: Work,
        timings: Timings,
        scope: AsyncExitStack,
    ) -> OpenedImage:
        """An upload (decoded unless its embedding is cached) or an earlier image_id, once the
        memory `work` takes on it is admitted."""
        if data is None:
            entry = await self.cache.lookup(self._key(image_id))
            if entry is None:
                self.metrics.cache_lookups.labels(result="miss").inc()
                raise UnknownImageId(
                    f"image_id {image_id} is not (or no longer) cached; upload the file again"
                )
        else:
            image_id = image_id_for(data)
            entry = await self.cache.lookup(self._key(image_id))
        if entry is not None:
            await self._admit(scope, work.value, entry.original_size)
            return OpenedImage(image_id, entry.original_size, entry)
        width, height = imaging.image_size(
            data, max_pixels=self.settings.max_image_pixels, max_side=self.settings.max_image_side
        )
        peak = max(DECODE_PEAK_BYTES_PER_PIXEL, work.value)
        reservation = await self._admit(scope, peak, (height, width))
        pixels = await self._decode_pixels(data, timings)
        reservation.shrink(work.value * height * width)
        return OpenedImage(image_id, pixels.shape[:2], None, pixels, data)

    async def _admit(self, scope: AsyncExitStack, bytes_per_pixel: int, size: Size) -> Reservation:
        height, width = size
        return await scope.enter_async_context(
            self.admission.image(bytes_per_pixel * height * width)
        )

    async def parse_prompts(self, raw: str, image: OpenedImage) -> list[Prompt]:
        """The request's prompts, validated against the image's size and the limits, with the
        previous masks their `mask_id`s name (kept here or, with Redis, by any replica)."""
        height, width = image.size
        prompts = parse_prompts(
            raw,
            width=width,
            height=height,
            max_prompts=self.settings.max_prompts,
            max_points=self.settings.max_points_per_prompt,
            coordinate_margin=self.settings.prompt_coordinate_margin * max(width, height),
        )
        return [
            replace(prompt, mask_input=await self._previous_mask(prompt.mask_id, image, index))
            if prompt.mask_id is not None
            else prompt
            for index, prompt in enumerate(prompts)
        ]

    async def _previous_mask(self, mask_id: str, image: OpenedImage, index: int) -> np.ndarray:
        where = f"prompts[{index}].mask_id"
        stored = await self.masks.lookup(mask_id)
        if stored is None or stored.image_key[0] != self.identity:
            raise UnknownMaskId(
                f"{where}: mask {mask_id} is not (or no longer) kept; prompt again without it"
            )
        if stored.image_key != self._key(image.image_id):
            raise PromptError(
                "mask_image_mismatch", f"mask {mask_id} belongs to another image", where
            )
        return stored.logits

    async def embed(self, image: OpenedImage, timings: Timings) -> EmbeddedImage:
        """The image's embedding: from the cache, or from one encoder call shared by every
        concurrent request for the same image."""
        if image.cached is not None:
            entry, hit = image.cached, True
        else:
            assert image.pixels is not None

            async def encode() -> CachedImage:
                return await self._encode_pixels(image.pixels, timings, image.source)

            entry, hit = await self.cache.get_or_compute(self._key(image.image_id), encode)
        self.metrics.cache_lookups.labels(result="hit" if hit else "miss").inc()
        self.metrics.cache_bytes.set(self.cache.used_bytes)
        self.metrics.cache_entries.set(len(self.cache))
        return EmbeddedImage(image.image_id, entry, hit, image.pixels)

    def _key(self, image_id: str) -> tuple[str, str]:
        return self.identity, image_id

    async def _decode_pixels(self, data: bytes, timings: Timings) -> np.ndarray:
        def decode() -> np.ndarray:
            pixels = imaging.decode_image(
                data,
                max_pixels=self.settings.max_image_pixels,
                max_side=self.settings.max_image_side,
            )
            # The decoder's buffers (~6 bytes a pixel) stay in glibc's arenas otherwise.
            if self.settings.trim_memory and pixels.shape[0] * pixels.shape[1] >= TRIM_AFTER_PIXELS:
                release_free_memory()
            return pixels

        with timings.stage("decode_image"):
            return await to_thread.run_sync(decode)

    async def _encode_pixels(
        self, image: np.ndarray, timings: Timings, source: bytes = b""
    ) -> CachedImage:
        side = await self.gateway.image_side()
        if min(geometry.preprocess_shape(*image.shape[:2], side)) < 1:
            raise DegenerateImage(
                f"a {image.shape[1]}x{image.shape[0]} image would be less than one pixel "
                f"wide once its longest side is resized to {side}"
            )
        with timings.stage("preprocess"):
            padded, input_size = await to_thread.run_sync(geometry.prepare_image, image, side)
        with timings.stage("encoder"):
            embedding = await self.gateway.encode(padded, input_size)
        return CachedImage(embedding, image.shape[:2], input_size, source=source)

    # --- prompts -------------------------------------------------------------------------------

    async def segment(
        self,
        image: EmbeddedImage,
        prompts: list[Prompt],
        multimask_output: bool,
        output_format: encodings.OutputFormat,
        timings: Timings,
    ) -> list[list[dict[str, Any]]]:
        """One list of records per prompt, in request order.

        Prompts with the same point count share a decoder call; different counts go in
        separate calls, run concurrently (padding a prompt to another's length changes it).
        """
        entry = image.entry
        side = await self.gateway.image_side()
        wire = [prompt_to_decoder_arrays(p, entry.original_size, side) for p in prompts]
        groups = list(group_prompts_by_length(wire).values())

        async def decode(members: list[int]) -> tuple[np.ndarray, np.ndarray]:
            coords, labels = stack_prompts(wire, members)
            mask_input, has_mask_input = stack_mask_inputs(prompts, members)
            return await self.gateway.decode(
                entry.embedding, coords, labels, mask_input, has_mask_input
            )

        with timings.stage("decoder"):
            answers = await asyncio.gather(*(decode(members) for members in groups))
        answer_of: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for members, (masks, iou) in zip(groups, answers, strict=True):
            for row, index in enumerate(members):
                answer_of[index] = masks[row], iou[row]
        image_key = self._key(image.image_id)

        def records() -> tuple[list[list[dict[str, Any]]], list[StoredMask]]:
            results, kept = [], []
            for index in range(len(prompts)):
                low_res, iou = answer_of[index]
                # Each mask's logits, kept under its mask_id for refinement.
                chosen, _ = postprocess.select_masks(low_res[None], iou[None], multimask_output)
                masks = [StoredMask.of(image_key, logits) for logits in chosen[0]]
                kept += masks
                results.append(
                    prompt_records(
                        low_res,
                        iou,
                        entry.input_size,
                        entry.original_size,
                        side,
                        multimask_output,
                        output_format,
                        [mask.mask_id for mask in masks],
                    )
                )
            return results, kept

        with timings.stage("postprocess"):
            results, kept = await to_thread.run_sync(records)
        await self.masks.keep(kept)  # shared before the answer names them
        return results

    # --- segment everything -------------------------------------------------------------------

    async def admit_everything(self, scope: AsyncExitStack) -> None:
        """A place among the segment-everything runs in flight, held until the request ends."""
        await scope.enter_async_context(self.admission.everything_run())

    def check_everything_cost(self, params: AmgParams) -> None:
        """Refuse a run whose decoder prompts (grid points x crops) are over the limit."""
        prompts, limit = params.decoder_prompts(), self.settings.max_everything_prompts
        if prompts > limit:
            raise TooMuchWork(
                f"these settings ask the decoder for {prompts} prompts (grid points x crops); "
                f"the limit is {limit}: lower points_per_side or crop_n_layers",
                prompts=prompts,
                limit=limit,
            )

    async def segment_everything(
        self,
        image: EmbeddedImage,
        params: AmgParams,
        output_format: encodings.OutputFormat,
        want_overlay: bool,
        timings: Timings,
        progress: Progress | None = None,
    ) -> EverythingResult:
        """Upstream `SamAutomaticMaskGenerator.generate` with Triton as the model.

        The whole-image crop reuses the image's embedding; other crops are encoded (and
        cached) as images of their own. `progress(done, total)` counts grid points decoded.
        """
        self.check_everything_cost(params)
        side = await self.gateway.image_side()
        pixels = image.pixels
        if pixels is None and (want_overlay or params.crop_n_layers > 0):
            # Decoded again from the kept upload: room for it came with Work.EVERYTHING.
            pixels = await self._decode_pixels(image.entry.source, timings)
        model = _CropModel(self, image, pixels, timings)
        data = await generate_masks(model, image.size, params, side, timings, progress)
        with timings.stage("postprocess"):
            records = await to_thread.run_sync(to_records, data, output_format)
        overlay_png = None
        if want_overlay:
            with timings.stage("overlay"):
                overlay_png = await to_thread.run_sync(
                    overlay.overlay_png, pixels, LazyMasks(data), data.areas()
                )
        return EverythingResult(data, records, overlay_png)


class _CropModel:
    """The service's encoder (through the cache) and decoder, as the pipeline's `MaskModel`."""

    def __init__(
        self,
        service: SegmentationService,
        image: EmbeddedImage,
        pixels: np.ndarray | None,
        timings: Timings,
    ) -> None:
        self.service = service
        self.image = image
        self.pixels = pixels
        self.timings = timings

    async def crop_embedding(self, job: CropJob) -> CachedImage:
        height, width = self.image.size
        if job.box == (0, 0, width, height):
            return self.image.entry
        assert self.pixels is not None, "crops need the decoded image"
        x0, y0, x1, y1 = job.box
        key = self.service._key(f"{self.image.image_id}#crop={x0},{y0},{x1},{y1}")
        crop = np.ascontiguousarray(job.crop(self.pixels))

        async def encode() -> CachedImage:
            return await self.service._encode_pixels(crop, self.timings)

        entry, hit = await self.service.cache.get_or_compute(key, encode)
        self.service.metrics.cache_lookups.labels(result="hit" if hit else "miss").inc()
        return entry

    async def decode(
        self, embedding: np.ndarray, point_coords: np.ndarray, point_labels: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        return await self.service.gateway.decode(embedding, point_coords, point_labels)
