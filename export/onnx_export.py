"""Write the encoder and decoder ONNX files into the model repository, idempotently.

Each model version folder gets `model.onnx` and `export.json` (checkpoint SHA-256, opset,
library versions, verification figures). A later run with the same checkpoint and the same
export format finds both and does nothing.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import onnx
import torch

from common import contract
from export.branching import FOLD_FIRST_LAYER_UP_TO_PROMPTS, select_by_prompts
from export.graphs import DecoderGraph, EncoderGraph, batch_agnostic_tinyvit
from export.manifest import EXPORT_FORMAT_VERSION

OPSET = 17


@contextmanager
def quiet_tracing() -> Iterator[None]:
    """Silence the tracer's known, reviewed warnings about upstream code.

    The TorchScript exporter is deliberate: upstream SAM exports this way, it handles the
    decoder's mask broadcast (M = 1 or P) that torch.export specialises away, and its encoder
    graph ran faster under ONNX Runtime here. Its warnings concern Python-side constants
    (asserts, `math.sqrt` of a fixed head size) that are constant for every input we accept.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        warnings.filterwarnings("ignore", message="The feature will be removed")
        yield


def library_versions() -> dict[str, str]:
    names = ["torch", "onnx", "onnxruntime", "mobilesam-mirror", "timm"]
    return {name: metadata.version(name) for name in names}


def export_encoder(sam, path: Path) -> None:
    graph = EncoderGraph(sam).eval()
    size = sam.image_encoder.img_size
    images = torch.zeros((1, size, size, 3), dtype=torch.uint8)
    input_size = torch.tensor([[size, size]], dtype=torch.int32)
    with batch_agnostic_tinyvit(), quiet_tracing(), torch.no_grad():
        torch.onnx.export(
            graph,
            (images, input_size),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=list(contract.ENCODER_INPUTS),
            output_names=list(contract.ENCODER_OUTPUTS),
            dynamic_axes={
                name: {0: "batch"} for name in contract.ENCODER_INPUTS + contract.ENCODER_OUTPUTS
            },
        )


def export_decoder(sam, path: Path) -> None:
    """Trace the decoder with its first layer folded and shared, and join the two under an If
    on the prompt count (`export.branching`, `FOLD_FIRST_LAYER_UP_TO_PROMPTS`)."""
    with tempfile.TemporaryDirectory() as folder:
        traced = {}
        for share in (False, True):
            traced[share] = Path(folder) / f"decoder-share-{share}.onnx"
            _trace_decoder(DecoderGraph(sam, share_first_layer=share).eval(), traced[share])
        model = select_by_prompts(
            few=onnx.load(str(traced[False])),
            many=onnx.load(str(traced[True])),
            up_to_prompts=FOLD_FIRST_LAYER_UP_TO_PROMPTS,
        )
    onnx.save(model, str(path))


def _trace_decoder(graph: DecoderGraph, path: Path) -> None:
    channels = graph.prompt_encoder.embed_dim
    height, width = graph.prompt_encoder.image_embedding_size
    mask_side = 4 * height
    batch, prompts, points = 1, 2, 3
    example = (
        torch.randn(batch, channels, height, width),
        torch.rand(batch, prompts, points, 2) * graph.image_size,
        torch.ones(batch, prompts, points),
        torch.zeros(batch, 1, 1, mask_side, mask_side),
        torch.zeros(batch, 1),
    )
    axes = {
        contract.IMAGE_EMBEDDINGS: {0: "batch"},
        contract.POINT_COORDS: {0: "batch", 1: "prompts", 2: "points"},
        contract.POINT_LABELS: {0: "batch", 1: "prompts", 2: "points"},
        contract.MASK_INPUT: {0: "batch", 1: "masks"},
        contract.HAS_MASK_INPUT: {0: "batch", 1: "masks"},
        contract.LOW_RES_MASKS: {0: "batch", 1: "prompts"},
        contract.IOU_PREDICTIONS: {0: "batch", 1: "prompts"},
    }
    with quiet_tracing(), torch.no_grad():
        torch.onnx.export(
            graph,
            example,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=list(contract.DECODER_INPUTS),
            output_names=list(contract.DECODER_OUTPUTS),
            dynamic_axes=axes,
        )


def build_manifest(checkpoint_sha256: str, checkpoint_source: str, verification: dict) -> dict:
    return {
        "export_format_version": EXPORT_FORMAT_VERSION,
        "checkpoint_sha256": checkpoint_sha256,
        "checkpoint_source": checkpoint_source,
        "opset": OPSET,
        "libraries": library_versions(),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "verification": verification,
    }
