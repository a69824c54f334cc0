"""The shared tier of the embedding cache: Redis, so that every proxy replica knows every image.

Set `REDIS_URL` and each proxy keeps its local LRU (`proxy.cache.EmbeddingCache`) in front of
Redis: a local miss asks Redis before running the encoder, and a new embedding is written to
both. An entry is stored exactly (the float32 embedding's bytes and shape, the image and
resized sizes, and the uploaded file that segment-everything needs by `image_id`), so an
embedding read back gives the same masks as a fresh one. Entries expire `REDIS_TTL_S` after
their last read or write; Redis's own memory policy (`maxmemory` with `allkeys-lru`) bounds
the total.

Redis is an optimisation, never a dependency: every call has a deadline (`REDIS_TIMEOUT_S`),
and a failure (unreachable, timed out, an unreadable entry) is counted in
`proxy_shared_cache_errors_total`, logged, and answered as a miss, so the request goes on with
the local cache and the encoder. After a failure Redis is left alone for `BACKOFF_S`, so an
outage costs one timeout per episode rather than one per request.

The same tier keeps the masks that `mask_id`s name (`proxy.mask_store`), so refinement works on
any replica too. A mask is stored under its id, which is the hash of its image's key and its
logits; an entry read back must hash to the id it was stored under, so a damaged or foreign
entry is unreadable (a miss), never another image's mask.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import numpy as np
import redis.asyncio as redis
from prometheus_client import Counter
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from proxy.cache import CachedImage, CacheKey
from proxy.mask_store import StoredMask
from proxy.metrics import ProxyMetrics

log = logging.getLogger("proxy.shared_cache")

KEY_PREFIX = "mobilesam:embedding:"
MASK_KEY_PREFIX = "mobilesam:mask:"
# Format of a stored entry: its MAGIC, a 4-byte big-endian header length, a JSON header, then
# the payload: an embedding's bytes and the source file's bytes, or a mask's logits. A new
# layout gets a new MAGIC (old entries are then misses, not errors).
MAGIC = b"MSAMEMB1"
MASK_MAGIC = b"MSAMMSK1"
HEADER_LENGTH = struct.Struct(">I")
FLOAT32 = np.dtype("<f4")
# After a failed call, the tier answers "miss" at once for this long before trying Redis again.
BACKOFF_S = 5.0
# Connections per proxy process; a request waits at most REDIS_TIMEOUT_S for a free one.
MAX_CONNECTIONS = 16


class UnreadableEntry(ValueError):
    """A stored value that is not an entry of this format."""


def redis_key(key: CacheKey) -> str:
    identity, image_id = key
    return f"{KEY_PREFIX}{identity}:{image_id}"


def mask_key(mask_id: str) -> str:
    return f"{MASK_KEY_PREFIX}{mask_id}"


def _frame(magic: bytes, header: dict[str, Any], *payload: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return b"".join((magic, HEADER_LENGTH.pack(len(encoded)), encoded, *payload))


def _unframe(magic: bytes, value: bytes, what: str) -> tuple[dict[str, Any], int]:
    """A framed value's JSON header and where its payload starts."""
    if not value.startswith(magic) or len(value) < len(magic) + HEADER_LENGTH.size:
        raise UnreadableEntry(f"not a stored {what}")
    offset = len(magic) + HEADER_LENGTH.size
    (header_length,) = HEADER_LENGTH.unpack_from(value, len(magic))
    try:
        header = json.loads(value[offset : offset + header_length])
    except ValueError as error:
        raise UnreadableEntry(f"bad header: {error}") from error
    if not isinstance(header, dict):
        raise UnreadableEntry("bad header: not an object")
    return header, offset + header_length


def serialize(entry: CachedImage) -> bytes:
    embedding = np.ascontiguousarray(entry.embedding, dtype=FLOAT32)
    header = {
        "shape": list(embedding.shape),
        "original_size": list(entry.original_size),
        "input_size": list(entry.input_size),
        "embedding_bytes": embedding.nbytes,
        "source_bytes": len(entry.source),
    }
    return _frame(MAGIC, header, embedding.tobytes(), entry.source)


def deserialize(value: bytes) -> CachedImage:
    """The entry `serialize` wrote; UnreadableEntry for anything else (never a partial one)."""
    header, offset = _unframe(MAGIC, value, "embedding")
    try:
        shape = tuple(int(n) for n in header["shape"])
        original_size = tuple(int(n) for n in header["original_size"])
        input_size = tuple(int(n) for n in header["input_size"])
        embedding_bytes = int(header["embedding_bytes"])
        source_bytes = int(header["source_bytes"])
    except (ValueError, KeyError, TypeError) as error:
        raise UnreadableEntry(f"bad header: {error}") from error
    if (
        len(original_size) != 2
        or len(input_size) != 2
        or embedding_bytes != int(np.prod(shape)) * FLOAT32.itemsize
        or len(value) != offset + embedding_bytes + source_bytes
    ):
        raise UnreadableEntry("sizes in the header do not match the value")
    embedding = np.frombuffer(value, FLOAT32, embedding_bytes // 4, offset)
    return CachedImage(
        embedding.reshape(shape).astype(np.float32),  # a copy of its own, native order
        original_size,
        input_size,
        source=value[offset + embedding_bytes :],
    )


def serialize_mask(mask: StoredMask) -> bytes:
    logits = np.ascontiguousarray(mask.logits, dtype=FLOAT32)
    identity, image_id = mask.image_key
    header = {"identity": identity, "image_id": image_id, "shape": list(logits.shape)}
    return _frame(MASK_MAGIC, header, logits.tobytes())


def deserialize_mask(mask_id: str, value: bytes) -> StoredMask:
    """The mask `serialize_mask` wrote under `mask_id`; UnreadableEntry for anything else,
    including a mask that does not hash to that id."""
    header, offset = _unframe(MASK_MAGIC, value, "mask")
    try:
        image_key = (str(header["identity"]), str(header["image_id"]))
        shape = tuple(int(n) for n in header["shape"])
    except (ValueError, KeyError, TypeError) as error:
        raise UnreadableEntry(f"bad header: {error}") from error
    count = int(np.prod(shape))
    if len(shape) != 2 or len(value) != offset + count * FLOAT32.itemsize:
        raise UnreadableEntry("sizes in the header do not match the value")
    stored = StoredMask.of(image_key, np.frombuffer(value, FLOAT32, count, offset).reshape(shape))
    if stored.mask_id != mask_id:
        raise UnreadableEntry(f"the entry under {mask_id} does not hash to it")
    return stored


Entry = TypeVar("Entry")


class RedisTier:
    """`proxy.cache.SharedTier` and `proxy.mask_store.SharedMasks` on Redis, through one
    connection pool and one backoff. No method but `close` raises."""

    def __init__(
        self,
        url: str,
        ttl_s: int,
        timeout_s: float,
        max_entry_bytes: int,
        metrics: ProxyMetrics,
    ) -> None:
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.max_entry_bytes = max_entry_bytes
        self.metrics = metrics
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),  # no retries: a failure degrades to local at once
        )
        self.client = redis.Redis(connection_pool=pool)
        self._backoff_until = 0.0

    async def load(self, key: CacheKey) -> CachedImage | None:
        return await self._load(
            redis_key(key), deserialize, "load", self.metrics.shared_cache_lookups
        )

    async def store(self, key: CacheKey, entry: CachedImage) -> None:
        if entry.nbytes > self.max_entry_bytes:
            self.metrics.shared_cache_skips.labels(reason="too_large").inc()
            return
        await self._store("store", (redis_key(key), lambda: serialize(entry)))

    async def load_mask(self, mask_id: str) -> StoredMask | None:
        return await self._load(
            mask_key(mask_id),
            partial(deserialize_mask, mask_id),
            "load_mask",
            self.metrics.shared_mask_lookups,
        )

    async def store_masks(self, masks: list[StoredMask]) -> None:
        """All of them in one round trip (a pipeline, not a transaction)."""
        await self._store(
            "store_masks",
            *((mask_key(mask.mask_id), partial(serialize_mask, mask)) for mask in masks),
        )

    async def _load(
        self, key: str, parse: Callable[[bytes], Entry], operation: str, lookups: Counter
    ) -> Entry | None:
        """GETEX (reads renew the TTL), parsed; None on a miss or any failure."""
        if self._backing_off():
            return None
        try:
            value = await asyncio.wait_for(self.client.getex(key, ex=self.ttl_s), self.timeout_s)
            entry = None if value is None else parse(value)
        except Exception as error:
            self._failed(operation, error)
            return None
        self._recovered()
        lookups.labels(result="miss" if entry is None else "hit").inc()
        return entry

    async def _store(self, operation: str, *items: tuple[str, Callable[[], bytes]]) -> None:
        """SET each (key, value) with the TTL, in one round trip; failures are only counted."""
        if self._backing_off():
            return
        try:
            async with self.client.pipeline(transaction=False) as pipeline:
                for key, value in items:
                    pipeline.set(key, value(), ex=self.ttl_s)
                await asyncio.wait_for(pipeline.execute(), self.timeout_s)
        except Exception as error:
            self._failed(operation, error)
            return
        self._recovered()

    async def close(self) -> None:
        await self.client.aclose()

    def _backing_off(self) -> bool:
        if time.monotonic() < self._backoff_until:
            self.metrics.shared_cache_skips.labels(reason="backoff").inc()
            return True
        return False

    def _failed(self, operation: str, error: BaseException) -> None:
        self.metrics.shared_cache_errors.labels(operation=operation).inc()
        if isinstance(error, UnreadableEntry):
            log.warning("shared cache %s: unreadable entry ignored: %s", operation, error)
            return
        if not self._backoff_until:
            log.warning(
                "shared cache unavailable (%s: %s): serving from the local cache",
                operation,
                str(error) or type(error).__name__,
            )
        self._backoff_until = time.monotonic() + BACKOFF_S

    def _recovered(self) -> None:
        if self._backoff_until:
            log.warning("shared cache reachable again")
            self._backoff_until = 0.0
