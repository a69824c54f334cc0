"""`mobile_sam.utils.transforms.ResizeLongestSide` without torch, byte for byte.

Upstream resizes with torchvision on a PIL image, which is `PIL.Image.resize(..., BILINEAR)`
(Pillow's bilinear filter, antialiased when shrinking). Calling Pillow directly gives the very
same bytes; OpenCV's INTER_LINEAR would not (no antialiasing), and every pixel of difference
moves the embedding away from the oracle's.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

Size = tuple[int, int]  # (height, width), upstream's order


def preprocess_shape(height: int, width: int, image_side: int) -> Size:
    """Upstream `ResizeLongestSide.get_preprocess_shape`, same float arithmetic and rounding."""
    scale = image_side * 1.0 / max(height, width)
    new_h, new_w = height * scale, width * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def resize_longest_side(image: np.ndarray, image_side: int) -> np.ndarray:
    """Upstream `ResizeLongestSide.apply_image` for an HxWx3 uint8 array."""
    new_h, new_w = preprocess_shape(image.shape[0], image.shape[1], image_side)
    if new_h == 0 or new_w == 0:
        # Upstream fails here too (an aspect ratio beyond about 2 * image_side : 1).
        raise ValueError(
            f"a {image.shape[1]}x{image.shape[0]} image would resize to {new_w}x{new_h}"
        )
    resized = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR)
    return np.asarray(resized)


def pad_to_square(image: np.ndarray, side: int) -> np.ndarray:
    """Zero-pad bottom and right to side x side, as `Sam.preprocess` places the image."""
    height, width = image.shape[:2]
    if height > side or width > side:
        raise ValueError(f"a {width}x{height} image does not fit in {side}x{side}")
    padded = np.zeros((side, side, *image.shape[2:]), dtype=image.dtype)
    padded[:height, :width] = image
    return padded


def prepare_image(image: np.ndarray, image_side: int) -> tuple[np.ndarray, Size]:
    """Original RGB image -> (encoder `images` item, encoder `input_size` item)."""
    resized = resize_longest_side(image, image_side)
    return pad_to_square(resized, image_side), (resized.shape[0], resized.shape[1])


def apply_coords(coords: np.ndarray, original_size: Size, image_side: int) -> np.ndarray:
    """Upstream `ResizeLongestSide.apply_coords`: (x, y) in original pixels -> resized frame."""
    old_h, old_w = original_size
    new_h, new_w = preprocess_shape(old_h, old_w, image_side)
    coords = np.array(coords, dtype=float)  # A float64 copy, as upstream's deepcopy + astype.
    coords[..., 0] = coords[..., 0] * (new_w / old_w)
    coords[..., 1] = coords[..., 1] * (new_h / old_h)
    return coords


def apply_boxes(boxes: np.ndarray, original_size: Size, image_side: int) -> np.ndarray:
    """Upstream `ResizeLongestSide.apply_boxes`: XYXY boxes -> resized frame, shape [B, 4]."""
    boxes = apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size, image_side)
    return boxes.reshape(-1, 4)
