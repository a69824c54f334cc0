"""The contract between the proxy and the Triton models: names, tensors, labels, shapes.

The export writes graphs with these tensor names, `model_repository/*/config.pbtxt` declares
them to Triton (a test checks the running server reports the same), and the proxy and the
benchmarks build requests from them. Sizes that Triton can report (the encoder's input side)
are asked of Triton at run time; the constants here are for the places it cannot be asked.
"""

from __future__ import annotations

from typing import Final

ENCODER_MODEL: Final = "mobilesam_encoder"
DECODER_MODEL: Final = "mobilesam_decoder"

# --- encoder: padded uint8 image -> image embedding -----------------------------------------
IMAGES: Final = "images"  # [B, S, S, 3] uint8, resized so the longest side is S, zero-padded
INPUT_SIZE: Final = "input_size"  # [B, 2] int32 (height, width) before padding
IMAGE_EMBEDDINGS: Final = "image_embeddings"  # [B, 256, 64, 64] float32
ENCODER_INPUTS: Final = (IMAGES, INPUT_SIZE)
ENCODER_OUTPUTS: Final = (IMAGE_EMBEDDINGS,)

# --- decoder: one image's embedding and all its prompts -> low-resolution mask logits -------
POINT_COORDS: Final = "point_coords"  # [B, P, N, 2] float32 (x, y) in the S x S frame
POINT_LABELS: Final = "point_labels"  # [B, P, N] float32, values below
MASK_INPUT: Final = "mask_input"  # [B, M, 1, 256, 256] float32, M = 1 (broadcast) or P
HAS_MASK_INPUT: Final = "has_mask_input"  # [B, M] float32, 1 where that mask input is used
LOW_RES_MASKS: Final = "low_res_masks"  # [B, P, 4, 256, 256] float32 logits
IOU_PREDICTIONS: Final = "iou_predictions"  # [B, P, 4] float32
DECODER_INPUTS: Final = (IMAGE_EMBEDDINGS, POINT_COORDS, POINT_LABELS, MASK_INPUT, HAS_MASK_INPUT)
DECODER_OUTPUTS: Final = (LOW_RES_MASKS, IOU_PREDICTIONS)

# Point labels, upstream's convention (`PromptEncoder._embed_points`).
FOREGROUND_LABEL: Final = 1
BACKGROUND_LABEL: Final = 0
PADDING_LABEL: Final = -1  # the point upstream appends to prompts without a box
BOX_TOP_LEFT_LABEL: Final = 2
BOX_BOTTOM_RIGHT_LABEL: Final = 3

# Shapes fixed by the MobileSAM architecture.
EMBEDDING_SHAPE: Final = (256, 64, 64)
LOW_RES_SIDE: Final = 256  # side of the decoder's mask logits and of its mask input
MASK_TOKENS: Final = 4  # token 0: the single-mask answer; 1..3: the multimask answers


# The most prompts the proxy sends in one decoder call (segment-everything's points_per_batch
# goes up to it); Triton's shared memory is sized for it (serving/shared_memory.py).
MAX_PROMPTS_PER_DECODER_CALL: Final = 256
# The encoder's square input side; the proxy asks Triton for it, this is the default where
# no server can be asked (tests, the PyTorch baseline, offline tools).
DEFAULT_IMAGE_SIDE: Final = 1024


def decoder_output_bytes(prompts: int) -> int:
    """The decoder's answer for `prompts` prompts: float32 logits and a score per mask token."""
    return prompts * MASK_TOKENS * (LOW_RES_SIDE * LOW_RES_SIDE + 1) * 4
