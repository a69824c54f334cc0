"""Image embeddings kept in memory, so re-prompting an image never re-runs the encoder.

An LRU bounded by bytes, keyed by (model identity, image content hash). Concurrent misses
for the same key share one encoder call instead of each starting their own. With a shared
tier (`proxy.shared_cache.RedisTier`, when `REDIS_URL` is set) the LRU sits in front of it:
a local miss asks the shared tier before computing, and what is computed goes to both, so
an image uploaded to one proxy replica can be re-prompted on any other.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

CacheKey = tuple[str, str]  # (model identity, image_id)


@dataclass(frozen=True)
class CachedImage:
    """What a prompt needs from an image once it has been encoded."""

    embedding: np.ndarray  # [256, 64, 64] float32
    original_size: tuple[int, int]  # (height, width) of the decoded image
    input_size: tuple[int, int]  # (height, width) after resizing the longest side
    # The uploaded file, kept compressed: segment-everything by image_id still needs the
    # pixels (crops, overlay), and the file is far smaller than the decoded image.
    source: bytes = b""

    @property
    def nbytes(self) -> int:
        return int(self.embedding.nbytes) + len(self.source)


class SharedTier(Protocol):
    """A cache shared by proxy replicas. Never raises: a failure is a miss (or no store)."""

    async def load(self, key: CacheKey) -> CachedImage | None: ...

    async def store(self, key: CacheKey, entry: CachedImage) -> None: ...

    async def close(self) -> None: ...


class EmbeddingCache:
    def __init__(self, budget_bytes: int, shared: SharedTier | None = None) -> None:
        self.budget_bytes = budget_bytes
        self.shared = shared
        self._entries: OrderedDict[CacheKey, CachedImage] = OrderedDict()
        self._in_flight: dict[CacheKey, asyncio.Future[CachedImage]] = {}
        self.used_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey) -> CachedImage | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    async def lookup(self, key: CacheKey) -> CachedImage | None:
        """Local first, then the shared tier (a shared hit is kept locally too)."""
        entry = self.get(key)
        if entry is None and self.shared is not None:
            entry = await self.shared.load(key)
            if entry is not None:
                self.put(key, entry)
        return entry

    def put(self, key: CacheKey, entry: CachedImage) -> None:
        if entry.nbytes > self.budget_bytes:
            return
        previous = self._entries.pop(key, None)
        if previous is not None:
            self.used_bytes -= previous.nbytes
        self._entries[key] = entry
        self.used_bytes += entry.nbytes
        while self.used_bytes > self.budget_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.used_bytes -= evicted.nbytes

    async def get_or_compute(
        self, key: CacheKey, compute: Callable[[], Awaitable[CachedImage]]
    ) -> tuple[CachedImage, bool]:
        """Returns the entry and whether it was a hit: found locally or in the shared tier, or
        computed by a concurrent request for the same key (one computation for all of them)."""
        entry = self.get(key)
        if entry is not None:
            return entry, True
        pending = self._in_flight.get(key)
        if pending is not None:
            try:
                entry = await asyncio.shield(pending)
            except asyncio.CancelledError:
                if not pending.cancelled():
                    raise  # this request is being cancelled
                # The request computing it was cancelled (its client left): try ourselves.
                return await self.get_or_compute(key, compute)
            except Exception:
                # The other request's failure may be its own (its prompts, say): try ourselves.
                return await self.get_or_compute(key, compute)
            return entry, True
        future: asyncio.Future[CachedImage] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            shared = None if self.shared is None else await self.shared.load(key)
            entry = shared if shared is not None else await compute()
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)
                future.exception()  # mark retrieved: waiters, if any, re-raise it themselves
            raise
        finally:
            self._in_flight.pop(key, None)
        future.set_result(entry)
        self.put(key, entry)
        if shared is not None:
            return entry, True
        if self.shared is not None:
            await self.shared.store(key, entry)
        return entry, False

    async def close(self) -> None:
        if self.shared is not None:
            await self.shared.close()
