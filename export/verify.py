"""Check each exported ONNX model against upstream PyTorch, and fail loudly past tolerance.

The references are upstream's own code paths, not our wrappers: `Sam.preprocess` followed by
the image encoder, and `PromptEncoder` followed by `MaskDecoder.predict_masks`, exactly as
`SamPredictor.predict_torch` calls them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common import contract
from export.errors import VerificationError

# max |onnx - torch| must stay below ABSOLUTE + RELATIVE * max |torch|.
ABSOLUTE_TOLERANCE = 1e-4
RELATIVE_TOLERANCE = 1e-3
ENCODER_BATCH_SIZES = (1, 2, 4)


@dataclass(frozen=True)
class PromptCase:
    name: str
    points: list[tuple[float, float]]
    labels: list[int]
    box: tuple[float, float, float, float] | None = None
    with_mask: bool = False


DECODER_CASES = (
    PromptCase("1 point", [(500.0, 375.0)], [1]),
    PromptCase("2 points", [(500.0, 375.0), (200.0, 100.0)], [1, 0]),
    PromptCase(
        "5 points", [(10, 20), (500, 375), (1000, 700), (64, 900), (333, 444)], [1, 0, 1, 1, 0]
    ),
    PromptCase("box", [], [], box=(100.0, 120.0, 700.0, 650.0)),
    PromptCase("box + points", [(400.0, 400.0), (90.0, 300.0)], [1, 0], box=(50, 60, 800, 900)),
    PromptCase("mask input", [(300.0, 250.0)], [1], with_mask=True),
)


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare_outputs(label: str, actual: np.ndarray, expected: np.ndarray) -> float:
    if actual.shape != expected.shape:
        raise VerificationError(f"{label}: shape {actual.shape} != PyTorch {expected.shape}")
    error = float(np.abs(actual - expected).max())
    bound = ABSOLUTE_TOLERANCE + RELATIVE_TOLERANCE * float(np.abs(expected).max())
    if not error <= bound:
        raise VerificationError(f"{label}: max abs error {error:.3g} exceeds tolerance {bound:.3g}")
    return error


def _test_images(count: int, image_size: int, seed: int) -> list[np.ndarray]:
    """Resized-and-unpadded uint8 images of different aspect ratios."""
    rng = np.random.default_rng(seed)
    shapes = [(image_size, 768), (683, image_size), (image_size, image_size), (576, image_size)]
    return [
        rng.integers(0, 256, (*shapes[i % len(shapes)], 3), dtype=np.uint8) for i in range(count)
    ]


def verify_encoder(sam, onnx_path: Path, seed: int = 0) -> tuple[dict, np.ndarray]:
    """Returns the errors per batch size and the embeddings of the largest batch."""
    session = _session(onnx_path)
    size = sam.image_encoder.img_size
    errors = {}
    embeddings = None
    for batch in ENCODER_BATCH_SIZES:
        images = _test_images(batch, size, seed + batch)
        padded = np.zeros((batch, size, size, 3), dtype=np.uint8)
        for i, image in enumerate(images):
            padded[i, : image.shape[0], : image.shape[1]] = image
        input_size = np.array([image.shape[:2] for image in images], dtype=np.int32)
        (onnx_out,) = session.run(None, {contract.IMAGES: padded, contract.INPUT_SIZE: input_size})
        with torch.no_grad():
            reference = torch.cat(
                [
                    sam.image_encoder(
                        sam.preprocess(torch.as_tensor(image).permute(2, 0, 1)[None].float())
                    )
                    for image in images
                ]
            ).numpy()
        errors[f"batch {batch}"] = compare_outputs(f"encoder batch {batch}", onnx_out, reference)
        embeddings = reference
    return errors, embeddings


def reference_decode(sam, embedding: torch.Tensor, case: PromptCase, mask: torch.Tensor | None):
    points = None
    if case.points:
        points = (
            torch.tensor([case.points], dtype=torch.float32),
            torch.tensor([case.labels], dtype=torch.int64),
        )
    boxes = torch.tensor([case.box], dtype=torch.float32) if case.box else None
    with torch.no_grad():
        sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=mask)
        masks, iou = sam.mask_decoder.predict_masks(
            image_embeddings=embedding,
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )
    return masks.numpy(), iou.numpy()


def decoder_wire_inputs(case: PromptCase) -> tuple[np.ndarray, np.ndarray]:
    """The wire form of one prompt: upstream's padding point, or box corners labelled 2 and 3."""
    coords = [list(p) for p in case.points]
    labels = list(case.labels)
    if case.box:
        coords += [[case.box[0], case.box[1]], [case.box[2], case.box[3]]]
        labels += [contract.BOX_TOP_LEFT_LABEL, contract.BOX_BOTTOM_RIGHT_LABEL]
    else:
        coords.append([0.0, 0.0])
        labels.append(contract.PADDING_LABEL)
    return np.array(coords, dtype=np.float32), np.array(labels, dtype=np.float32)


def verify_decoder(sam, onnx_path: Path, embeddings: np.ndarray, seed: int = 0) -> dict:
    session = _session(onnx_path)
    rng = np.random.default_rng(seed)
    mask_side = 4 * sam.prompt_encoder.image_embedding_size[0]
    errors = {}
    for index, case in enumerate(DECODER_CASES):
        embedding = embeddings[index % len(embeddings)][None]
        mask = None
        mask_input = np.zeros((1, 1, 1, mask_side, mask_side), dtype=np.float32)
        if case.with_mask:
            mask_input = rng.normal(0, 4, mask_input.shape).astype(np.float32)
            mask = torch.as_tensor(mask_input[0])
        coords, labels = decoder_wire_inputs(case)
        masks, iou = session.run(
            None,
            {
                contract.IMAGE_EMBEDDINGS: embedding,
                contract.POINT_COORDS: coords[None, None],
                contract.POINT_LABELS: labels[None, None],
                contract.MASK_INPUT: mask_input,
                contract.HAS_MASK_INPUT: np.full((1, 1), float(case.with_mask), dtype=np.float32),
            },
        )
        ref_masks, ref_iou = reference_decode(sam, torch.as_tensor(embedding), case, mask)
        label = f"decoder {case.name}"
        errors[f"{case.name} masks"] = compare_outputs(f"{label} masks", masks[0], ref_masks)
        errors[f"{case.name} iou"] = compare_outputs(f"{label} iou", iou[0], ref_iou)

    # Two images with three prompts each in one call: the batched layout Triton stacks.
    cases = [PromptCase(c.name, c.points[:1] * 2, c.labels[:1] * 2) for c in DECODER_CASES[:3]]
    wire = [decoder_wire_inputs(case) for case in cases]
    coords = np.stack([np.stack([w[0] for w in wire])] * 2)
    labels = np.stack([np.stack([w[1] for w in wire])] * 2)
    batch_embeddings = embeddings[:2]
    masks, iou = session.run(
        None,
        {
            contract.IMAGE_EMBEDDINGS: batch_embeddings,
            contract.POINT_COORDS: coords,
            contract.POINT_LABELS: labels,
            contract.MASK_INPUT: np.zeros((2, 1, 1, mask_side, mask_side), dtype=np.float32),
            contract.HAS_MASK_INPUT: np.zeros((2, 1), dtype=np.float32),
        },
    )
    for image in range(2):
        for prompt, case in enumerate(cases):
            ref_masks, ref_iou = reference_decode(
                sam, torch.as_tensor(batch_embeddings[image : image + 1]), case, None
            )
            label = f"decoder batch image {image} prompt {prompt}"
            errors[f"batched {image}/{prompt} masks"] = compare_outputs(
                label, masks[image, prompt : prompt + 1], ref_masks
            )
            errors[f"batched {image}/{prompt} iou"] = compare_outputs(
                label, iou[image, prompt : prompt + 1], ref_iou
            )
    return errors
