"""The runtime is chosen in config.pbtxt alone: the same model.py and ONNX files, same answers.

The session's Triton serves the committed choice (see model_repository/); this module serves
each model with the other runtime, so both runtimes are checked for both models.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient

from export.verify import DECODER_CASES, compare_outputs, decoder_wire_inputs
from export.verify import reference_decode as upstream_decode
from serving.triton import TritonServer
from testkit.ports import free_port

from .conftest import BUILD
from .test_triton import decoder_inputs, encoder_inputs, upstream_embedding

OTHER_RUNTIME = {"onnxruntime": "openvino", "openvino": "onnxruntime"}


def with_swapped_runtimes(source: Path, target: Path) -> Path:
    """A copy of `source` whose configs select the other runtime; model files are symlinked."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(
        source, target, symlinks=True, ignore=shutil.ignore_patterns("model.onnx", "export.json")
    )
    for config in target.glob("*/config.pbtxt"):
        text = config.read_text()
        text, count = re.subn(
            r'(key: "runtime", value: \{ string_value: )"(\w+)"',
            lambda match: f'{match.group(1)}"{OTHER_RUNTIME[match.group(2)]}"',
            text,
        )
        assert count == 1, f"no runtime parameter in {config}"
        config.write_text(text)
        for name in ("model.onnx", "export.json"):
            (config.parent / "1" / name).symlink_to(source / config.parent.name / "1" / name)
    return target


@pytest.fixture(scope="module")
def swapped_client(model_repository: Path) -> Iterator[httpclient.InferenceServerClient]:
    repository = with_swapped_runtimes(model_repository, BUILD / "model_repository_swapped")
    server = TritonServer(
        repository,
        free_port(),
        free_port(),
        free_port(),
        log_path=BUILD / "logs" / "triton-swapped.log",
        work_dir=BUILD / "triton",
    )
    with server:
        server.wait_ready(180)
        client = httpclient.InferenceServerClient(server.http_url)
        yield client
        client.close()


def test_other_runtime_encoder_matches_pytorch(swapped_client, settings, sam) -> None:
    rng = np.random.default_rng(5)
    images = [
        rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((1024, 700, 3), (600, 1024, 3))
    ]
    result = swapped_client.infer(settings.encoder_model, encoder_inputs(images))
    reference = np.concatenate([upstream_embedding(sam, image) for image in images])
    compare_outputs("swapped-runtime encoder", result.as_numpy("image_embeddings"), reference)


def test_other_runtime_decoder_matches_pytorch(swapped_client, settings, sam) -> None:
    embedding = np.random.default_rng(6).normal(0, 0.5, (1, 256, 64, 64)).astype(np.float32)
    for case in DECODER_CASES[:5]:
        coords, labels = decoder_wire_inputs(case)
        result = swapped_client.infer(
            settings.decoder_model,
            decoder_inputs(embedding, coords[None, None], labels[None, None]),
        )
        ref_masks, ref_iou = upstream_decode(sam, torch.as_tensor(embedding), case, None)
        compare_outputs(
            f"swapped-runtime {case.name}", result.as_numpy("low_res_masks")[0], ref_masks
        )
        compare_outputs(
            f"swapped-runtime {case.name} iou", result.as_numpy("iou_predictions")[0], ref_iou
        )
