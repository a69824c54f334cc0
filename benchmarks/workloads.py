"""The end-to-end workloads, as request factories for the load generator.

- cold: a never-seen image with one foreground click: decode, encoder, decoder, masks.
- cached: the same image re-prompted by `image_id` with a new click each time: decoder only.
- multi: four prompts per request on a cached image (two clicks, a box, a box with a click),
  which the proxy sends as two decoder calls (prompts grouped by point count).

Cold requests (and segment-everything, `benchmarks.e2e.compare_everything`) take their images
from a `ColdStream`: each proxy must see each image once, and the PyTorch baseline is sent the
very same sequence.
"""

from __future__ import annotations

import json

import numpy as np

from benchmarks.assets import Upload
from benchmarks.loadgen import Request, RequestFactory

SEGMENT = "/segment-image"


class ColdStream:
    """Hands out the pool's uploads in order; running out means the plan under-sized it."""

    def __init__(self, pool: list[Upload]) -> None:
        self.pool = pool
        self.position = 0

    def next(self) -> Upload:
        if self.position >= len(self.pool):
            raise RuntimeError(f"cold image pool of {len(self.pool)} exhausted")
        upload = self.pool[self.position]
        self.position += 1
        return upload


def _file(upload: Upload) -> tuple[str, bytes, str]:
    return (upload.name, upload.data, upload.content_type)


def click(x: float, y: float) -> dict:
    return {"points": [[round(x, 1), round(y, 1)]], "labels": [1]}


def cold(stream: ColdStream) -> RequestFactory:
    def make(_index: int) -> Request:
        upload = stream.next()
        prompts = [click(upload.width / 2, upload.height / 2)]
        return Request(SEGMENT, {"prompts": json.dumps(prompts)}, _file(upload))

    return make


def cached(image_id: str, width: int, height: int, seed: int = 0) -> RequestFactory:
    def make(index: int) -> Request:
        rng = np.random.default_rng((seed, index))
        x, y = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height
        return Request(SEGMENT, {"image_id": image_id, "prompts": json.dumps([click(x, y)])})

    return make


def several_prompts(width: int, height: int) -> list[dict]:
    box = [round(width * 0.2), round(height * 0.2), round(width * 0.8), round(height * 0.8)]
    return [
        click(width * 0.3, height * 0.4),
        click(width * 0.7, height * 0.6),
        {"box": box},
        {"box": box, "points": [[round(width / 2), round(height / 2)]], "labels": [1]},
    ]


def multi(image_id: str, width: int, height: int) -> RequestFactory:
    prompts = json.dumps(several_prompts(width, height))

    def make(_index: int) -> Request:
        return Request(SEGMENT, {"image_id": image_id, "prompts": prompts})

    return make
