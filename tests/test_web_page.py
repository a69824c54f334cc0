"""The web page at `/`, in a real browser (Debian's chromium, driven by playwright) against the
real proxy and Triton.

What the page draws is checked in its pixels: the canvas is read back losslessly and compared
with the photograph and with the masks the API answered; what it sends is read from its
requests. Every test also checks that the browser logged no error or warning.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from playwright.sync_api import Browser, ConsoleMessage, Page, Request, expect, sync_playwright

from common.settings import PROJECT_ROOT, Settings
from proxy.app import create_app
from proxy.encodings import decode_rle
from testkit.browser import DESKTOP, PHONE, canvas_pixels, launch_chromium, upload
from testkit.photos import Photo, photos

from .standins import StandInGateway

PHOTO = next(photo for photo in photos() if photo.name == "landscape-png")
PHOTO_SIZE = PHOTO.rgb().shape[1::-1]  # (width, height): 451 x 300
# Segment-everything settings that keep many masks with the random-weight test model (see
# test_everything.py), on a small grid: 16 points in two decoder batches.
EVERYTHING = {
    "points_per_side": "4",
    "points_per_batch": "8",
    "pred_iou_thresh": "0",
    "stability_score_thresh": "0.4",
    "stability_score_offset": "0.05",
    "box_nms_thresh": "1",
}
SCREENSHOT = Path(os.environ.get("WEB_PAGE_SCREENSHOT", PROJECT_ROOT / "build/tests/web-page.png"))
SCREENSHOT_MAX_BYTES = 300_000


class Console:
    """Everything the page logged at warning level or above, and uncaught exceptions."""

    def __init__(self, page: Page) -> None:
        self.problems: list[str] = []
        page.on("console", self._message)
        page.on("pageerror", lambda error: self.problems.append(f"uncaught: {error}"))

    def _message(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.problems.append(f"{message.type}: {message.text}")

    def assert_clean(self, expected: tuple[str, ...] = ()) -> None:
        unexpected = [p for p in self.problems if not any(e in p for e in expected)]
        assert not unexpected, unexpected


@pytest.fixture(scope="module")
def browser(proxy) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        yield browser
        browser.close()


def open_page(browser: Browser, base_url: str, device: dict) -> tuple[Page, Console]:
    page = browser.new_context(**device, base_url=base_url).new_page()
    console = Console(page)
    page.goto("/")
    return page, console


@pytest.fixture
def desktop(browser: Browser, proxy) -> Iterator[tuple[Page, Console]]:
    page, console = open_page(browser, proxy.base_url, DESKTOP)
    yield page, console
    page.context.close()


def open_photo(page: Page, photo: Photo = PHOTO) -> np.ndarray:
    """Uploads the photo; once the encoder has run, the canvas must show it as it is."""
    upload(page, "#file-input", photo.name, photo.data)
    expect(page.locator("#everything")).to_be_enabled(timeout=60_000)
    shown = canvas_pixels(page, "#view")
    np.testing.assert_array_equal(shown, photo.rgb())
    return shown


def at(page: Page, x: float, y: float) -> tuple[float, float]:
    """The screen position of image pixel (x, y)."""
    box = page.locator("#marks").bounding_box()
    assert box is not None
    width, height = PHOTO_SIZE
    return box["x"] + x / width * box["width"], box["y"] + y / height * box["height"]


def is_segment(response) -> bool:
    return response.url.endswith("/segment-image") and response.request.method == "POST"


def form_field(request: Request, name: str) -> str:
    match = re.search(rf'name="{name}"\r\n\r\n(.*?)\r\n--', request.post_data or "", re.S)
    assert match, f"no {name} in the request"
    return match.group(1)


def best_mask(body: dict, result: int = 0) -> tuple[dict, np.ndarray]:
    record = body["results"][result]["masks"][0]
    return record, decode_rle(record["segmentation"])


def assert_drawn(before: np.ndarray, after: np.ndarray, masks: np.ndarray) -> None:
    """The pixels that changed are the masks' (a blended pixel that happens to equal the
    photo's is the only allowance)."""
    changed = np.any(after != before, axis=-1)
    assert changed.any(), "nothing was drawn"
    assert not (changed & ~masks).any(), "pixels outside the masks changed"
    missed = int((masks & ~changed).sum())
    assert missed <= max(3, masks.sum() // 1000), f"{missed} mask pixels were not drawn"


def wait_for_answer(page: Page, record: dict) -> None:
    """The page shows the answer's best candidate (canvas and panel are drawn together)."""
    text = f"IoU {record['predicted_iou']:.3f} · stability {record['stability_score']:.3f}"
    expect(page.locator("#candidates li").first).to_contain_text(text)


# --- clicking ---------------------------------------------------------------------------------


def test_a_click_draws_its_mask_over_the_photo(desktop) -> None:
    page, console = desktop
    photo = open_photo(page)
    with page.expect_response(is_segment) as answer:
        page.mouse.click(*at(page, 225, 150))
    body = answer.value.json()
    (prompt,) = json.loads(form_field(answer.value.request, "prompts"))
    assert prompt["labels"] == [1] and np.allclose(prompt["points"], [[225, 150]], atol=1)
    assert form_field(answer.value.request, "multimask_output") == "true"
    record, mask = best_mask(body)
    wait_for_answer(page, record)
    assert_drawn(photo, canvas_pixels(page, "#view"), mask)
    candidates = page.locator("#candidates li")
    expect(candidates).to_have_count(3)
    for index, other in enumerate(body["results"][0]["masks"]):
        expect(candidates.nth(index)).to_contain_text(f"IoU {other['predicted_iou']:.3f}")
    expect(page.locator("#timings")).to_contain_text("decoder")
    expect(page.locator("#timings")).to_contain_text("cache hit")
    console.assert_clean()


def test_negative_clicks_refine_a_box_adds_an_object_and_undo_removes_it(desktop) -> None:
    page, console = desktop
    photo = open_photo(page)
    with page.expect_response(is_segment) as answer:
        page.mouse.click(*at(page, 225, 150))
    first, first_mask = best_mask(answer.value.json())
    wait_for_answer(page, first)

    page.keyboard.down("Shift")
    with page.expect_response(is_segment) as answer:
        page.mouse.click(*at(page, 80, 60))
    page.keyboard.up("Shift")
    (prompt,) = json.loads(form_field(answer.value.request, "prompts"))
    assert prompt["labels"] == [1, 0] and prompt["mask_id"] == first["mask_id"]
    assert form_field(answer.value.request, "multimask_output") == "false"
    second, second_mask = best_mask(answer.value.json())
    wait_for_answer(page, second)
    expect(page.locator("#candidates li")).to_have_count(1)
    assert not np.array_equal(first_mask, second_mask), "the negative click changed nothing"
    assert_drawn(photo, canvas_pixels(page, "#view"), second_mask)

    with page.expect_response(is_segment) as answer:
        page.mouse.click(*at(page, 400, 40), button="right")
    (prompt,) = json.loads(form_field(answer.value.request, "prompts"))
    assert prompt["labels"] == [1, 0, 0] and prompt["mask_id"] == second["mask_id"]
    third, object_mask = best_mask(answer.value.json())
    wait_for_answer(page, third)

    page.keyboard.press("n")
    with page.expect_response(is_segment) as answer:
        page.mouse.move(*at(page, 260, 170))
        page.mouse.down()
        page.mouse.move(*at(page, 330, 220), steps=4)
        page.mouse.move(*at(page, 420, 280), steps=4)
        page.mouse.up()
    (prompt,) = json.loads(form_field(answer.value.request, "prompts"))
    assert set(prompt) == {"box"}, "a new object starts from its own prompt"
    assert np.allclose(prompt["box"], [260, 170, 420, 280], atol=1)
    box_record, box_mask = best_mask(answer.value.json())
    wait_for_answer(page, box_record)
    expect(page.locator("#object-count")).to_have_text("2 objects")
    both = canvas_pixels(page, "#view")
    assert_drawn(photo, both, object_mask | box_mask)
    swatches = page.locator("#objects .swatch")
    colours = swatches.evaluate_all("all => all.map(s => getComputedStyle(s).backgroundColor)")
    assert len(set(colours)) == 2, "each object has its own colour"

    page.keyboard.press("Control+z")
    expect(page.locator("#object-count")).to_have_text("1 object")
    assert_drawn(photo, canvas_pixels(page, "#view"), object_mask)
    console.assert_clean()


# --- segment everything and downloads -----------------------------------------------------


def test_segment_everything_shows_the_apis_count_and_downloads_its_masks(
    desktop, http: httpx.Client
) -> None:
    page, console = desktop
    photo = open_photo(page)
    page.locator("#everything-form summary").click()
    for name, value in EVERYTHING.items():
        page.fill(f"#everything-form input[name={name}]", value)
    page.evaluate("document.activeElement.blur()")  # typing in a field is not a shortcut
    with page.expect_response(is_segment) as answer:
        page.keyboard.press("e")
    assert answer.value.request.headers["accept"] == "text/event-stream"
    expect(page.locator("#everything-status")).to_contain_text("Found", timeout=120_000)
    events = [line for line in answer.value.text().splitlines() if line.startswith("event: ")]
    assert events.count("event: progress") >= 2 and events[-1] == "event: result"
    assert page.locator("#everything-progress").evaluate("p => [p.value, p.max]") == [16, 16]

    image_id = json.loads(answer.value.text().rsplit("data: ", 1)[1])["image_id"]
    api = http.post("/segment-image", data={**EVERYTHING, "image_id": image_id}).json()
    count = api["count"]
    assert count > 1
    expect(page.locator("#object-count")).to_have_text(f"{count} objects")
    expect(page.locator("#everything-status")).to_contain_text(f"Found {count} objects")
    masks = [decode_rle(record["segmentation"]) for record in api["masks"]]
    assert_drawn(photo, canvas_pixels(page, "#view"), np.logical_or.reduce(masks))

    with page.expect_download() as download:
        page.click("#download-coco")
    coco = json.loads(Path(download.value.path()).read_text())
    width, height = PHOTO_SIZE
    assert coco["images"] == [{"id": 1, "file_name": PHOTO.name, "width": width, "height": height}]
    annotations = coco["annotations"]
    assert [a["segmentation"] for a in annotations] == [r["segmentation"] for r in api["masks"]]
    assert [a["bbox"] for a in annotations] == [r["bbox"] for r in api["masks"]]

    with page.expect_download() as download:
        page.click("#download-png")
    with zipfile.ZipFile(download.value.path()) as archive:
        names = archive.namelist()
        assert len(names) == count and archive.testzip() is None
        for name, mask in zip(names, masks, strict=True):
            picture = np.asarray(Image.open(io.BytesIO(archive.read(name))).convert("L"))
            np.testing.assert_array_equal(picture > 127, mask)
    console.assert_clean()


# --- errors -------------------------------------------------------------------------------


def test_a_text_file_shows_the_apis_message(desktop, http: httpx.Client) -> None:
    page, console = desktop
    text = b"name,area\ncat,1\n"
    upload(page, "#file-input", "notes.csv", text)
    expected = http.post("/embed-image", files={"file": ("notes.csv", text)}).json()
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_contain_text(expected["detail"])
    expect(error).to_contain_text("unsupported_media_type")
    expect(page.locator("#dropzone")).to_be_visible()
    page.keyboard.press("Escape")
    expect(error).to_be_hidden()
    # The browser reports the 415 answer itself; nothing else may be logged.
    console.assert_clean(expected=("status of 415",))


def test_an_image_the_api_refuses_is_shown_with_the_apis_message(desktop, http) -> None:
    """A GIF: the browser can show it, the service does not take it."""
    page, console = desktop
    buffer = io.BytesIO()
    Image.fromarray(PHOTO.rgb()).save(buffer, "GIF")
    upload(page, "#file-input", "cat.gif", buffer.getvalue())
    expected = http.post("/embed-image", files={"file": ("cat.gif", buffer.getvalue())}).json()
    expect(page.locator("#error")).to_contain_text(expected["detail"])
    expect(page.locator("#canvas-wrap")).to_be_visible()
    expect(page.locator("#everything")).to_be_disabled()
    console.assert_clean(expected=("status of 415",))


# --- sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", [DESKTOP, PHONE], ids=["1280x800", "phone"])
def test_usable_at_desktop_and_phone_sizes(browser: Browser, proxy, device: dict) -> None:
    page, console = open_page(browser, proxy.base_url, device)
    try:
        photo = open_photo(page)
        width = device["viewport"]["width"]
        assert page.evaluate("document.documentElement.scrollWidth") <= width, "scrolls sideways"
        image = page.locator("#marks").bounding_box()
        assert image is not None and image["x"] >= 0 and image["x"] + image["width"] <= width
        assert image["width"] >= 0.8 * min(width, PHOTO_SIZE[0]), "the image is shown large enough"
        for control in ("#mode-remove + span", "#undo", "#everything", "#download-coco"):
            target = page.locator(control)
            target.scroll_into_view_if_needed()
            box = target.bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width, control

        press = page.touchscreen.tap if device.get("has_touch") else page.mouse.click
        page.locator("#marks").scroll_into_view_if_needed()
        with page.expect_response(is_segment) as answer:
            press(*at(page, 225, 150))
        record, mask = best_mask(answer.value.json())
        wait_for_answer(page, record)
        assert_drawn(photo, canvas_pixels(page, "#view"), mask)

        page.locator("#mode-remove + span").click()  # no shift key on a phone
        page.locator("#marks").scroll_into_view_if_needed()
        with page.expect_response(is_segment) as answer:
            press(*at(page, 80, 60))
        (prompt,) = json.loads(form_field(answer.value.request, "prompts"))
        assert prompt["labels"] == [1, 0]
        console.assert_clean()
    finally:
        page.context.close()


# --- the README's screenshot ------------------------------------------------------------------


def test_the_readme_screenshot_is_the_real_page(desktop) -> None:
    """`make screenshot` runs this with WEB_PAGE_SCREENSHOT=docs/web-page.png."""
    page, console = desktop
    photo = open_photo(page)
    with page.expect_response(is_segment) as answer:
        page.mouse.click(*at(page, 150, 140))
    wait_for_answer(page, best_mask(answer.value.json())[0])
    page.keyboard.press("n")
    with page.expect_response(is_segment) as answer:
        page.mouse.move(*at(page, 270, 160))
        page.mouse.down()
        page.mouse.move(*at(page, 420, 280), steps=4)
        page.mouse.up()
    wait_for_answer(page, best_mask(answer.value.json())[0])
    assert not np.array_equal(canvas_pixels(page, "#view"), photo)
    picture = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
    assert picture.size == (1280, 800)
    # A 64-colour palette keeps the picture small enough to commit (the random-weight masks
    # are noise, which PNG cannot compress).
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    picture.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(SCREENSHOT, optimize=True)
    assert SCREENSHOT.stat().st_size <= SCREENSHOT_MAX_BYTES
    console.assert_clean()


# --- the page's files, in process ----------------------------------------------------------


@pytest.fixture
def client() -> Iterator[TestClient]:
    app = create_app(Settings(), lambda settings, metrics: StandInGateway())
    with TestClient(app) as client:
        yield client


def test_the_page_and_its_files_are_served_locally(client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "unsafe" not in policy
    local = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert local and all(url.startswith("/") for url in local), local
    for url in local:
        assert client.get(url).status_code == 200, url
    static = PROJECT_ROOT / "proxy" / "static"
    for path in static.iterdir():
        text = path.read_text().replace("http://www.w3.org/2000/svg", "")  # a name, not a fetch
        assert not re.search(r"https?://", text), f"{path.name} reaches out"
        imports = re.findall(r'from "([^"]+)"', path.read_text())
        assert all((static / name).is_file() for name in imports), imports
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert "/" not in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200
    assert client.get("/no-such-page").headers["content-type"] == "application/problem+json"
