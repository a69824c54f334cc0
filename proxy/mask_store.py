"""Previous answers' low-resolution masks, kept so that a client can refine an object.

Upstream refines by feeding the chosen candidate's 256x256 logits back to the decoder
(`SamPredictor.predict(mask_input=...)`). Those are 256 KiB of float32 per mask, so instead of
sending them to the client and back, the proxy keeps each answer's logits under a `mask_id`
that a later prompt names. The store is an LRU bounded by bytes; a handle is valid
only for the image (and model) it was computed on.

A handle is a hash of the image's key and the logits themselves: the same answer gets the
same handle (a repeated request takes no more room), and handles cannot be guessed.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass

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


class MaskStore:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
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
