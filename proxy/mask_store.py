"""Previous answers' low-resolution masks, kept so that a client can refine an object.

Upstream refines by feeding the chosen candidate's 256x256 logits back to the decoder
(`SamPredictor.predict(mask_input=...)`). Those are 256 KiB of float32 per mask, so instead of
sending them to the client and back, the proxy keeps each answer's logits under a `mask_id`
that a later prompt names. The store is an LRU bounded by bytes; a handle is valid
only for the image (and model) it was computed on.

A handle is a hash of the image's key and the logits themselves: the same answer gets the
same handle (a repeated request takes no more room), and handles cannot be guessed.

With a shared tier (`proxy.shared_cache.RedisTier`, when `REDIS_URL` is set) every mask kept
is also written there before the answer leaves, and a local miss asks it, so a client may
refine on any proxy replica, as it may re-prompt an `image_id` on any of them.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import numpy as np

ImageKey = tuple[str, str]  # (model identity, image_id), as the embedding cache keys images

MASK_ID_BYTES = 16  # 128 bits
MASK_ID_PATTERN = re.compile(f"[0-9a-f]{{{2 * MASK_ID_BYTES}}}")


def is_mask_id(text: str) -> bool:
    return MASK_ID_PATTERN.fullmatch(text) is not None


@dataclass(frozen=True)
class StoredMask:
    mask_id: str
    image_key: ImageKey
    logits: np.ndarray  # [256, 256] float32, the decoder's low-resolution logits

    @classmethod
    def of(cls, image_key: ImageKey, logits: np.ndarray) -> StoredMask:
        """A copy of `logits` (never a view that would pin the whole decoder answer) under
        its id. Pure, so a worker thread can hash while the event loop serves."""
        logits = np.array(logits, dtype=np.float32, copy=True)
        digest = hashlib.blake2b(digest_size=MASK_ID_BYTES)
        for part in image_key:
            digest.update(part.encode() + b"\0")
        digest.update(logits.tobytes())
        return cls(digest.hexdigest(), image_key, logits)


class SharedMasks(Protocol):
    """Masks shared by proxy replicas. Never raises: a failure is a miss (or no store)."""

    async def load_mask(self, mask_id: str) -> StoredMask | None: ...

    async def store_masks(self, masks: list[StoredMask]) -> None: ...


class MaskStore:
    def __init__(self, budget_bytes: int, shared: SharedMasks | None = None) -> None:
        self.budget_bytes = budget_bytes
        self.shared = shared
        self._masks: OrderedDict[str, StoredMask] = OrderedDict()
        self.used_bytes = 0

    def __len__(self) -> int:
        return len(self._masks)

    def put(self, image_key: ImageKey, logits: np.ndarray) -> str:
        return self.add(StoredMask.of(image_key, logits))

    def add(self, mask: StoredMask) -> str:
        if mask.mask_id in self._masks:
            self._masks.move_to_end(mask.mask_id)
            return mask.mask_id
        self._masks[mask.mask_id] = mask
        self.used_bytes += mask.logits.nbytes
        while self.used_bytes > self.budget_bytes and self._masks:
            _, evicted = self._masks.popitem(last=False)
            self.used_bytes -= evicted.logits.nbytes
        return mask.mask_id

    def get(self, mask_id: str) -> StoredMask | None:
        """The stored mask, now the most recently used; None if never given out or evicted."""
        stored = self._masks.get(mask_id)
        if stored is not None:
            self._masks.move_to_end(mask_id)
        return stored

    async def lookup(self, mask_id: str) -> StoredMask | None:
        """Local first, then the shared tier (a shared hit is kept locally too)."""
        stored = self.get(mask_id)
        if stored is None and self.shared is not None:
            stored = await self.shared.load_mask(mask_id)
            if stored is not None:
                self.add(stored)
        return stored

    async def keep(self, masks: list[StoredMask]) -> list[str]:
        """Add `masks` here and to the shared tier; their ids, in order."""
        ids = [self.add(mask) for mask in masks]
        if masks and self.shared is not None:
            await self.shared.store_masks(masks)
        return ids
