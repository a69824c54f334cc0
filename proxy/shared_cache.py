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
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time

import numpy as np
import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from proxy.cache import CachedImage, CacheKey
from proxy.metrics import ProxyMetrics

log = logging.getLogger("proxy.shared_cache")

KEY_PREFIX = "mobilesam:embedding:"
# Format of a stored entry: MAGIC, a 4-byte big-endian header length, a JSON header, the
# embedding's bytes, the source file's bytes. A new layout gets a new MAGIC (old entries are
# then misses, not errors).
MAGIC = b"MSAMEMB1"
HEADER_LENGTH = struct.Struct(">I")
EMBEDDING_DTYPE = np.dtype("<f4")
# After a failed call, the tier answers "miss" at once for this long before trying Redis again.
BACKOFF_S = 5.0
# Connections per proxy process; a request waits at most REDIS_TIMEOUT_S for a free one.
MAX_CONNECTIONS = 16


class UnreadableEntry(ValueError):
    """A stored value that is not an entry of this format."""


def redis_key(key: CacheKey) -> str:
    identity, image_id = key
    return f"{KEY_PREFIX}{identity}:{image_id}"


def serialize(entry: CachedImage) -> bytes:
    embedding = np.ascontiguousarray(entry.embedding, dtype=EMBEDDING_DTYPE)
    header = json.dumps(
        {
            "shape": list(embedding.shape),
            "original_size": list(entry.original_size),
            "input_size": list(entry.input_size),
            "embedding_bytes": embedding.nbytes,
            "source_bytes": len(entry.source),
        }
    ).encode()
    return b"".join(
        (MAGIC, HEADER_LENGTH.pack(len(header)), header, embedding.tobytes(), entry.source)
    )


def deserialize(value: bytes) -> CachedImage:
    """The entry `serialize` wrote; UnreadableEntry for anything else (never a partial one)."""
    if not value.startswith(MAGIC) or len(value) < len(MAGIC) + HEADER_LENGTH.size:
        raise UnreadableEntry("not a stored embedding")
    offset = len(MAGIC) + HEADER_LENGTH.size
    (header_length,) = HEADER_LENGTH.unpack_from(value, len(MAGIC))
    try:
        header = json.loads(value[offset : offset + header_length])
        shape = tuple(int(n) for n in header["shape"])
        original_size = tuple(int(n) for n in header["original_size"])
        input_size = tuple(int(n) for n in header["input_size"])
        embedding_bytes = int(header["embedding_bytes"])
        source_bytes = int(header["source_bytes"])
    except (ValueError, KeyError, TypeError) as error:
        raise UnreadableEntry(f"bad header: {error}") from error
    offset += header_length
    if (
        len(original_size) != 2
        or len(input_size) != 2
        or embedding_bytes != int(np.prod(shape)) * EMBEDDING_DTYPE.itemsize
        or len(value) != offset + embedding_bytes + source_bytes
    ):
        raise UnreadableEntry("sizes in the header do not match the value")
    embedding = np.frombuffer(value, EMBEDDING_DTYPE, embedding_bytes // 4, offset)
    return CachedImage(
        embedding.reshape(shape).astype(np.float32),  # a copy of its own, native order
        original_size,
        input_size,
        source=value[offset + embedding_bytes :],
    )


class RedisTier:
    """`proxy.cache.SharedTier` on Redis. `load` and `store` never raise."""

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
        if self._backing_off():
            return None
        try:
            value = await asyncio.wait_for(
                self.client.getex(redis_key(key), ex=self.ttl_s), self.timeout_s
            )
            entry = None if value is None else deserialize(value)
        except Exception as error:
            self._failed("load", error)
            return None
        self._recovered()
        self.metrics.shared_cache_lookups.labels(result="miss" if entry is None else "hit").inc()
        return entry

    async def store(self, key: CacheKey, entry: CachedImage) -> None:
        if entry.nbytes > self.max_entry_bytes:
            self.metrics.shared_cache_skips.labels(reason="too_large").inc()
            return
        if self._backing_off():
            return
        try:
            value = serialize(entry)
            await asyncio.wait_for(
                self.client.set(redis_key(key), value, ex=self.ttl_s), self.timeout_s
            )
        except Exception as error:
            self._failed("store", error)
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
