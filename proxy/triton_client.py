"""The proxy's only door to Triton: non-blocking HTTP calls, each with a deadline.

Failures are classified here from tritonclient's exception types and Triton's HTTP status
codes (never its wording) into the domain errors of `proxy.errors`: Triton unreachable, not
ready or refusing work (503: its queue is full or a model is unavailable) is
`TritonUnavailable`; a missed deadline `TritonTimeout`; any other error `TritonFailed`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TypeVar

import aiohttp
import numpy as np
from tritonclient.http import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from common import contract
from common.settings import Settings
from proxy.endpoints import EndpointPool
from proxy.errors import ServiceError, TritonFailed, TritonTimeout, TritonUnavailable
from proxy.geometry import Size
from proxy.metrics import ProxyMetrics

T = TypeVar("T")

# aiohttp asks for gzip by default and Triton obliges: compressing a 64 MB batch of logits took
# Triton ~2.5 s (as long as the inference) and the 4 MB embedding ~150 ms. Tensors on a local
# link travel uncompressed.
UNCOMPRESSED = {"Accept-Encoding": "identity"}
# Without previous masks, one unused mask input (M = 1) stands for all prompts, which also
# lets the decoder share its per-image work between them.
NO_MASK_INPUT = np.zeros((1, 1, 1, contract.LOW_RES_SIDE, contract.LOW_RES_SIDE), dtype=np.float32)
MASK_UNUSED = np.zeros((1, 1), dtype=np.float32)
# Triton's HTTP statuses that mean "not now": UNAVAILABLE (queue full, model not ready) and
# the rate-limit status a gateway in front of it may use.
RETRY_LATER_STATUSES = frozenset({"429", "503"})


def _input(name: str, array: np.ndarray) -> InferInput:
    tensor = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(np.ascontiguousarray(array), binary_data=True)
    return tensor


def classify(model: str, error: BaseException, timeout_s: float) -> ServiceError:
    """The domain error for a failed Triton call (`error` as the client raised it)."""
    if isinstance(error, TimeoutError):
        return TritonTimeout(f"{model} did not answer within {timeout_s:g} s")
    if isinstance(error, aiohttp.ClientError | OSError):
        return TritonUnavailable(f"Triton is unreachable: {error}")
    if isinstance(error, InferenceServerException):
        message = error.message() or str(error)
        if error.status() in RETRY_LATER_STATUSES:
            return TritonUnavailable(f"{model} is unavailable or overloaded: {message}")
        return TritonFailed(f"{model} failed: {message}", triton_status=error.status())
    return TritonFailed(f"{model} failed: {type(error).__name__}: {error}")


OUTCOMES = {TritonUnavailable: "unavailable", TritonTimeout: "timeout", TritonFailed: "error"}


class TritonGateway:
    def __init__(self, settings: Settings, metrics: ProxyMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        # One Triton or several: each call goes to a healthy endpoint (proxy/endpoints.py).
        self.client = EndpointPool(
            settings.triton_http_endpoints,
            settings.triton_timeout_s,
            settings.triton_health_interval_s,
            metrics,
        )
        self._image_side: int | None = None

    async def close(self) -> None:
        await self.client.close()

    async def _call(self, model: str, action: Awaitable[T]) -> T:
        started = time.perf_counter()
        outcome = "ok"
        try:
            return await asyncio.wait_for(action, timeout=self.settings.triton_timeout_s)
        except (TimeoutError, aiohttp.ClientError, OSError, InferenceServerException) as exc:
            error = classify(model, exc, self.settings.triton_timeout_s)
            outcome = OUTCOMES[type(error)]
            raise error from exc
        finally:
            self.metrics.triton_latency.labels(model=model, outcome=outcome).observe(
                time.perf_counter() - started
            )

    async def image_side(self) -> int:
        """The encoder's square input side, read from Triton's model metadata."""
        if self._image_side is None:
            model = self.settings.encoder_model
            metadata = await self._call(model, self.client.get_model_metadata(model))
            images = next(t for t in metadata["inputs"] if t["name"] == contract.IMAGES)
            self._image_side = int(images["shape"][-2])
        return self._image_side

    async def encode(self, padded_image: np.ndarray, input_size: Size) -> np.ndarray:
        """[S, S, 3] uint8 padded image -> [256, 64, 64] float32 embedding."""
        model = self.settings.encoder_model
        inputs = [
            _input(contract.IMAGES, padded_image[None]),
            _input(contract.INPUT_SIZE, np.array([input_size], dtype=np.int32)),
        ]
        outputs = [InferRequestedOutput(contract.IMAGE_EMBEDDINGS, binary_data=True)]
        result = await self._call(
            model, self.client.infer(model, inputs, outputs=outputs, headers=UNCOMPRESSED)
        )
        return result.as_numpy(contract.IMAGE_EMBEDDINGS)[0]

    async def decode(
        self,
        embedding: np.ndarray,
        point_coords: np.ndarray,
        point_labels: np.ndarray,
        mask_input: np.ndarray | None = None,
        has_mask_input: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One image's prompts [P, N] -> low-res logits [P, 4, 256, 256] and IoU [P, 4].

        `mask_input` [P, 1, 256, 256] and `has_mask_input` [P]: previous masks, where used.
        """
        model = self.settings.decoder_model
        if mask_input is None or has_mask_input is None:
            masks, used = NO_MASK_INPUT, MASK_UNUSED
        else:
            masks = mask_input[None].astype(np.float32, copy=False)
            used = has_mask_input[None].astype(np.float32, copy=False)
        inputs = [
            _input(contract.IMAGE_EMBEDDINGS, embedding[None].astype(np.float32, copy=False)),
            _input(contract.POINT_COORDS, point_coords[None].astype(np.float32, copy=False)),
            _input(contract.POINT_LABELS, point_labels[None].astype(np.float32, copy=False)),
            _input(contract.MASK_INPUT, masks),
            _input(contract.HAS_MASK_INPUT, used),
        ]
        outputs = [
            InferRequestedOutput(name, binary_data=True) for name in contract.DECODER_OUTPUTS
        ]
        result = await self._call(
            model, self.client.infer(model, inputs, outputs=outputs, headers=UNCOMPRESSED)
        )
        return (
            result.as_numpy(contract.LOW_RES_MASKS)[0],
            result.as_numpy(contract.IOU_PREDICTIONS)[0],
        )

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
