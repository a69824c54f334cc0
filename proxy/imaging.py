"""Uploaded bytes -> HxWx3 uint8 RGB, refusing anything that could hurt the process.

The size limits are checked against the header before any pixel is decoded (Pillow's
`Image.open` is lazy), so a tiny file that declares a huge image costs nothing. Every failure
is an `ImageError` with a machine-readable code, so the HTTP layer can turn it into a 4xx
without knowing Pillow's exception zoo.

Colour choices (they decide what the encoder sees, so they are deliberate):

* Alpha is dropped, not composited: transparent pixels keep their stored colour. This is what
  `cv2.imread(path)` does, which is how upstream's scripts load images, so parity holds.
* 16-bit samples keep their high byte (``v >> 8``). OpenCV's `imread` does the same for 16-bit
  PNG and TIFF, and Pillow does it itself for 16-bit RGB(A) PNGs, so every 16-bit path agrees.
* 32-bit float images are taken as [0, 1] when all finite samples lie there (the usual
  convention), else clipped to [0, 255]; NaN and infinities become 0.
"""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from proxy.errors import (
    CorruptImage,
    EmptyImage,
    ImageError,
    ImageTooLarge,
    UnsupportedImageFormat,
)

# Pillow's decoder names. The JPEG decoder also opens MPO, the multi-picture JPEG that many
# cameras write, and then reports the format as "MPO" (its first frame is the photo).
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
_ALLOWED_REPORTED_FORMATS = frozenset({*ALLOWED_FORMATS, "MPO"})
# Magic numbers of the allowed formats, to tell a damaged header (422) from a foreign file (415).
_SIGNATURES: dict[str, tuple[bytes, ...]] = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "BMP": (b"BM",),
    "TIFF": (b"II*\x00", b"MM\x00*"),
}
_ALLOWED_FOR_HUMANS = "JPEG, PNG, WEBP, BMP or TIFF"

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})

# Decoding must fail on a cut-off file, never hand back a half-grey picture: Pillow's global
# `ImageFile.LOAD_TRUNCATED_IMAGES` must stay False (a test pins it), and `load()` runs inside
# the try below so the truncation error is ours to translate.


def decode_image(data: bytes, *, max_pixels: int, max_side: int) -> np.ndarray:
    """Decode an upload to a writable HxWx3 uint8 RGB array, upright per its EXIF orientation."""
    if not data:
        raise EmptyImage("the uploaded file is empty (0 bytes)")
    image = _open_allowed(data, max_pixels)
    try:
        check_image_size(image.width, image.height, max_pixels=max_pixels, max_side=max_side)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        return to_rgb_array(image)
    except ImageError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # Pillow signals broken data with many exception types.
        raise CorruptImage(f"the {image.format} image could not be decoded: {exc}") from exc
    finally:
        image.close()


def image_size(data: bytes, *, max_pixels: int, max_side: int) -> tuple[int, int]:
    """(width, height) from the header alone, with every check `decode_image` makes first:
    what the decode will cost is known before anything is allocated."""
    if not data:
        raise EmptyImage("the uploaded file is empty (0 bytes)")
    image = _open_allowed(data, max_pixels)
    try:
        check_image_size(image.width, image.height, max_pixels=max_pixels, max_side=max_side)
        return image.width, image.height
    finally:
        image.close()


def check_image_size(width: int, height: int, *, max_pixels: int, max_side: int) -> None:
    """Refuse from the declared size alone, before decoding allocates width*height*channels."""
    if width <= 0 or height <= 0:
        raise CorruptImage(f"image declares an empty size {width}x{height}")
    if max(width, height) > max_side:
        raise ImageTooLarge(
            f"image is {width}x{height}; the longest side may be at most {max_side} pixels"
        )
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )


def _open_allowed(data: bytes, max_pixels: int) -> Image.Image:
    """Read only the header, with only the allowed decoders."""
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError as exc:
        raise _unsupported(data) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own cap (2 x Image.MAX_IMAGE_PIXELS) fired before ours could.
        raise ImageTooLarge(_bomb_message(exc, max_pixels)) from exc
    except MemoryError:
        raise
    except Exception as exc:
        raise CorruptImage(f"the image header could not be read: {exc}") from exc
    if image.format not in _ALLOWED_REPORTED_FORMATS:  # Defensive: plugins may re-label.
        image.close()
        raise UnsupportedImageFormat(
            f"{image.format} images are not supported; send {_ALLOWED_FOR_HUMANS}"
        )
    return image


def _bomb_message(exc: Exception, max_pixels: int) -> str:
    """Our wording for Pillow's refusal, which names the pixel count but not the dimensions."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    if found is None:
        return f"image is too large to decode ({exc}); the limit is {max_pixels} pixels"
    return f"image is {found.group(1)} pixels; the limit is {max_pixels}"


def _unsupported(data: bytes) -> ImageError:
    """Name the format when Pillow knows it, so the client learns what to convert from."""
    claimed = _allowed_signature(data)
    if claimed is not None:
        return CorruptImage(f"the file starts like a {claimed} image but its header is unreadable")
    name = identify_format(data)
    if name is None:
        return UnsupportedImageFormat(
            f"the file is not a recognised image ({len(data)} bytes); send {_ALLOWED_FOR_HUMANS}"
        )
    return UnsupportedImageFormat(f"{name} images are not supported; send {_ALLOWED_FOR_HUMANS}")


def _allowed_signature(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for name, signatures in _SIGNATURES.items():
        if data.startswith(signatures):
            return name
    return None


def identify_format(data: bytes) -> str | None:
    """Pillow's name for the format of `data` from its header alone, or None."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format
    except Exception:  # Only used to word an error message; any failure means "unknown".
        return None


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any Pillow mode -> HxWx3 uint8 RGB (see the module docstring for the choices)."""
    mode = image.mode
    if mode == "RGB":
        return np.array(image)
    if mode in _SIXTEEN_BIT_MODES:
        return _gray_to_rgb(_sixteen_to_eight_bit(np.asarray(image)))
    if mode == "F":
        return _gray_to_rgb(_float_to_eight_bit(np.asarray(image)))
    if mode in ("P", "PA"):
        # Via RGBA so that palette transparency is read (then dropped) without a warning.
        image = image.convert("RGBA")
    try:
        # From RGBA and LA this drops alpha and keeps the stored colours, like cv2.imread.
        return np.array(image.convert("RGB"))
    except ValueError as exc:
        raise UnsupportedImageFormat(f"images in pixel mode {mode!r} are not supported") from exc


def _sixteen_to_eight_bit(samples: np.ndarray) -> np.ndarray:
    # Mode "I" (32-bit int) is how Pillow holds some 16-bit files; clip to the 16-bit range.
    return (np.clip(samples, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)


def _float_to_eight_bit(samples: np.ndarray) -> np.ndarray:
    samples = np.nan_to_num(samples.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if samples.size and samples.min() >= 0.0 and samples.max() <= 1.0:
        samples = samples * 255.0
    return np.clip(np.rint(samples), 0, 255).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)
