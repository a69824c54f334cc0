"""The fast profile, one switch: `PRECISION=bf16 make run` serves both models on OpenVINO at
bf16, and its answers stay close to the default profile's.

The stack here is what `make run` starts (`python -m serving`, testkit's LaunchedStack) with
PRECISION=bf16 in its environment; the reference is the session's default Triton and proxy.
The bounds are the fast profile's own measurements with margin, on the tests' random-init
weights and the real photographs: on a CPU with AVX512-BF16, mask IoU against fp32 was at
least 0.97 (mean 0.98) and predicted IoUs moved by at most 0.002 (BENCHMARKS.md, "The fast
profile's quality"); on a CPU without bf16 arithmetic OpenVINO computes fp32 and the masks
are the default profile's (IoU 1.0).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from common.settings import PROJECT_ROOT, Settings
from proxy.encodings import decode_rle
from testkit.masks import mask_iou
from testkit.photos import photos
from testkit.processes import LaunchedStack, stub_pid

from .conftest import BUILD
from .test_everything import MANY_MASKS
from .test_proxy_parity import prompt_sets

MIN_MASK_IOU = 0.9
MIN_MEAN_IOU = 0.95
MAX_SCORE_DIFFERENCE = 0.02
MIN_EVERYTHING_MATCHED = 0.8  # share of the default profile's masks matched at IoU >= 0.9
MODEL_CODE = PROJECT_ROOT / "model_repository" / "mobilesam_encoder" / "1" / "model.py"


def test_the_models_read_the_settings_variable() -> None:
    """model.py cannot import common/ (it runs in Triton's stub): it restates the name."""
    restated = re.search(r'^PRECISION_VARIABLE = "(\w+)"', MODEL_CODE.read_text(), re.MULTILINE)
    assert restated and restated.group(1).lower() in Settings.model_fields
    assert Settings.model_fields["precision"].default == "fp32"
    assert Settings(precision="bf16").precision == "bf16"
    with pytest.raises(ValueError):
        Settings(precision="fp16")


@pytest.fixture(scope="module")
def fast(model_repository: Path, checkpoint_path: Path) -> Iterator[LaunchedStack]:
    env = {"MOBILESAM_CHECKPOINT": str(checkpoint_path), "PRECISION": "bf16"}
    with LaunchedStack(model_repository, BUILD / "logs" / "make-run-bf16.log", env) as stack:
        yield stack


def test_the_switch_reaches_the_models(fast: LaunchedStack, settings: Settings) -> None:
    """Both stubs inherit PRECISION and run OpenVINO; the default decoder runs ONNX Runtime."""
    for model in (settings.encoder_model, settings.decoder_model):
        stub = stub_pid(fast.triton_pid(), model)
        environment = Path(f"/proc/{stub}/environ").read_bytes().split(b"\0")
        assert b"PRECISION=bf16" in environment, model
        libraries = Path(f"/proc/{stub}/maps").read_text()
        assert "libopenvino_intel_cpu_plugin" in libraries, f"{model} does not run OpenVINO"
        assert "onnxruntime_pybind11_state" not in libraries, f"{model} loaded ONNX Runtime"


def masks_of(base_url: str, photo, prompts: list[dict]) -> list[dict]:
    response = httpx.post(
        f"{base_url}/segment-image",
        data={"prompts": json.dumps(prompts), "multimask_output": "false"},
        files={"file": (photo.name, photo.data)},
        timeout=180,
    )
    assert response.status_code == 200, response.text
    return [result["masks"][0] for result in response.json()["results"]]


def test_prompted_masks_stay_close_to_fp32(fast: LaunchedStack, proxy) -> None:
    ious, score_differences = [], []
    for photo in photos()[:3]:
        width, height = photo.rgb().shape[1::-1]
        prompts = prompt_sets(width, height)["several prompts"]
        reference = masks_of(proxy.base_url, photo, prompts)
        candidate = masks_of(fast.base_url, photo, prompts)
        for ours, theirs in zip(reference, candidate, strict=True):
            iou = mask_iou(decode_rle(ours["segmentation"]), decode_rle(theirs["segmentation"]))
            ious.append(iou)
            score_differences.append(abs(ours["predicted_iou"] - theirs["predicted_iou"]))
    print(
        f"fast vs fp32: IoU mean {np.mean(ious):.4f} min {min(ious):.4f}, "
        f"max score difference {max(score_differences):.2g}"
    )
    assert min(ious) >= MIN_MASK_IOU and np.mean(ious) >= MIN_MEAN_IOU
    assert max(score_differences) <= MAX_SCORE_DIFFERENCE


def everything_masks(base_url: str, photo) -> list[np.ndarray]:
    response = httpx.post(
        f"{base_url}/segment-image",
        data={name: str(value) for name, value in MANY_MASKS.items()},
        files={"file": (photo.name, photo.data)},
        timeout=300,
    )
    assert response.status_code == 200, response.text
    return [decode_rle(mask["segmentation"]) for mask in response.json()["masks"]]


def test_segment_everything_finds_the_fp32_masks(fast: LaunchedStack, proxy) -> None:
    photo = photos()[0]
    reference = everything_masks(proxy.base_url, photo)
    candidate = everything_masks(fast.base_url, photo)
    assert reference, "the settings keep masks with these weights"
    ious = np.array([[mask_iou(a, b) for b in candidate] for a in reference])
    rows, columns = linear_sum_assignment(-ious) if candidate else ([], [])
    matched = int((ious[rows, columns] >= 0.9).sum()) if candidate else 0
    print(f"segment everything: {matched} of {len(reference)} fp32 masks matched")
    assert matched >= MIN_EVERYTHING_MATCHED * len(reference)
    assert abs(len(candidate) - len(reference)) <= (1 - MIN_EVERYTHING_MATCHED) * len(reference)
