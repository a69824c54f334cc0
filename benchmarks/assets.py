"""What every run needs: a checkpoint, its export, and the images the load generator sends.

The official weights cannot be downloaded on these machines, so the benchmark does what the
tests do: a `vit_t` checkpoint with seeded random weights goes through the real export. Timings
do not depend on weight values (same graphs, same shapes, no data-dependent control flow); only
the bf16 parity figure does, and the report says so.

Images are the real photographs of `testkit.photos` (scikit-image's bundled data). A "cold"
request needs bytes the proxy has never seen (its cache is keyed by the SHA-256 of the upload),
so each cold image is a photo with one corner pixel changed and re-encoded in its own format:
same size and content, new hash. They are all made before any timing starts.
"""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from benchmarks.common import BENCH_DIR, LOG_DIR
from common.settings import PROJECT_ROOT
from testkit.photos import photos

log = logging.getLogger("bench.assets")

CHECKPOINT_SEED = 0
CHECKPOINT_PATH = BENCH_DIR / f"mobilesam-random-seed{CHECKPOINT_SEED}.pt"
EXPORT_DIR = BENCH_DIR / "export"


def ensure_checkpoint(path: Path = CHECKPOINT_PATH, seed: int = CHECKPOINT_SEED) -> Path:
    """A seeded random-init `vit_t` state_dict, saved like the official file (made once).

    In a child process: torch stays out of the benchmark driver, which shares two cores with
    what it measures.
    """
    if not path.is_file():
        subprocess.run(
            [sys.executable, "-m", "export.random_checkpoint", str(path), str(seed)],
            cwd=PROJECT_ROOT,
            check=True,
        )
    return path


def ensure_export(checkpoint: Path = CHECKPOINT_PATH, target: Path = EXPORT_DIR) -> Path:
    """`python -m export` into build/bench/export: a no-op while the checkpoint is unchanged."""
    log_path = LOG_DIR / "export.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as output:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "export",
                "--checkpoint",
                str(checkpoint),
                "--model-repository",
                str(target),
            ],
            cwd=PROJECT_ROOT,
            check=True,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    return target


# --- images -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    """One file as a client uploads it."""

    name: str
    data: bytes
    content_type: str
    width: int
    height: int


_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


def photo_uploads(skip_tiny: bool = True) -> list[Upload]:
    """The bundled photographs (testkit.photos); the 45x30 one is a parity case, not load."""
    uploads = []
    for photo in photos():
        if skip_tiny and photo.name.startswith("tiny"):
            continue
        image = Image.open(io.BytesIO(photo.data))
        uploads.append(
            Upload(photo.name, photo.data, _FORMATS[image.format], image.width, image.height)
        )
    return uploads


def unique_variant(upload: Upload, index: int) -> Upload:
    """The same photo with a new hash: corner pixel set from `index`, same format."""
    image = Image.open(io.BytesIO(upload.data))
    image.load()
    fmt = image.format
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGB")
    value = (index * 37 + 11) % 256
    pixel = value if image.mode == "L" else (value,) * len(image.getbands())
    image.putpixel((index % image.width, 0), pixel)
    buffer = io.BytesIO()
    options = {"quality": 90} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    image.save(buffer, fmt, **options)
    return Upload(
        f"{upload.name}-{index}",
        buffer.getvalue(),
        upload.content_type,
        upload.width,
        upload.height,
    )


def cold_pool(count: int, uploads: list[Upload] | None = None) -> list[Upload]:
    """`count` distinct uploads cycling through the photos: never a cache hit within a run."""
    uploads = uploads or photo_uploads()
    return [unique_variant(uploads[i % len(uploads)], i) for i in range(count)]
