"""THE COMPARISON, not part of the product: upstream `SamPredictor` in-process behind FastAPI.

This is how most MobileSAM services are built: one process loads the PyTorch model, and each
request runs `set_image` (the encoder) and `predict` (the decoder) in PyTorch eager mode. The
benchmark sends it the same photographs and prompts as the real service, over HTTP, in the same
run, so that the throughput ratio between the two is measured side by side rather than
against a number from another day.

Kept deliberately ordinary: the request contract is the service's (multipart `file` plus a
`prompts` JSON list of {points, labels, box}, `multimask_output`; without `prompts`, segment
everything with upstream `SamAutomaticMaskGenerator`, its settings as form fields of the same
names), masks come back as COCO RLE (pycocotools) like the service's default, the model is shared
and guarded by a lock (it holds the current image, so concurrent requests must not interleave),
and torch gets the same two threads the service's runtime gets. No embedding cache, no
batching: that is what the product adds.

    python -m benchmarks.baseline_pytorch --checkpoint build/bench/mobilesam-random-seed0.pt
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import threading
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from PIL import Image, ImageOps
from pydantic import TypeAdapter, ValidationError

from benchmarks.common import THREADS


def load_predictor(checkpoint: Path, threads: int):
    import torch

    with warnings.catch_warnings():  # timm's deprecation notices on mobile_sam's import
        warnings.simplefilter("ignore")
        from mobile_sam import SamPredictor, sam_model_registry

    torch.set_num_threads(threads)
    sam = sam_model_registry["vit_t"](checkpoint=str(checkpoint)).eval()
    return SamPredictor(sam)


def generator_settings(form: dict[str, str]) -> dict[str, Any]:
    """The form fields named like `SamAutomaticMaskGenerator`'s numeric arguments, typed."""
    from mobile_sam import SamAutomaticMaskGenerator

    settings = {}
    for name, parameter in inspect.signature(SamAutomaticMaskGenerator).parameters.items():
        kind = type(parameter.default)
        if name in form and kind in (int, float):
            try:
                settings[name] = kind(form[name])
            except ValueError as exc:
                raise HTTPException(422, f"{name}: {exc}") from exc
    return settings


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
    async def segment_image(request: Request) -> dict[str, Any]:
        started = time.perf_counter()
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise HTTPException(422, "file is required")
        data = await upload.read()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        if "prompts" in fields:
            work = partial(prompted, data, fields["prompts"], fields)
        else:
            work = partial(everything, data, generator_settings(fields))
        body = await run_in_threadpool(work)  # the thread pool, off the event loop
        body["timings_ms"]["total"] = round((time.perf_counter() - started) * 1000, 2)
        return body

    def prompted(data: bytes, prompts: str, fields: dict[str, str]) -> dict[str, Any]:
        image = decode_rgb(data)
        items = parse_prompts(prompts)
        try:  # pydantic's bool, as the service's Form(bool) field parses it
            multimask_output = TypeAdapter(bool).validate_python(
                fields.get("multimask_output", True)
            )
        except ValidationError as exc:
            raise HTTPException(422, f"multimask_output: {exc}") from exc
        results = []
        waiting = time.perf_counter()
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
                "wait_for_predictor": round((encode_started - waiting) * 1000, 2),
                "encoder": round((encoded - encode_started) * 1000, 2),
                "decoder_and_masks": round((decoded - encoded) * 1000, 2),
            },
        }

    def everything(data: bytes, settings: dict[str, Any]) -> dict[str, Any]:
        from mobile_sam import SamAutomaticMaskGenerator

        image = decode_rgb(data)
        try:
            generator = SamAutomaticMaskGenerator(
                predictor.model, output_mode="coco_rle", **settings
            )
        except (AssertionError, ValueError) as exc:
            raise HTTPException(422, f"generator settings: {exc}") from exc
        waiting = time.perf_counter()
        with lock:
            generate_started = time.perf_counter()
            masks = generator.generate(image)
            generated = time.perf_counter()
        return {
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
            "count": len(masks),
            "masks": masks,
            "timings_ms": {
                "wait_for_predictor": round((generate_started - waiting) * 1000, 2),
                "generate": round((generated - generate_started) * 1000, 2),
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
