"""proxy.imaging: every accepted mode becomes RGB, every bad upload a specific ImageError."""

from __future__ import annotations

import io
import struct
import time
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageFile

from proxy.imaging import (
    CorruptImage,
    EmptyImage,
    ImageError,
    ImageTooLarge,
    UnsupportedImageFormat,
    decode_image,
)
from proxy.problems import status_of

LIMITS = {"max_pixels": 40_000_000, "max_side": 16_384}


def decode(data: bytes, **limits: int) -> np.ndarray:
    return decode_image(data, **{**LIMITS, **limits})


def rgb_pattern(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and a valid IHDR (8-bit RGB) declaring width x height, and no pixels."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


# --- accepted images ------------------------------------------------------------------------


def test_truncated_images_are_never_loaded_by_pillow() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize(
    ("fmt", "options"),
    [("PNG", {}), ("BMP", {}), ("TIFF", {}), ("WEBP", {"lossless": True})],
)
def test_lossless_rgb_formats_round_trip_exactly(fmt: str, options: dict) -> None:
    pixels = rgb_pattern()
    decoded = decode(save(Image.fromarray(pixels), fmt, **options))
    assert decoded.dtype == np.uint8
    assert decoded.flags.writeable and decoded.flags.c_contiguous
    np.testing.assert_array_equal(decoded, pixels)


def test_jpeg_decodes_like_opencv() -> None:
    pixels = cv2.GaussianBlur(rgb_pattern(120, 160), (9, 9), 3)
    data = save(Image.fromarray(pixels), "JPEG", quality=95)
    decoded = decode(data)
    opencv = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), 4)
    assert decoded.shape == (120, 160, 3)
    assert np.abs(decoded.astype(int) - opencv).max() <= 2


def test_exif_orientation_6_is_applied() -> None:
    # Left half red, right half blue; orientation 6 means "rotate 90 degrees clockwise to view".
    pixels = np.zeros((64, 96, 3), np.uint8)
    pixels[:, :48] = (255, 0, 0)
    pixels[:, 48:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = save(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())

    decoded = decode(data)

    assert decoded.shape == (96, 64, 3)  # portrait now
    expected = np.rot90(pixels, k=-1)
    assert np.abs(decoded.astype(int) - expected).mean() < 3
    assert decoded[:40, :, 0].mean() > 200 and decoded[-40:, :, 2].mean() > 200  # red on top
    opencv = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    assert opencv.shape == decoded.shape  # OpenCV's imread rotates the same way
    assert np.abs(decoded.astype(int) - opencv).mean() < 2


def test_grayscale_becomes_three_equal_channels() -> None:
    gray = rgb_pattern()[..., 0]
    decoded = decode(save(Image.fromarray(gray, mode="L"), "PNG"))
    np.testing.assert_array_equal(decoded, np.repeat(gray[..., None], 3, axis=-1))


def test_rgba_drops_alpha_and_keeps_stored_colours() -> None:
    pixels = rgb_pattern()
    alpha = np.zeros(pixels.shape[:2], np.uint8)  # fully transparent: colours must survive
    alpha[::2] = 255
    rgba = Image.fromarray(np.dstack([pixels, alpha]), mode="RGBA")
    np.testing.assert_array_equal(decode(save(rgba, "PNG")), pixels)
    np.testing.assert_array_equal(decode(save(rgba, "WEBP", lossless=True, exact=True)), pixels)


def test_gray_with_alpha_drops_alpha() -> None:
    gray = rgb_pattern()[..., 0]
    image = Image.merge("LA", [Image.fromarray(gray), Image.fromarray(255 - gray)])
    np.testing.assert_array_equal(decode(save(image, "PNG")), np.dstack([gray] * 3))


@pytest.mark.parametrize("transparency", [None, 3, "bytes"])
def test_palette_images_use_their_palette_colours(transparency) -> None:
    palette_image = Image.fromarray(rgb_pattern()).quantize(16)
    expected = np.asarray(palette_image.convert("RGB"))
    options = {}
    if transparency == "bytes":
        options["transparency"] = bytes(range(0, 256, 16))
    elif transparency is not None:
        options["transparency"] = transparency
    data = save(palette_image, "PNG", **options)
    assert Image.open(io.BytesIO(data)).mode == "P"
    np.testing.assert_array_equal(decode(data), expected)


def test_cmyk_jpeg_is_converted_to_rgb() -> None:
    cmyk = Image.fromarray(cv2.GaussianBlur(rgb_pattern(64, 64), (9, 9), 3)).convert("CMYK")
    data = save(cmyk, "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as reopened:
        assert reopened.mode == "CMYK"
        expected = np.asarray(reopened.convert("RGB"))
    decoded = decode(data)
    assert decoded.shape == (64, 64, 3)
    np.testing.assert_array_equal(decoded, expected)


def test_sixteen_bit_png_keeps_the_high_byte_like_opencv() -> None:
    samples = np.random.default_rng(1).integers(0, 65536, (40, 50), dtype=np.uint16)
    data = save(Image.fromarray(samples), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    decoded = decode(data)
    np.testing.assert_array_equal(decoded, np.dstack([samples >> 8] * 3).astype(np.uint8))
    opencv = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(decoded, opencv[..., ::-1])


def test_sixteen_bit_rgb_png_matches_opencv() -> None:
    samples = np.random.default_rng(2).integers(0, 65536, (40, 50, 3), dtype=np.uint16)
    ok, encoded = cv2.imencode(".png", samples)  # BGR order on disk
    assert ok
    data = encoded.tobytes()
    opencv = cv2.imdecode(encoded, cv2.IMREAD_COLOR)[..., ::-1]
    np.testing.assert_array_equal(decode(data), opencv)
    np.testing.assert_array_equal(decode(data), (samples[..., ::-1] >> 8).astype(np.uint8))


def test_sixteen_bit_tiff_matches_opencv() -> None:
    samples = np.random.default_rng(3).integers(0, 65536, (30, 20), dtype=np.uint16)
    ok, encoded = cv2.imencode(".tiff", samples)
    assert ok
    opencv = cv2.imdecode(encoded, cv2.IMREAD_COLOR)[..., ::-1]
    np.testing.assert_array_equal(decode(encoded.tobytes()), opencv)


def test_float_tiff_in_unit_range_is_scaled() -> None:
    samples = np.linspace(0, 1, 30 * 20, dtype=np.float32).reshape(30, 20)
    decoded = decode(save(Image.fromarray(samples, mode="F"), "TIFF"))
    np.testing.assert_array_equal(decoded[..., 0], np.rint(samples * 255).astype(np.uint8))
    assert (decoded[..., 0] == decoded[..., 2]).all()


def test_float_tiff_beyond_unit_range_is_clipped() -> None:
    samples = np.array([[-5.0, 0.4, 100.6, 300.0]], dtype=np.float32)
    decoded = decode(save(Image.fromarray(samples, mode="F"), "TIFF"))
    np.testing.assert_array_equal(decoded[0, :, 1], [0, 0, 101, 255])


# --- refused uploads --------------------------------------------------------------------------


def assert_error(exc: ImageError, cls: type[ImageError], status: int, code: str) -> None:
    assert isinstance(exc, cls) and isinstance(exc, ValueError)
    assert (status_of(exc), exc.code) == (status, code)


def test_zero_byte_file() -> None:
    with pytest.raises(EmptyImage, match="empty") as info:
        decode(b"")
    assert_error(info.value, EmptyImage, 422, "empty_file")


def test_garbage_bytes() -> None:
    with pytest.raises(UnsupportedImageFormat, match="not a recognised image") as info:
        decode(b"this is certainly not an image" * 10)
    assert_error(info.value, UnsupportedImageFormat, 415, "unsupported_media_type")


def test_gif_is_identified_and_refused() -> None:
    data = save(Image.fromarray(rgb_pattern()).quantize(16), "GIF")
    with pytest.raises(UnsupportedImageFormat, match=r"^GIF images are not supported") as info:
        decode(data)
    assert_error(info.value, UnsupportedImageFormat, 415, "unsupported_media_type")


def test_truncated_jpeg() -> None:
    data = save(Image.fromarray(rgb_pattern(256, 256)), "JPEG", quality=90)
    with pytest.raises(CorruptImage, match="JPEG image could not be decoded") as info:
        decode(data[: len(data) // 2])
    assert_error(info.value, CorruptImage, 422, "corrupt_image")


def test_truncated_png() -> None:
    data = save(Image.fromarray(rgb_pattern(256, 256)), "PNG")
    with pytest.raises(CorruptImage, match="PNG image could not be decoded"):
        decode(data[: len(data) // 2])


def test_png_with_a_broken_header_is_corrupt() -> None:
    data = bytearray(save(Image.fromarray(rgb_pattern()), "PNG"))
    data[20] ^= 0xFF  # inside IHDR: the CRC no longer matches
    with pytest.raises(CorruptImage, match="starts like a PNG image but its header is unreadable"):
        decode(bytes(data))


def test_header_claiming_60000_squared_is_refused_before_decoding() -> None:
    data = png_header_only(60_000, 60_000)
    assert len(data) < 100
    start = time.perf_counter()
    with pytest.raises(ImageTooLarge) as info:  # Not CorruptImage: no decoding was tried.
        decode(data)
    assert time.perf_counter() - start < 0.5
    assert_error(info.value, ImageTooLarge, 422, "image_too_large")
    # Pillow's own bomb guard fires inside Image.open at this size; it names no dimensions.
    assert str(info.value) == "image is 3600000000 pixels; the limit is 40000000"


def test_header_above_our_pixel_limit_names_the_size() -> None:
    data = png_header_only(9_000, 9_000)  # below Pillow's own bomb threshold
    with pytest.raises(ImageTooLarge) as info:
        decode(data)
    assert str(info.value) == "image is 9000x9000 = 81000000 pixels; the limit is 40000000"


def test_header_above_our_side_limit_names_the_side() -> None:
    with pytest.raises(ImageTooLarge, match=r"20000x10; the longest side may be at most 16384"):
        decode(png_header_only(20_000, 10))


def test_limits_are_the_callers() -> None:
    data = save(Image.fromarray(rgb_pattern(48, 64)), "PNG")
    with pytest.raises(ImageTooLarge, match="64x48 = 3072 pixels; the limit is 3000"):
        decode(data, max_pixels=3000)
    with pytest.raises(ImageTooLarge, match="at most 63 pixels"):
        decode(data, max_side=63)
    assert decode(data, max_pixels=3072, max_side=64).shape == (48, 64, 3)


def test_every_error_is_an_image_error() -> None:
    for cls in (EmptyImage, UnsupportedImageFormat, ImageTooLarge, CorruptImage):
        assert issubclass(cls, ImageError)
        assert isinstance(status_of(cls), int) and cls.code
