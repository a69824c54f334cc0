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
import math
from collections.abc import Iterator

import torch
from mobile_sam.modeling import Sam, tiny_vit_sam
from mobile_sam.modeling.transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer
from torch import nn

from common import contract


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


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, X, N, C] -> [B, X, heads, N, C / heads] (upstream `_separate_heads`, one axis more)."""
    x = x.reshape(x.shape[0], x.shape[1], x.shape[2], num_heads, x.shape[3] // num_heads)
    return x.transpose(2, 3)


def attend(attention: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Upstream `Attention.forward` on [B, X, N, C] inputs whose X axes broadcast.

    X is the prompt axis (P) on one side and the image's mask axis (M, usually 1) on the other,
    so the image-side projections run once per image instead of once per prompt.
    """
    q = _heads(attention.q_proj(q), attention.num_heads)
    k = _heads(attention.k_proj(k), attention.num_heads)
    v = _heads(attention.v_proj(v), attention.num_heads)
    attn = q @ k.transpose(3, 4)
    attn = attn / math.sqrt(q.shape[-1])
    attn = torch.softmax(attn, dim=-1)
    out = (attn @ v).transpose(2, 3).flatten(3)
    return attention.out_proj(out)


def first_layer(
    block: TwoWayAttentionBlock,
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_pe: torch.Tensor,
    key_pe: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream `TwoWayAttentionBlock.forward` (first layer: `skip_first_layer_pe`) for
    queries [B, P, T, C] and keys [B, M, HW, C], M = 1 or P.

    Until this layer's end the image tokens are the same for every prompt without a mask
    input, so their projections (k and v of token->image, q of image->token attention:
    about a fifth of the decoder's arithmetic) are computed once per image. The keys it
    returns differ per prompt: [B, P, HW, C].
    """
    flat = queries.flatten(0, 1)
    queries = block.self_attn(q=flat, k=flat, v=flat).reshape(queries.shape)
    queries = block.norm1(queries)
    attn_out = attend(block.cross_attn_token_to_image, queries + query_pe, keys + key_pe, keys)
    queries = block.norm2(queries + attn_out)
    queries = block.norm3(queries + block.mlp(queries))
    attn_out = attend(block.cross_attn_image_to_token, keys + key_pe, queries + query_pe, queries)
    keys = block.norm4(keys + attn_out)
    return queries, keys


def two_way_transformer(
    transformer: TwoWayTransformer,
    keys: torch.Tensor,
    image_pe: torch.Tensor,
    point_embedding: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream `TwoWayTransformer.forward` with the first layer shared per image.

    keys [B, M, HW, C] (image tokens plus dense prompt embedding), image_pe [1, HW, C],
    point_embedding [B, P, T, C] -> queries [B * P, T, C], keys [B * P, HW, C].
    """
    first, *rest = transformer.layers
    if not first.skip_first_layer_pe:
        raise ValueError("expected upstream's two-way transformer (first layer without pe)")
    queries, keys = first_layer(first, point_embedding, keys, point_embedding, image_pe)
    queries, keys = queries.flatten(0, 1), keys.flatten(0, 1)
    point_embedding = point_embedding.flatten(0, 1)
    for layer in rest:
        queries, keys = layer(queries=queries, keys=keys, query_pe=point_embedding, key_pe=image_pe)
    attn_out = transformer.final_attn_token_to_image(
        q=queries + point_embedding, k=keys + image_pe, v=keys
    )
    queries = transformer.norm_final_attn(queries + attn_out)
    return queries, keys


class DecoderGraph(nn.Module):
    """Embeddings [B] + prompts [B, P] -> low-res mask logits and IoU for all 4 mask tokens.

    Shapes (B images, P prompts per image, N points per prompt, M = 1 or P masks per image):
      image_embeddings [B, 256, 64, 64]
      point_coords     [B, P, N, 2]  in the 1024 frame; boxes are two corners labelled 2 and 3
      point_labels     [B, P, N]     1 foreground, 0 background, -1 padding, 2/3 box corners
      mask_input       [B, M, 1, 256, 256]  previous low-res logits; M = 1 broadcasts
      has_mask_input   [B, M]        1 where that mask input is used (M = 1: by every prompt)
    Outputs:
      low_res_masks    [B, P, 4, 256, 256]  token 0 is the single-mask output, 1..3 multimask
      iou_predictions  [B, P, 4]

    Point and mask embedding are `SamOnnxModel._embed_points` / `_embed_masks`; the rest is
    `MaskDecoder.predict_masks`, with the embedding broadcast over prompts instead of
    `repeat_interleave`d, so that B > 1 is possible, and the transformer's first layer
    computing its image-side projections once per image and mask input (`first_layer`).
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
        padding = labels == contract.PADDING_LABEL
        embedding = embedding * ~padding
        embedding = embedding + self.prompt_encoder.not_a_point_embed.weight * padding
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
        has_mask = has_mask_input.reshape(batch, masks_per_image, 1, 1, 1)
        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, 1, channels, 1, 1)
        dense = has_mask * mask_embedding + (1 - has_mask) * no_mask  # [B, M, C, H, W]

        src = image_embeddings.unsqueeze(1) + dense
        keys = src.flatten(3).transpose(2, 3)  # [B, M, HW, C]
        image_pe = self.prompt_encoder.get_dense_pe().flatten(2).transpose(1, 2)  # [1, HW, C]

        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1)
        tokens = torch.cat((output_tokens, sparse), dim=1)
        tokens = tokens.reshape(batch, prompts, tokens.shape[1], channels)

        hs, src = two_way_transformer(decoder.transformer, keys, image_pe, tokens)
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
