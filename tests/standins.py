"""Stand-ins for Triton behind the real service, for tests that need no server.

`StandInGateway` implements the service's `ModelGateway` with plain functions, so a test drives
the production code path (`SegmentationService`, the segment-everything loop, the routes) with
a synthetic or in-process model.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np

from common import contract
from common.settings import Settings
from proxy.cache import EmbeddingCache
from proxy.encodings import OutputFormat
from proxy.everything.params import AmgParams
from proxy.metrics import ProxyMetrics
from proxy.service import EverythingResult, OpenedImage, SegmentationService
from proxy.timings import Timings

Encode = Callable[[np.ndarray, tuple[int, int]], np.ndarray]
Decode = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def zeros_embedding(padded: np.ndarray, input_size: tuple[int, int]) -> np.ndarray:
    return np.zeros(contract.EMBEDDING_SHAPE, dtype=np.float32)


def random_decoder(seed: int = 0) -> Decode:
    """Decoder-shaped random logits and IoUs: shapes and dtypes as Triton returns them."""
    rng = np.random.default_rng(seed)

    def decode(embedding, coords, labels):
        side = contract.LOW_RES_SIDE
        prompts = len(coords)
        logits = rng.normal(0, 4, (prompts, contract.MASK_TOKENS, side, side))
        iou = rng.random((prompts, contract.MASK_TOKENS))
        return logits.astype(np.float32), iou.astype(np.float32)

    return decode


class StandInGateway:
    """The service's `ModelGateway`, answering with `encode` and `decode` in process.

    `fail` (an exception) makes every model call raise it, as a failing Triton would; the
    calls are counted per model, like Triton's own statistics, and the mask inputs of each
    decoder call are kept.
    """

    def __init__(
        self,
        encode: Encode = zeros_embedding,
        decode: Decode | None = None,
        image_side: int = contract.DEFAULT_IMAGE_SIDE,
    ) -> None:
        self._encode = encode
        self._decode = decode or random_decoder()
        self._image_side = image_side
        self.fail: BaseException | None = None
        self.calls = {"encode": 0, "decode": 0}
        self.mask_inputs: list[tuple[np.ndarray, np.ndarray] | None] = []  # per decode call

    async def image_side(self) -> int:
        return self._image_side

    async def encode(self, padded_image: np.ndarray, input_size: tuple[int, int]) -> np.ndarray:
        self.calls["encode"] += 1
        if self.fail is not None:
            raise self.fail
        await asyncio.sleep(0)
        return self._encode(padded_image, input_size)

    async def decode(
        self,
        embedding: np.ndarray,
        point_coords: np.ndarray,
        point_labels: np.ndarray,
        mask_input: np.ndarray | None = None,
        has_mask_input: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        self.calls["decode"] += 1
        self.mask_inputs.append(None if mask_input is None else (mask_input, has_mask_input))
        if self.fail is not None:
            raise self.fail
        await asyncio.sleep(0)
        return self._decode(embedding, point_coords, point_labels)

    async def readiness(self) -> dict[str, bool]:
        ready = self.fail is None
        return {"server": ready, contract.ENCODER_MODEL: ready, contract.DECODER_MODEL: ready}

    async def close(self) -> None:
        pass


def service_with(gateway: StandInGateway, settings: Settings | None = None) -> SegmentationService:
    settings = settings or Settings()
    return SegmentationService(
        settings, gateway, EmbeddingCache(settings.embedding_cache_bytes), ProxyMetrics()
    )


def segment_everything(
    service: SegmentationService,
    pixels: np.ndarray,
    params: AmgParams,
    output_format: OutputFormat = OutputFormat.RLE,
    want_overlay: bool = False,
) -> EverythingResult:
    """The service's segment-everything on `pixels`, as if just uploaded and decoded."""

    async def run() -> EverythingResult:
        opened = OpenedImage("stand-in", pixels.shape[:2], None, pixels)
        image = await service.embed(opened, Timings())
        return await service.segment_everything(
            image, params, output_format, want_overlay, Timings()
        )

    return asyncio.run(run())
