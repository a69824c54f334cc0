"""The segmentation pipeline: image -> (cached) embedding -> batched decoder calls -> records.

No HTTP here: routes parse the request and hand over bytes and prompts. CPU-heavy steps
(decoding, resizing, post-processing) run in worker threads so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import numpy as np
from anyio import to_thread

from proxy import encodings, geometry, imaging, postprocess
from proxy.cache import CachedImage, EmbeddingCache
from proxy.metrics import ProxyMetrics
from proxy.problems import ProblemError
from proxy.prompts import Prompt, group_prompts_by_length, prompt_to_decoder_arrays
from proxy.triton_client import TritonGateway
from serving.settings import Settings

LOW_RES_SIDE = 256
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
            with timings.stage("cache_lookup_and_encode"):
                entry, hit = await self.cache.get_or_compute(
                    key, partial(self._encode, data, timings, validate)
                )
            if hit:
                timings.ms.pop("cache_lookup_and_encode", None)
        self.metrics.cache_lookups.labels(result="hit" if hit else "miss").inc()
        self.metrics.cache_bytes.set(self.cache.used_bytes)
        self.metrics.cache_entries.set(len(self.cache))
        return image_id, entry, hit

    async def _encode(
        self, data: bytes, timings: Timings, validate: SizeCheck | None
    ) -> CachedImage:
        with timings.stage("decode_image"):
            try:
                image = await to_thread.run_sync(
                    partial(
                        imaging.decode_image,
                        data,
                        max_pixels=self.settings.max_image_pixels,
                        max_side=self.settings.max_image_side,
                    )
                )
            except imaging.ImageError as exc:
                raise ProblemError(exc.status, exc.code, str(exc)) from exc
        if validate is not None:
            validate(image.shape[:2])
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
        return CachedImage(embedding, image.shape[:2], resized.shape[:2], source=data)

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

    async def _decode_group(
        self, entry: CachedImage, wire: list[tuple[np.ndarray, np.ndarray]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Prompts with the same point count go in one call: no cross-prompt padding."""
        coords = np.stack([c for c, _ in wire])
        labels = np.stack([lab for _, lab in wire])
        no_mask = np.zeros((1, 1, LOW_RES_SIDE, LOW_RES_SIDE), dtype=np.float32)
        has_mask = np.zeros(len(wire), dtype=np.float32)
        return await self.gateway.decode(entry.embedding, coords, labels, no_mask, has_mask)

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
