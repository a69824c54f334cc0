"""Bounded work, cancellation and bounded memory against the real proxy and Triton.

Triton's own statistics are the witness that work stops: its decoder inference count stops
rising once a request is abandoned (the client left, or its deadline passed).
"""

from __future__ import annotations

import concurrent.futures
import io
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from common.settings import Settings
from testkit.processes import ServerProcess, proxy_process

from .conftest import BUILD
from .test_proxy_api import assert_problem, png_bytes

# A segment-everything run of ~32 decoder calls (a couple of minutes on 2 cores).
LONG_RUN = {"points_per_side": "32", "points_per_batch": "32", "pred_iou_thresh": "0"}


def inference_count(triton_client, model: str) -> int:
    stats = triton_client.get_inference_statistics(model)["model_stats"][0]
    return int(stats["inference_count"])


def settle(triton_client, model: str, quiet_s: float = 4.0, limit_s: float = 60.0) -> int:
    """The count once it has not moved for `quiet_s` (the calls in flight have finished)."""
    deadline = time.monotonic() + limit_s
    count, since = inference_count(triton_client, model), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = inference_count(triton_client, model)
        if now != count:
            count, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return count
    raise AssertionError(f"{model} kept working for {limit_s} s")


def metric(base_url: str, name: str, labels: str) -> float:
    for line in httpx.get(f"{base_url}/metrics").text.splitlines():
        if line.startswith(f"{name}{{{labels}}}"):
            return float(line.split()[-1])
    return 0.0


def test_a_run_over_the_prompt_limit_is_refused_before_any_work(http, triton_client, settings):
    before = inference_count(triton_client, settings.encoder_model)
    response = http.post(
        "/segment-image",
        data={"points_per_side": "64", "crop_n_layers": "3"},
        files={"file": ("a.png", png_bytes(seed=40))},
    )
    body = assert_problem(response, 422, "too_much_work")
    assert body["prompts"] == 64 * 64 * (1 + 4 + 16 + 64)
    assert body["limit"] == settings.max_everything_prompts
    assert str(body["prompts"]) in body["detail"]
    assert inference_count(triton_client, settings.encoder_model) == before


def test_upstream_defaults_with_a_crop_layer_pass_the_cost_check(http) -> None:
    # An empty file: the request gets as far as the upload, past the cost check.
    response = http.post(
        "/segment-image",
        data={"points_per_side": "32", "crop_n_layers": "1"},
        files={"file": ("a.png", b"")},
    )
    assert_problem(response, 422, "empty_file")


def test_a_client_that_leaves_stops_its_triton_calls(proxy, triton_client, settings) -> None:
    model = settings.decoder_model
    before = settle(triton_client, model)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after a few decoder calls
        httpx.post(
            f"{proxy.base_url}/segment-image",
            data=LONG_RUN,
            files={"file": ("a.png", png_bytes(seed=41))},
            timeout=httpx.Timeout(60, read=8),
        )
    at_disconnect = inference_count(triton_client, model)
    after = settle(triton_client, model)
    # At most the calls already in flight (two per crop) finish; the ~30 others never start.
    assert after - at_disconnect <= 2, (before, at_disconnect, after)
    assert after - before < 16
    assert metric(proxy.base_url, "proxy_requests_abandoned_total", 'reason="client_disconnect"')


@pytest.fixture(scope="module")
def hurried_proxy(settings: Settings, triton_server) -> ServerProcess:
    with proxy_process(
        settings, BUILD / "logs" / "proxy-deadline.log", {"REQUEST_TIMEOUT_S": "6"}
    ) as process:
        yield process


def test_past_its_deadline_a_request_is_a_504_and_its_work_stops(
    hurried_proxy, triton_client, settings
) -> None:
    model = settings.decoder_model
    before = settle(triton_client, model)
    started = time.monotonic()
    response = httpx.post(
        f"{hurried_proxy.base_url}/segment-image",
        data=LONG_RUN,
        files={"file": ("a.png", png_bytes(seed=42))},
        timeout=120,
    )
    elapsed = time.monotonic() - started
    body = assert_problem(response, 504, "deadline_exceeded")
    assert body["limit_s"] == 6
    at_deadline = inference_count(triton_client, model)
    after = settle(triton_client, model)
    assert after - at_deadline <= 2, (before, at_deadline, after)
    assert after - before < 16
    assert elapsed < 60, "the answer came at the deadline, not after the whole run"


# --- memory: admission of large uploads ---------------------------------------------------------


def jpeg_of(width: int, height: int, seed: int) -> bytes:
    """A photograph-sized JPEG: smooth colour fields (compresses like a photo) plus noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 64 + 1, width // 64 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split(f"{field}:")[1].split()[0]) / 1024


BUDGET_MB = 160


@pytest.fixture(scope="module")
def thrifty_proxy(settings: Settings, triton_server) -> ServerProcess:
    env = {
        "MAX_IMAGE_BYTES_IN_FLIGHT": str(BUDGET_MB * 1024 * 1024),
        "ADMISSION_WAIT_S": "0.5",
    }
    with proxy_process(settings, BUILD / "logs" / "proxy-thrifty.log", env) as process:
        yield process


def test_concurrent_large_uploads_are_admitted_within_the_memory_budget(thrifty_proxy) -> None:
    """12 concurrent 12-megapixel uploads (~115 MB each while decoded, 36 MB after): some
    wait or are refused with 503, none fails otherwise, and the proxy's memory stays within its
    budget."""
    photos = [jpeg_of(4000, 3000, seed) for seed in range(12)]
    # Prompts far outside the picture: each upload is decoded (its size is needed to check
    # them), then refused before any inference, so the test costs decoding only.
    far = '[{"points": [[1e7, 1e7]]}]'
    pid = thrifty_proxy.process.pid
    httpx.get(f"{thrifty_proxy.base_url}/healthz")
    base = rss_mb(pid)

    def upload(data: bytes) -> httpx.Response:
        return httpx.post(
            f"{thrifty_proxy.base_url}/segment-image",
            data={"prompts": far},
            files={"file": ("photo.jpg", data)},
            timeout=120,
        )

    with concurrent.futures.ThreadPoolExecutor(len(photos)) as pool:
        responses = list(pool.map(upload, photos))
    codes = [(r.status_code, r.json()["code"]) for r in responses]
    assert set(codes) <= {(422, "coordinate_out_of_range"), (503, "overloaded")}, codes
    assert (422, "coordinate_out_of_range") in codes
    for response in responses:
        if response.status_code == 503:
            assert int(response.headers["retry-after"]) > 0
    peak = rss_mb(pid, "VmHWM")
    time.sleep(1)
    idle = rss_mb(pid)
    print(f"proxy RSS: base {base:.0f} MB, peak {peak:.0f} MB, idle after {idle:.0f} MB")
    # The budget, plus the uploads still being parsed (~1 MB each) and allocator slack.
    assert peak - base < BUDGET_MB + 60, (base, peak)
    assert idle - base < 60, "freed memory goes back to the system"
