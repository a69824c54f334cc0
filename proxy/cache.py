"""Image embeddings kept in memory, so re-prompting an image never re-runs the encoder.

An LRU bounded by bytes, keyed by (model identity, image content hash). Concurrent misses
for the same key share one encoder call instead of each starting their own.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np


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


class EmbeddingCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[tuple[str, str], CachedImage] = OrderedDict()
        self._in_flight: dict[tuple[str, str], asyncio.Future[CachedImage]] = {}
        self.used_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[str, str]) -> CachedImage | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: tuple[str, str], entry: CachedImage) -> None:
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
        self, key: tuple[str, str], compute: Callable[[], Awaitable[CachedImage]]
    ) -> tuple[CachedImage, bool]:
        """Returns the entry and whether it was a hit (a shared in-flight miss counts as one)."""
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
            entry = await compute()
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
        return entry, False
