"""Debian's chromium driven by playwright, for the web page's tests and its README screenshot.

Playwright's own browser download cannot be reached from these machines, so the browser is
Debian's (scripts/setup.sh installs it), launched by path. Each launch gets a fresh temporary
profile (playwright makes one per `launch`). The flags keep a headless browser to itself: no
background networking, component updates, sync or QUIC, which on a closed network would only
be a stream of refused connections.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image
from playwright.sync_api import Browser, Page, Playwright

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
DESKTOP = {"viewport": {"width": 1280, "height": 800}}
PHONE = {
    "viewport": {"width": 390, "height": 844},
    "device_scale_factor": 2,
    "is_mobile": True,
    "has_touch": True,
}


def launch_chromium(playwright: Playwright) -> Browser:
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS))


def upload(page: Page, selector: str, name: str, data: bytes) -> None:
    """Chooses a file in a file input, as a user would in the picker."""
    page.set_input_files(
        selector, files=[{"name": name, "mimeType": "application/octet-stream", "buffer": data}]
    )


def canvas_pixels(page: Page, selector: str) -> np.ndarray:
    """The canvas's own pixels (RGB, at its resolution), read back losslessly as PNG."""
    url = page.locator(selector).evaluate("canvas => canvas.toDataURL('image/png')")
    data = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
