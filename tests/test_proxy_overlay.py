"""The overlay picture: colours blended where masks are, the rest of the image untouched."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from proxy.overlay import OPACITY, encode_png, mask_colours, render_overlay


def test_colours_are_distinct() -> None:
    colours = mask_colours(50)
    assert len({tuple(c) for c in colours}) == 50


def test_masks_are_blended_and_the_rest_is_untouched() -> None:
    image = np.full((120, 200, 3), 100, dtype=np.uint8)
    mask = np.zeros((120, 200), dtype=bool)
    mask[60:100, 120:180] = True
    picture = render_overlay(image, [mask], "1 object")
    colour = mask_colours(1)[0].astype(float)
    inside = picture[70:90, 130:170].astype(float)  # away from the outline
    expected = 100 * (1 - OPACITY) + colour * OPACITY
    assert np.abs(inside - expected).max() <= 1
    assert (picture[50:55, 0:100] == 100).all(), "outside masks and label: unchanged"
    assert (picture[:10, :40] != 100).any(), "the label is drawn in the corner"


def test_png_round_trip() -> None:
    picture = render_overlay(np.zeros((30, 40, 3), np.uint8), [], "0 objects")
    decoded = Image.open(io.BytesIO(encode_png(picture)))
    assert decoded.format == "PNG" and decoded.size == (40, 30)
    np.testing.assert_array_equal(np.asarray(decoded.convert("RGB")), picture)
