"""The real tritonserver on the exported repository, spoken to over HTTP with tritonclient."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from common import contract
from export.verify import DECODER_CASES, PromptCase, compare_outputs, decoder_wire_inputs
from export.verify import reference_decode as upstream_decode
from serving.triton import MALLOC_TUNABLES, with_malloc_tunables
from testkit.processes import rss_mb, stub_peak_rss_mb, stub_pid

IMAGE_SIZE = contract.DEFAULT_IMAGE_SIDE
MASK_SIDE = contract.LOW_RES_SIDE
# An idle decoder stub: the runtime, the graph and its weights (~150 MB measured).
IDLE_STUB_MB = 350


def _input(name: str, array: np.ndarray) -> httpclient.InferInput:
    dtype = {np.uint8: "UINT8", np.int32: "INT32", np.float32: "FP32"}[array.dtype.type]
    tensor = httpclient.InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array, binary_data=True)
    return tensor


def encoder_inputs(images: list[np.ndarray]) -> list[httpclient.InferInput]:
    padded = np.zeros((len(images), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        padded[i, : image.shape[0], : image.shape[1]] = image
    sizes = np.array([image.shape[:2] for image in images], dtype=np.int32)
    return [_input(contract.IMAGES, padded), _input(contract.INPUT_SIZE, sizes)]


def decoder_inputs(
    embeddings: np.ndarray,
    coords: np.ndarray,
    labels: np.ndarray,
    mask_input: np.ndarray | None = None,
    has_mask: np.ndarray | None = None,
) -> list[httpclient.InferInput]:
    batch = labels.shape[0]
    if mask_input is None:
        mask_input = np.zeros((batch, 1, 1, MASK_SIDE, MASK_SIDE), dtype=np.float32)
    if has_mask is None:
        has_mask = np.zeros((batch, mask_input.shape[1]), dtype=np.float32)
    return [
        _input(contract.IMAGE_EMBEDDINGS, embeddings.astype(np.float32)),
        _input(contract.POINT_COORDS, coords.astype(np.float32)),
        _input(contract.POINT_LABELS, labels.astype(np.float32)),
        _input(contract.MASK_INPUT, mask_input.astype(np.float32)),
        _input(contract.HAS_MASK_INPUT, has_mask.astype(np.float32)),
    ]


def upstream_embedding(sam, image: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        tensor = torch.as_tensor(image).permute(2, 0, 1)[None].float()
        return sam.image_encoder(sam.preprocess(tensor)).numpy()


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    """Resized-and-unpadded images of four aspect ratios (what the proxy will send)."""
    rng = np.random.default_rng(7)
    shapes = [(IMAGE_SIZE, 683), (768, IMAGE_SIZE), (IMAGE_SIZE, IMAGE_SIZE), (IMAGE_SIZE, 576)]
    # Smooth images: closer to photographs than white noise, and they exercise the padding.
    out = []
    for height, width in shapes:
        coarse = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3)).astype(np.float32)
        image = np.kron(coarse, np.ones((32, 32, 1)))[:height, :width]
        out.append(np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def reference_embeddings(sam, images) -> np.ndarray:
    return np.concatenate([upstream_embedding(sam, image) for image in images])


def test_both_models_are_ready_on_cpu_with_dynamic_batching(triton_client, settings) -> None:
    assert triton_client.is_server_ready()
    for name in (settings.encoder_model, settings.decoder_model):
        assert triton_client.is_model_ready(name), name
        config = triton_client.get_model_config(name)
        assert config["backend"] == "python"
        assert all(group["kind"] == "KIND_CPU" for group in config["instance_group"])
        assert config["max_batch_size"] > 1
        queue_policy = config["dynamic_batching"]["default_queue_policy"]
        assert int(queue_policy["max_queue_size"]) > 0, "the queue must be bounded"
        threads = int(config["parameters"]["intra_op_threads"]["string_value"])
        instances = sum(group["count"] for group in config["instance_group"])
        assert instances * threads <= 2, "instances x threads must not oversubscribe 2 cores"


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_encoder_matches_pytorch(triton_client, settings, images, reference_embeddings, batch):
    result = triton_client.infer(settings.encoder_model, encoder_inputs(images[:batch]))
    embeddings = result.as_numpy(contract.IMAGE_EMBEDDINGS)
    compare_outputs(f"encoder batch {batch}", embeddings, reference_embeddings[:batch])


@pytest.mark.parametrize("case", DECODER_CASES, ids=lambda case: case.name)
def test_decoder_matches_pytorch(triton_client, settings, sam, reference_embeddings, case):
    embedding = reference_embeddings[:1]
    coords, labels = decoder_wire_inputs(case)
    mask_input = has_mask = mask = None
    if case.with_mask:
        rng = np.random.default_rng(3)
        mask_input = rng.normal(0, 4, (1, 1, 1, MASK_SIDE, MASK_SIDE)).astype(np.float32)
        has_mask = np.ones((1, 1), dtype=np.float32)
        mask = torch.as_tensor(mask_input[0])
    result = triton_client.infer(
        settings.decoder_model,
        decoder_inputs(embedding, coords[None, None], labels[None, None], mask_input, has_mask),
    )
    ref_masks, ref_iou = upstream_decode(sam, torch.as_tensor(embedding), case, mask)
    compare_outputs(contract.LOW_RES_MASKS, result.as_numpy(contract.LOW_RES_MASKS)[0], ref_masks)
    compare_outputs(contract.IOU_PREDICTIONS, result.as_numpy(contract.IOU_PREDICTIONS)[0], ref_iou)


def _grid_clicks(
    rng: np.random.Generator, prompts: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segment-everything style prompts: one foreground click each, with upstream's padding
    point. Returns the clicks [P, 1, 2], coordinates [P, 2, 2] and labels [P, 2]."""
    points = rng.uniform(0, IMAGE_SIZE, (prompts, 1, 2)).astype(np.float32)
    coords = np.concatenate([points, np.zeros((prompts, 1, 2), np.float32)], axis=1)
    labels = np.tile(np.array([1.0, -1.0], np.float32), (prompts, 1))
    return points, coords, labels


def _prompts_per_run(decoder_config: dict) -> int:
    """The most prompts one decoder runtime call gets (config.pbtxt's max_work_per_run)."""
    return int(decoder_config["parameters"]["max_work_per_run"]["string_value"])


def test_decoder_takes_many_prompts_with_one_embedding(
    triton_client, settings, sam, reference_embeddings
):
    """Segment-everything style: one embedding, many single-point prompts, per-prompt masks."""
    rng = np.random.default_rng(11)
    points, coords, labels = _grid_clicks(rng, 24)
    mask_input = rng.normal(0, 4, (1, 24, 1, MASK_SIDE, MASK_SIDE)).astype(np.float32)
    has_mask = (np.arange(24) % 2).astype(np.float32)[None]  # every other prompt uses a mask
    result = triton_client.infer(
        settings.decoder_model,
        decoder_inputs(reference_embeddings[1:2], coords[None], labels[None], mask_input, has_mask),
    )
    masks = result.as_numpy(contract.LOW_RES_MASKS)[0]
    iou = result.as_numpy(contract.IOU_PREDICTIONS)[0]
    assert masks.shape == (24, 4, MASK_SIDE, MASK_SIDE) and iou.shape == (24, 4)
    for prompt in (0, 1, 22, 23):
        case = PromptCase("grid point", [tuple(points[prompt, 0])], [1])
        mask = torch.as_tensor(mask_input[0, prompt : prompt + 1]) if prompt % 2 else None
        ref_masks, ref_iou = upstream_decode(
            sam, torch.as_tensor(reference_embeddings[1:2]), case, mask
        )
        compare_outputs(f"prompt {prompt} masks", masks[prompt : prompt + 1], ref_masks)
        compare_outputs(f"prompt {prompt} iou", iou[prompt : prompt + 1], ref_iou)


def test_a_large_decoder_request_runs_in_bounded_calls(
    triton_server, triton_client, settings, reference_embeddings
):
    """More prompts than one runtime call may take (max_work_per_run): split, same answers,
    bounded memory. Unbounded, the stub would need memory for all of them at once."""
    per_run = _prompts_per_run(triton_client.get_model_config(settings.decoder_model))
    prompts = 3 * per_run + 5
    _, coords, labels = _grid_clicks(np.random.default_rng(12), prompts)
    embedding = reference_embeddings[2:3]
    whole = triton_client.infer(
        settings.decoder_model, decoder_inputs(embedding, coords[None], labels[None])
    )
    for start in range(0, prompts, per_run):  # each part small enough to run unsplit
        part = slice(start, start + per_run)
        alone = triton_client.infer(
            settings.decoder_model,
            decoder_inputs(embedding, coords[None, part], labels[None, part]),
        )
        for name in contract.DECODER_OUTPUTS:
            np.testing.assert_array_equal(whole.as_numpy(name)[0, part], alone.as_numpy(name)[0])
    # ~32 MB per prompt of one call with ONNX Runtime's arena (BENCHMARKS.md, "Decoder
    # memory"), bounded here at 64, plus the runtime and the outputs.
    peak = stub_peak_rss_mb(triton_server.process.pid, settings.decoder_model)
    print(f"decoder stub peak RSS {peak:.0f} MB after {prompts} prompts in one request")
    assert peak < 200 + 64 * per_run + 2 * prompts, f"decoder stub peaked at {peak:.0f} MB"


def test_the_decoder_gives_its_memory_back_once_idle(
    triton_server, triton_client, settings, reference_embeddings
):
    """ONNX Runtime's arena keeps a call's buffers while the model is busy; once it is idle,
    the stub releases them (model.py, IdleTrim)."""
    config = triton_client.get_model_config(settings.decoder_model)
    prompts = _prompts_per_run(config)
    _, coords, labels = _grid_clicks(np.random.default_rng(13), prompts)
    stub = stub_pid(triton_server.process.pid, settings.decoder_model)
    for _ in range(2):
        triton_client.infer(
            settings.decoder_model,
            decoder_inputs(reference_embeddings[:1], coords[None], labels[None]),
        )
    busy = rss_mb(stub)
    deadline = time.monotonic() + 60
    idle = busy
    while time.monotonic() < deadline and idle > IDLE_STUB_MB:
        time.sleep(1)
        idle = rss_mb(stub)
    print(f"decoder stub RSS {busy:.0f} MB right after {prompts}-prompt calls, {idle:.0f} idle")
    assert idle <= IDLE_STUB_MB, f"the idle decoder stub kept {idle:.0f} MB"
    if config["parameters"].get("memory_arena", {}).get("string_value") == "true":
        assert busy > IDLE_STUB_MB, "the arena should hold the calls' buffers until idle"


def test_the_models_allocate_with_transparent_huge_pages(triton_server, settings) -> None:
    """Both stubs inherit the malloc tunables serving/triton.py gives Triton."""
    for model in (settings.encoder_model, settings.decoder_model):
        stub = stub_pid(triton_server.process.pid, model)
        environment = Path(f"/proc/{stub}/environ").read_bytes().split(b"\0")
        tunables = [e for e in environment if e.startswith(b"GLIBC_TUNABLES=")]
        assert tunables and MALLOC_TUNABLES.encode() in tunables[0], model


def test_a_users_own_malloc_tunables_are_kept() -> None:
    assert with_malloc_tunables("") == MALLOC_TUNABLES
    assert with_malloc_tunables("glibc.malloc.arena_max=2") == (
        f"{MALLOC_TUNABLES}:glibc.malloc.arena_max=2"
    )
    assert with_malloc_tunables("glibc.malloc.hugetlb=0") == "glibc.malloc.hugetlb=0"


def _model_counts(client, model: str) -> tuple[int, int]:
    stats = client.get_inference_statistics(model)["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


def test_encoder_batches_concurrent_requests(triton_server, triton_client, settings, images):
    inferences_before, executions_before = _model_counts(triton_client, settings.encoder_model)
    requests = 6  # below max_queue_size, so none is rejected
    pending = [
        triton_client.async_infer(settings.encoder_model, encoder_inputs([images[i % 4]]))
        for i in range(requests)
    ]
    for request in pending:
        assert request.get_result().as_numpy(contract.IMAGE_EMBEDDINGS).shape == (1, 256, 64, 64)
    inferences, executions = _model_counts(triton_client, settings.encoder_model)
    assert inferences - inferences_before == requests
    assert executions - executions_before < requests, "dynamic batching did not batch"


def test_decoder_batches_concurrent_requests(triton_client, settings, reference_embeddings):
    inferences_before, executions_before = _model_counts(triton_client, settings.decoder_model)
    coords, labels = decoder_wire_inputs(DECODER_CASES[1])
    requests = 16
    pending = [
        triton_client.async_infer(
            settings.decoder_model,
            decoder_inputs(
                reference_embeddings[i % 4 : i % 4 + 1], coords[None, None], labels[None, None]
            ),
        )
        for i in range(requests)
    ]
    singles = [request.get_result().as_numpy(contract.IOU_PREDICTIONS) for request in pending]
    inferences, executions = _model_counts(triton_client, settings.decoder_model)
    assert inferences - inferences_before == requests
    assert executions - executions_before < requests, "dynamic batching did not batch"
    # Batched results are the same as each request's own.
    alone = triton_client.infer(
        settings.decoder_model,
        decoder_inputs(reference_embeddings[:1], coords[None, None], labels[None, None]),
    ).as_numpy(contract.IOU_PREDICTIONS)
    np.testing.assert_allclose(singles[0], alone, atol=1e-5)


def test_overload_is_rejected_quickly_not_queued_forever(
    triton_server, triton_client, settings, images
):
    config = triton_client.get_model_config(settings.encoder_model)
    limit = int(config["dynamic_batching"]["default_queue_policy"]["max_queue_size"])
    burst = limit + 2 * config["max_batch_size"] + 6
    # As many connections as requests, so that the whole burst reaches the server at once; the
    # accepted ones (a queue and two batches of images) take minutes on a busy machine.
    burst_client = httpclient.InferenceServerClient(
        triton_server.http_url, concurrency=burst, network_timeout=600
    )
    inputs = encoder_inputs([images[0]])
    pending = [burst_client.async_infer(settings.encoder_model, inputs) for _ in range(burst)]
    rejected = 0
    for request in pending:
        try:
            request.get_result()
        except InferenceServerException as exc:
            assert "queue" in str(exc).lower(), exc
            assert exc.status() == "503", "the proxy reads 503 as 'retry later'"
            rejected += 1
    burst_client.close()
    assert rejected > 0, "a burst past max_queue_size must be rejected"
    assert triton_client.is_model_ready(settings.encoder_model)


def test_malformed_request_is_an_error_not_a_crash(triton_client, settings) -> None:
    coords = np.zeros((1, 1, 3, 2), dtype=np.float32)
    labels = np.ones((1, 1, 2), dtype=np.float32)  # 2 labels for 3 points
    embeddings = np.zeros((1, 256, 64, 64), dtype=np.float32)
    with pytest.raises(InferenceServerException):
        triton_client.infer(settings.decoder_model, decoder_inputs(embeddings, coords, labels))
    assert triton_client.is_model_ready(settings.decoder_model)
    assert triton_client.is_server_ready()


def test_metrics_endpoint_serves_inference_metrics(triton_server, triton_client, settings):
    # Make sure both models have served at least one request in this session.
    coords, labels = decoder_wire_inputs(DECODER_CASES[0])
    embeddings = np.zeros((1, 256, 64, 64), dtype=np.float32)
    triton_client.infer(
        settings.decoder_model, decoder_inputs(embeddings, coords[None, None], labels[None, None])
    )
    with urllib.request.urlopen(triton_server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    for model in (settings.encoder_model, settings.decoder_model):
        for metric in (
            "nv_inference_request_success",
            "nv_inference_count",
            "nv_inference_exec_count",
            "nv_inference_queue_duration_us",
        ):
            assert any(
                line.startswith(metric) and f'model="{model}"' in line for line in text.splitlines()
            ), f"{metric} for {model}"
