"""Real photographs in several shapes and file formats, from the scikit-image wheel.

Each sample is the file bytes a client would upload and the RGB array upstream is given,
decoded independently of the proxy (Pillow, EXIF applied, then RGB) the way users of
`SamPredictor` load pictures.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from importlib import resources

import numpy as np
from PIL import Image, ImageOps


@dataclass(frozen=True)
class Photo:
    name: str
    data: bytes

    def rgb(self) -> np.ndarray:
        image = ImageOps.exif_transpose(Image.open(io.BytesIO(self.data)))
        return np.asarray(image.convert("RGB"))


def _skimage(name: str) -> Image.Image:
    with (resources.files("skimage") / "data" / name).open("rb") as f:
        image = Image.open(f)
        image.load()
    return image


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def photos() -> list[Photo]:
    chelsea = _skimage("chelsea.png")  # 451 x 300, landscape
    rocket = _skimage("rocket.jpg")  # 640 x 427
    return [
        Photo("landscape-png", _encode(chelsea, "PNG")),
        Photo(
            "portrait-jpeg",
            _encode(rocket.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=92),
        ),
        Photo("grayscale-png", _encode(_skimage("camera.png"), "PNG")),
        Photo("rgba-png", _encode(_skimage("horse.png"), "PNG")),
        Photo("tiny-webp", _encode(_skimage("coffee.png").resize((45, 30)), "WEBP", lossless=True)),
        Photo(
            "large-jpeg",
            _encode(_skimage("hubble_deep_field.jpg").resize((2400, 2093)), "JPEG", quality=90),
        ),
    ]
