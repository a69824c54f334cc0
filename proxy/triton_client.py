"""The proxy's only door to Triton: non-blocking HTTP calls, each with a deadline.

Failures are classified here from tritonclient's exception types and Triton's HTTP status
codes (never its wording) into the domain errors of `proxy.errors`: Triton unreachable, not
ready or refusing work (503: its queue is full or a model is unavailable) is
`TritonUnavailable`; a missed deadline `TritonTimeout`; any other error `TritonFailed`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

import aiohttp
import numpy as np
from anyio import to_thread
from tritonclient.http import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from common import contract
from common.settings import Settings
from proxy.endpoints import Endpoint, EndpointPool
from proxy.errors import ServiceError, TritonFailed, TritonTimeout, TritonUnavailable
from proxy.geometry import Size
from proxy.metrics import ProxyMetrics
from proxy.shm_slots import Slot, SlotPool, is_orphan

log = logging.getLogger("proxy.triton")

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


def _shared_output(
    name: str, slot: Slot, offset: int, shape: tuple[int, ...]
) -> InferRequestedOutput:
    """An output Triton writes into `slot` at `offset` (float32 of `shape`)."""
    tensor = InferRequestedOutput(name)
    tensor.set_shared_memory(slot.name, int(np.prod(shape)) * 4, offset)
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


@dataclass
class Lease:
    """The slot one decoder call holds, if any; None once it may no longer be reused."""

    slot: Slot | None


class SharedMemory:
    """This proxy's slots and which endpoints have them registered (proxy/shm_slots.py).

    An endpoint is unknown until its first call registers the slots: Triton either maps them
    (same host) or answers an error (it cannot open them), and is then sent HTTP for good.
    `forget` makes an endpoint unknown again, for a Triton that restarted.
    """

    def __init__(self, pool: SlotPool) -> None:
        self.pool = pool
        self.registered: dict[str, bool] = {}
        self.locks: dict[str, asyncio.Lock] = {}

    async def usable(self, endpoint: Endpoint) -> bool:
        address = endpoint.address
        if address not in self.registered:
            async with self.locks.setdefault(address, asyncio.Lock()):
                if address not in self.registered:
                    registered = await self._register(endpoint)
                    if registered is None:  # Triton was busy: ask again next call
                        return False
                    self.registered[address] = registered
        return self.registered[address]

    def forget(self, endpoint: Endpoint) -> None:
        self.registered.pop(endpoint.address, None)

    async def _register(self, endpoint: Endpoint) -> bool | None:
        """Register every slot (after dropping stale registrations); False if Triton refuses,
        None if it is too busy to say.

        Connection failures propagate: they say nothing about shared memory.
        """
        client = endpoint.client
        ours = {slot.name for slot in self.pool.slots}
        try:
            for region in await client.get_system_shared_memory_status():
                name = region["name"]
                if is_orphan(name) or name in ours:
                    await client.unregister_system_shared_memory(name)
            for slot in self.pool.slots:
                await client.register_system_shared_memory(slot.name, slot.key, slot.byte_size)
        except InferenceServerException as error:
            if error.status() in RETRY_LATER_STATUSES:
                return None
            log.info(
                "Triton at %s cannot map this proxy's shared memory (%s): answers come over HTTP",
                endpoint.address,
                error.message() or error,
            )
            return False
        try:
            self.pool.allocate()
        except OSError as error:
            log.warning("no room for the shared memory slots (%s): answers come over HTTP", error)
            for slot in self.pool.slots:
                await client.unregister_system_shared_memory(slot.name)
            return False
        log.info("Triton at %s reads and writes this proxy's shared memory", endpoint.address)
        return True

    async def close(self, endpoints: list[Endpoint]) -> None:
        for endpoint in endpoints:
            if self.registered.get(endpoint.address):
                for slot in self.pool.slots:
                    try:
                        await endpoint.client.unregister_system_shared_memory(slot.name)
                    except (InferenceServerException, aiohttp.ClientError, OSError):
                        break  # Triton is gone, and its registrations with it
        self.pool.close()


def _shared_memory(settings: Settings) -> SharedMemory | None:
    """The slots the settings ask for, or None (HTTP only) where none can be made."""
    if not settings.triton_shared_memory_slots:
        return None
    try:
        pool = SlotPool(settings.triton_shared_memory_slots, settings.triton_shared_memory_prompts)
    except OSError as error:  # no /dev/shm, or a read-only one
        log.warning("no shared memory slots (%s): the decoder answers over HTTP", error)
        return None
    return SharedMemory(pool)


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
        self.shared_memory = _shared_memory(settings)

    async def close(self) -> None:
        if self.shared_memory is not None:
            await self.shared_memory.close(self.client.endpoints())
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
        if mask_input is None or has_mask_input is None:
            masks, used = NO_MASK_INPUT, MASK_UNUSED
        else:
            masks = mask_input[None].astype(np.float32, copy=False)
            used = has_mask_input[None].astype(np.float32, copy=False)
        arrays = {
            contract.IMAGE_EMBEDDINGS: embedding[None].astype(np.float32, copy=False),
            contract.POINT_COORDS: point_coords[None].astype(np.float32, copy=False),
            contract.POINT_LABELS: point_labels[None].astype(np.float32, copy=False),
            contract.MASK_INPUT: masks,
            contract.HAS_MASK_INPUT: used,
        }
        inputs = [_input(name, array) for name, array in arrays.items()]
        prompts = len(point_coords)
        model = self.settings.decoder_model
        pool = self.shared_memory.pool if self.shared_memory is not None else None
        lease = Lease(pool.acquire(prompts) if pool is not None else None)
        try:
            return await self._call(
                model,
                self.client.dispatch(
                    lambda endpoint: self._decode_at(endpoint, inputs, prompts, lease)
                ),
            )
        finally:
            if lease.slot is not None and pool is not None:
                pool.release(lease.slot)

    async def _decode_at(
        self, endpoint: Endpoint, inputs: list[InferInput], prompts: int, lease: Lease
    ) -> tuple[np.ndarray, np.ndarray]:
        """Through the leased slot where the endpoint has it registered, else over HTTP.

        Triton refuses a call naming a region it does not know (it restarted): that call is
        repeated over HTTP and the endpoint registers again before its next call. A call that
        ends without Triton's answer (a dropped connection, a deadline, a cancelled request)
        may still be written into its slot later, so the slot is never used again.
        """
        shared = self.shared_memory
        slot = lease.slot
        if slot is not None and shared is not None and await shared.usable(endpoint):
            try:
                answer = await self._decode_shared(endpoint, inputs, prompts, slot)
            except InferenceServerException as error:  # Triton answered: the slot is free
                if error.status() in RETRY_LATER_STATUSES:
                    raise
                shared.forget(endpoint)
                log.warning("decoder call through shared memory failed (%s): over HTTP", error)
            except BaseException:  # no answer: Triton may still write into the slot
                lease.slot = None
                raise
            else:
                self.metrics.tensor_transport.labels(transport="shared_memory").inc()
                return answer
        self.metrics.tensor_transport.labels(transport="http").inc()
        return await self._decode_http(endpoint, inputs)

    async def _decode_http(
        self, endpoint: Endpoint, inputs: list[InferInput]
    ) -> tuple[np.ndarray, np.ndarray]:
        outputs = [
            InferRequestedOutput(name, binary_data=True) for name in contract.DECODER_OUTPUTS
        ]
        result = await endpoint.client.infer(
            self.settings.decoder_model, inputs, outputs=outputs, headers=UNCOMPRESSED
        )
        return (
            result.as_numpy(contract.LOW_RES_MASKS)[0],
            result.as_numpy(contract.IOU_PREDICTIONS)[0],
        )

    async def _decode_shared(
        self, endpoint: Endpoint, inputs: list[InferInput], prompts: int, slot: Slot
    ) -> tuple[np.ndarray, np.ndarray]:
        """The inputs over HTTP, both outputs written by Triton into `slot`."""
        logits_shape = (prompts, contract.MASK_TOKENS, contract.LOW_RES_SIDE, contract.LOW_RES_SIDE)
        iou_shape = (prompts, contract.MASK_TOKENS)
        outputs = [
            _shared_output(contract.LOW_RES_MASKS, slot, slot.logits_offset, logits_shape),
            _shared_output(contract.IOU_PREDICTIONS, slot, slot.iou_offset, iou_shape),
        ]
        await endpoint.client.infer(
            self.settings.decoder_model, inputs, outputs=outputs, headers=UNCOMPRESSED
        )

        def read() -> tuple[np.ndarray, np.ndarray]:
            return slot.read(slot.logits_offset, logits_shape), slot.read(
                slot.iou_offset, iou_shape
            )

        # A 64-prompt call's logits are 64 MB: copy them off the event loop.
        return await to_thread.run_sync(read)

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
