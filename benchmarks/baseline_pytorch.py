"""THE COMPARISON, not part of the product: upstream `SamPredictor` in-process behind FastAPI.

This is how most MobileSAM services are built: one process loads the PyTorch model, and each
request runs `set_image` (the encoder) and `predict` (the decoder) in PyTorch eager mode. The
benchmark sends it the same photographs and prompts as the real service, over HTTP, in the same
run, so that the throughput ratio between the two is measured side by side rather than
against a number from another day.

Kept deliberately ordinary: the request contract of the prompted path is the service's
(multipart `file` plus a `prompts` JSON list of {points, labels, box}, `multimask_output`),
masks come back as COCO RLE (pycocotools) like the service's default, the predictor is shared
and guarded by a lock (it holds the current image, so concurrent requests must not interleave),
and torch gets the same two threads the service's runtime gets. No embedding cache, no
batching: that is what the product adds.

    python -m benchmarks.baseline_pytorch --checkpoint build/bench/mobilesam-random-seed0.pt
"""

from __future__ import annotations

import argparse
import io
import json
import threading
import time
import warnings
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from PIL import Image, ImageOps

from benchmarks.common import THREADS


def load_predictor(checkpoint: Path, threads: int):
    import torch

    with warnings.catch_warnings():  # timm's deprecation notices on mobile_sam's import
        warnings.simplefilter("ignore")
        from mobile_sam import SamPredictor, sam_model_registry

    torch.set_num_threads(threads)
    sam = sam_model_registry["vit_t"](checkpoint=str(checkpoint)).eval()
    return SamPredictor(sam)


def decode_rgb(data: bytes) -> np.ndarray:
    try:
        image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        return np.asarray(image.convert("RGB"))
    except Exception as exc:
        raise HTTPException(422, f"not a readable image: {exc}") from exc


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def parse_prompts(raw: str) -> list[dict[str, Any]]:
    try:
        prompts = json.loads(raw)
    except ValueError as exc:
        raise HTTPException(422, f"prompts is not JSON: {exc}") from exc
    if not isinstance(prompts, list) or not prompts:
        raise HTTPException(422, "prompts must be a non-empty JSON list")
    return prompts


def create_app(checkpoint: Path, threads: int = THREADS) -> FastAPI:
    app = FastAPI(title="MobileSAM PyTorch baseline (comparison only)")
    predictor = load_predictor(checkpoint, threads)
    lock = threading.Lock()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/segment-image")
    def segment_image(  # sync: FastAPI runs it in its thread pool, off the event loop
        file: Annotated[UploadFile, File()],
        prompts: Annotated[str, Form()],
        multimask_output: Annotated[bool, Form()] = True,
    ) -> dict[str, Any]:
        started = time.perf_counter()
        image = decode_rgb(file.file.read())
        items = parse_prompts(prompts)
        results = []
        with lock:
            encode_started = time.perf_counter()
            predictor.set_image(image)
            encoded = time.perf_counter()
            for item in items:
                points = item.get("points")
                box = item.get("box")
                masks, scores, _ = predictor.predict(
                    point_coords=np.asarray(points, dtype=np.float32) if points else None,
                    point_labels=np.asarray(item.get("labels"), dtype=np.float32)
                    if points
                    else None,
                    box=np.asarray(box, dtype=np.float32) if box else None,
                    multimask_output=multimask_output,
                )
                order = np.argsort(-scores)
                results.append(
                    {
                        "masks": [
                            {
                                "segmentation": encode_rle(masks[i]),
                                "predicted_iou": float(scores[i]),
                                "area": int(masks[i].sum()),
                            }
                            for i in order
                        ]
                    }
                )
            decoded = time.perf_counter()
        return {
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
            "results": results,
            "timings_ms": {
                "wait_for_predictor": round((encode_started - started) * 1000, 2),
                "encoder": round((encoded - encode_started) * 1000, 2),
                "decoder_and_masks": round((decoded - encoded) * 1000, 2),
                "total": round((time.perf_counter() - started) * 1000, 2),
            },
        }

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.baseline_pytorch", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--threads", type=int, default=THREADS)
    args = parser.parse_args(argv)
    uvicorn.run(
        create_app(args.checkpoint, args.threads),
        host=args.host,
        port=args.port,
        log_level="warning",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
