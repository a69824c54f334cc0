"""The two graphs we export, written as thin wrappers around upstream `mobile_sam` modules.

Upstream's own ONNX path (`mobile_sam.utils.onnx.SamOnnxModel`) exports one prompt set for one
image and upsamples inside the graph. We need different contracts for Triton:

* the encoder takes uint8 pixels (3 MB on the wire, not 12) and any batch size, so Triton's
  dynamic batcher can stack requests;
* the decoder takes many prompts per image and several images per batch, sends each 4 MB
  embedding once, and returns low-resolution logits; upsampling is the proxy's job.

The arithmetic is upstream's, step for step, so outputs match `SamPredictor`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from mobile_sam.modeling import Sam, tiny_vit_sam
from torch import nn


def _batch_agnostic_patch_merging_forward(self: tiny_vit_sam.PatchMerging, x: torch.Tensor):
    """Upstream `PatchMerging.forward` with `len(x)` replaced by `x.shape[0]`.

    `len(x)` is a Python int at trace time, so exporters bake the example batch size into the
    reshape and the graph fails at any other batch size.
    """
    if x.ndim == 3:
        height, width = self.input_resolution
        x = x.view(x.shape[0], height, width, -1).permute(0, 3, 1, 2)
    x = self.act(self.conv1(x))
    x = self.act(self.conv2(x))
    x = self.conv3(x)
    return x.flatten(2).transpose(1, 2)


@contextlib.contextmanager
def batch_agnostic_tinyvit() -> Iterator[None]:
    """Temporarily make TinyViT traceable at a symbolic batch size."""
    original = tiny_vit_sam.PatchMerging.forward
    tiny_vit_sam.PatchMerging.forward = _batch_agnostic_patch_merging_forward
    try:
        yield
    finally:
        tiny_vit_sam.PatchMerging.forward = original


class EncoderGraph(nn.Module):
    """uint8 NHWC padded images + their unpadded sizes -> image embeddings.

    Mirrors `Sam.preprocess`: normalise, then zero the padding. Upstream pads *after*
    normalising, so padded pixels are 0 in normalised space; a uint8 wire format cannot carry
    that value, hence the explicit `input_size` and the mask.
    """

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder
        self.register_buffer("pixel_mean", sam.pixel_mean.reshape(1, 3, 1, 1).clone())
        self.register_buffer("pixel_std", sam.pixel_std.reshape(1, 3, 1, 1).clone())

    def forward(self, images: torch.Tensor, input_size: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(torch.float32)
        x = (x - self.pixel_mean) / self.pixel_std
        rows = torch.arange(x.shape[2], device=x.device).reshape(1, -1, 1)
        cols = torch.arange(x.shape[3], device=x.device).reshape(1, 1, -1)
        heights = input_size[:, 0].reshape(-1, 1, 1)
        widths = input_size[:, 1].reshape(-1, 1, 1)
        inside = (rows < heights) & (cols < widths)
        x = x * inside.unsqueeze(1).to(x.dtype)
        return self.image_encoder(x)


class DecoderGraph(nn.Module):
    """Embeddings [B] + prompts [B, P] -> low-res mask logits and IoU for all 4 mask tokens.

    Shapes (B images, P prompts per image, N points per prompt, M = 1 or P masks per image):
      image_embeddings [B, 256, 64, 64]
      point_coords     [B, P, N, 2]  in the 1024 frame; boxes are two corners labelled 2 and 3
      point_labels     [B, P, N]     1 foreground, 0 background, -1 padding, 2/3 box corners
      mask_input       [B, M, 1, 256, 256]  previous low-res logits; M = 1 broadcasts
      has_mask_input   [B, P]        1 where that prompt uses its mask input
    Outputs:
      low_res_masks    [B, P, 4, 256, 256]  token 0 is the single-mask output, 1..3 multimask
      iou_predictions  [B, P, 4]

    Point and mask embedding are `SamOnnxModel._embed_points` / `_embed_masks`; the rest is
    `MaskDecoder.predict_masks`, with the embedding broadcast over prompts instead of
    `repeat_interleave`d, so that B > 1 is possible.
    """

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        self.image_size = sam.image_encoder.img_size

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        coords = (coords + 0.5) / self.image_size
        embedding = self.prompt_encoder.pe_layer._pe_encoding(coords)
        labels = labels.unsqueeze(-1).expand_as(embedding)
        embedding = embedding * (labels != -1)
        embedding = embedding + self.prompt_encoder.not_a_point_embed.weight * (labels == -1)
        for i in range(self.prompt_encoder.num_point_embeddings):
            embedding = embedding + self.prompt_encoder.point_embeddings[i].weight * (labels == i)
        return embedding

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        decoder = self.mask_decoder
        batch, prompts, points = point_labels.shape
        channels, height, width = image_embeddings.shape[1:]

        sparse = self._embed_points(
            point_coords.reshape(-1, points, 2), point_labels.reshape(-1, points)
        )  # [B*P, N, C]

        masks_per_image = mask_input.shape[1]
        mask_embedding = self.prompt_encoder.mask_downscaling(
            mask_input.reshape(-1, 1, mask_input.shape[-2], mask_input.shape[-1])
        ).reshape(batch, masks_per_image, channels, height, width)
        has_mask = has_mask_input.reshape(batch, prompts, 1, 1, 1)
        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, 1, channels, 1, 1)
        dense = has_mask * mask_embedding + (1 - has_mask) * no_mask  # [B, P, C, H, W]

        src = (image_embeddings.unsqueeze(1) + dense).reshape(-1, channels, height, width)
        pos_src = self.prompt_encoder.get_dense_pe().expand(src.shape[0], -1, -1, -1)

        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1)
        tokens = torch.cat((output_tokens, sparse), dim=1)

        hs, src = decoder.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : (1 + decoder.num_mask_tokens), :]

        src = src.transpose(1, 2).reshape(-1, channels, height, width)
        upscaled = decoder.output_upscaling(src)
        hyper_in = torch.stack(
            [
                decoder.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :])
                for i in range(decoder.num_mask_tokens)
            ],
            dim=1,
        )
        up_channels, up_height, up_width = upscaled.shape[1:]
        masks = hyper_in @ upscaled.reshape(-1, up_channels, up_height * up_width)
        masks = masks.reshape(batch, prompts, decoder.num_mask_tokens, up_height, up_width)
        iou = decoder.iou_prediction_head(iou_token_out).reshape(batch, prompts, -1)
        return masks, iou
