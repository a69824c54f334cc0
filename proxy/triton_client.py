"""The proxy's only door to Triton: non-blocking HTTP calls with deadlines and one error map.

Triton's failures become `ProblemError`s here and nowhere else: unreachable or overloaded
(queue full) is 503 with Retry-After, a missed deadline is 504, anything else 502.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TypeVar

import aiohttp
import numpy as np
import tritonclient.http.aio as triton_http
from tritonclient.http import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from proxy.metrics import ProxyMetrics
from proxy.problems import ProblemError
from serving.settings import Settings

T = TypeVar("T")

# aiohttp asks for gzip by default and Triton obliges: compressing a 64 MB batch of logits took
# Triton ~2.5 s (as long as the inference) and the 4 MB embedding ~150 ms. Tensors on a local
# link travel uncompressed.
UNCOMPRESSED = {"Accept-Encoding": "identity"}
LOW_RES_SIDE = 256  # the decoder's mask logits, and its mask input
# The proxy sends no previous masks: one unused mask input (M = 1) stands for all prompts,
# which also lets the decoder share its per-image work between them.
NO_MASK_INPUT = np.zeros((1, 1, 1, LOW_RES_SIDE, LOW_RES_SIDE), dtype=np.float32)
MASK_UNUSED = np.zeros((1, 1), dtype=np.float32)


def _input(name: str, array: np.ndarray) -> InferInput:
    tensor = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(np.ascontiguousarray(array), binary_data=True)
    return tensor


class TritonGateway:
    def __init__(self, settings: Settings, metrics: ProxyMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.client = triton_http.InferenceServerClient(
            settings.triton_http_url, conn_timeout=settings.triton_timeout_s
        )
        self._image_side: int | None = None

    async def close(self) -> None:
        await self.client.close()

    async def _call(self, model: str, action: Awaitable[T]) -> T:
        started = time.perf_counter()
        outcome = "ok"
        try:
            return await asyncio.wait_for(action, timeout=self.settings.triton_timeout_s)
        except TimeoutError as exc:
            outcome = "timeout"
            raise ProblemError(
                504,
                "triton_timeout",
                f"{model} did not answer within {self.settings.triton_timeout_s:g} s",
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            outcome = "unavailable"
            raise self._unavailable(f"Triton is unreachable: {exc}") from exc
        except InferenceServerException as exc:
            message = exc.message() or str(exc)
            if exc.status() in ("503", "429") or "queue" in message.lower():
                outcome = "overloaded"
                raise self._unavailable(f"{model} is overloaded: {message}") from exc
            if "unavailable" in message.lower() or "not ready" in message.lower():
                outcome = "unavailable"
                raise self._unavailable(f"{model} is not available: {message}") from exc
            outcome = "error"
            raise ProblemError(502, "triton_error", f"{model} failed: {message}") from exc
        finally:
            self.metrics.triton_latency.labels(model=model, outcome=outcome).observe(
                time.perf_counter() - started
            )

    def _unavailable(self, detail: str) -> ProblemError:
        return ProblemError(
            503,
            "triton_unavailable",
            detail,
            headers={"Retry-After": str(self.settings.triton_retry_after_s)},
        )

    async def image_side(self) -> int:
        """The encoder's square input side (1024), read from Triton's model metadata."""
        if self._image_side is None:
            model = self.settings.encoder_model
            metadata = await self._call(model, self.client.get_model_metadata(model))
            images = next(t for t in metadata["inputs"] if t["name"] == "images")
            self._image_side = int(images["shape"][-2])
        return self._image_side

    async def encode(self, padded_image: np.ndarray, input_size: tuple[int, int]) -> np.ndarray:
        """[S, S, 3] uint8 padded image -> [256, 64, 64] float32 embedding."""
        model = self.settings.encoder_model
        inputs = [
            _input("images", padded_image[None]),
            _input("input_size", np.array([input_size], dtype=np.int32)),
        ]
        outputs = [InferRequestedOutput("image_embeddings", binary_data=True)]
        result = await self._call(
            model, self.client.infer(model, inputs, outputs=outputs, headers=UNCOMPRESSED)
        )
        return result.as_numpy("image_embeddings")[0]

    async def decode(
        self,
        embedding: np.ndarray,
        point_coords: np.ndarray,
        point_labels: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One image's prompts [P, N] -> low-res logits [P, 4, 256, 256] and IoU [P, 4]."""
        model = self.settings.decoder_model
        inputs = [
            _input("image_embeddings", embedding[None].astype(np.float32, copy=False)),
            _input("point_coords", point_coords[None].astype(np.float32, copy=False)),
            _input("point_labels", point_labels[None].astype(np.float32, copy=False)),
            _input("mask_input", NO_MASK_INPUT),
            _input("has_mask_input", MASK_UNUSED),
        ]
        outputs = [
            InferRequestedOutput("low_res_masks", binary_data=True),
            InferRequestedOutput("iou_predictions", binary_data=True),
        ]
        result = await self._call(
            model, self.client.infer(model, inputs, outputs=outputs, headers=UNCOMPRESSED)
        )
        return result.as_numpy("low_res_masks")[0], result.as_numpy("iou_predictions")[0]

    async def readiness(self) -> dict[str, bool]:
        """Per-component readiness; never raises."""
        state = {
            "server": False,
            self.settings.encoder_model: False,
            self.settings.decoder_model: False,
        }
        try:
            state["server"] = await asyncio.wait_for(self.client.is_server_ready(), 5)
            for model in (self.settings.encoder_model, self.settings.decoder_model):
                state[model] = await asyncio.wait_for(self.client.is_model_ready(model), 5)
        except (TimeoutError, aiohttp.ClientError, OSError, InferenceServerException):
            pass
        return state
