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
from mobile_sam.modeling.common import LayerNorm2d
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
    """[..., N, C] -> [..., heads, N, C / heads]: upstream `_separate_heads` on any leading axes."""
    x = x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)
    return x.transpose(-3, -2)


def _per_head(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """A projection's weight [internal, C] -> [heads, internal / heads, C]."""
    return weight.reshape(num_heads, weight.shape[0] // num_heads, weight.shape[1])


def attend(attention: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Upstream `Attention.forward` on [B, X, N, C] inputs whose X axes broadcast.

    X is the prompt axis (P) on one side and the image's mask axis (M, usually 1) on the other,
    so the image-side projections run once per image instead of once per prompt.
    """
    q = _heads(attention.q_proj(q), attention.num_heads)
    k = _heads(attention.k_proj(k), attention.num_heads)
    v = _heads(attention.v_proj(v), attention.num_heads)
    attn = q @ k.transpose(-1, -2)
    attn = attn / math.sqrt(q.shape[-1])
    attn = torch.softmax(attn, dim=-1)
    out = (attn @ v).transpose(-3, -2).flatten(-2)
    return attention.out_proj(out)


def _image_to_token_output(
    attention: Attention, weights: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """`out_proj(concat_h(weights_h @ v_h))` as `weights @ (v_h @ out_proj_h)`.

    weights [..., HW, heads * T] (the image tokens' attention over the T prompt tokens, heads
    side by side), tokens [..., T, C]. Upstream projects 4096 rows from 128 to 256 channels per
    prompt; here the 8 x T value rows are projected instead, and each image token mixes
    8 x T (56 for one click) ready-made 256-channel rows. Each head's weights sum to 1, so
    the output bias rides on the value rows (bias / heads each) instead of costing a pass
    over the 4096 x 256 output per prompt.
    """
    heads = attention.num_heads
    v = _heads(attention.v_proj(tokens), heads)  # [..., heads, T, d]
    out_weight = _per_head(attention.out_proj.weight.transpose(0, 1), heads)  # [heads, d, C]
    values = (v @ out_weight).flatten(-3, -2)  # [..., heads * T, C]
    return weights @ (values + attention.out_proj.bias / heads)


def image_to_token(
    attention: Attention,
    image_with_pe: torch.Tensor,
    tokens_with_pe: torch.Tensor,
    tokens: torch.Tensor,
) -> torch.Tensor:
    """Upstream `attention(q=image_with_pe, k=tokens_with_pe, v=tokens)` for image tokens that
    differ per prompt ([N, HW, C] against [N, T, C]).

    The query projection is folded into the few keys: q_h . k_h = x W_q,h^T k_h + b_q,h . k_h,
    so the 4096 image rows meet 8 x T folded keys of 256 channels instead of being projected
    to 128 channels first, and the output is `_image_to_token_output`. The 1 / sqrt(d) scale
    is applied to the few keys and offsets, not to the 4096 x 8T scores.
    """
    heads = attention.num_heads
    k = _heads(attention.k_proj(tokens_with_pe), heads)  # [..., heads, T, d]
    k = k / math.sqrt(k.shape[-1])
    q_weight = _per_head(attention.q_proj.weight, heads)  # [heads, d, C]
    q_bias = attention.q_proj.bias.reshape(heads, 1, -1)  # [heads, 1, d]
    folded_keys = (k @ q_weight).flatten(-3, -2)  # [..., heads * T, C]
    offsets = (k * q_bias).sum(-1).flatten(-2).unsqueeze(-2)  # [..., 1, heads * T]
    scores = image_with_pe @ folded_keys.transpose(-1, -2) + offsets
    per_head = scores.reshape(*scores.shape[:-1], heads, k.shape[-2])
    weights = torch.softmax(per_head, dim=-1).flatten(-2)
    return _image_to_token_output(attention, weights, tokens)


def token_to_image(
    attention: Attention,
    tokens_with_pe: torch.Tensor,
    image_with_pe: torch.Tensor,
    image: torch.Tensor,
) -> torch.Tensor:
    """Upstream `attention(q=tokens_with_pe, k=image_with_pe, v=image)` for image tokens that
    differ per prompt ([N, T, C] against [N, HW, C]).

    Both image-side projections are folded into the T queries: the scores are
    x (W_k,h^T q_h) (the key bias adds the same number to every image token of a row, which
    softmax removes), and the values are (weights_h @ x) W_v,h^T + b_v,h (weights sum to 1).
    The 4096 image rows then meet 8 x T vectors of 256 channels twice instead of being
    projected twice to 128 channels.
    """
    heads = attention.num_heads
    q = _heads(attention.q_proj(tokens_with_pe), heads)  # [..., heads, T, d]
    folded_queries = (q @ _per_head(attention.k_proj.weight, heads)).flatten(-3, -2)
    scores = folded_queries @ image_with_pe.transpose(-1, -2) / math.sqrt(q.shape[-1])
    weights = torch.softmax(scores, dim=-1)  # [..., heads * T, HW]
    pooled = (weights @ image).reshape(*q.shape[:-1], image.shape[-1])  # [.., heads, T, C]
    v_weight = _per_head(attention.v_proj.weight, heads).transpose(-1, -2)  # [heads, C, d]
    v_bias = attention.v_proj.bias.reshape(heads, 1, -1)
    out = (pooled @ v_weight + v_bias).transpose(-3, -2).flatten(-2)  # [..., T, internal]
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
    input, so their projections (k and v of token->image, q of image->token attention) are
    computed once per image; the image->token output is folded (`_image_to_token_output`).
    The keys it returns differ per prompt: [B, P, HW, C].
    """
    queries = _first_self_attention(block, queries)
    attn_out = attend(block.cross_attn_token_to_image, queries + query_pe, keys + key_pe, keys)
    queries = block.norm2(queries + attn_out)
    queries = block.norm3(queries + block.mlp(queries))

    attention = block.cross_attn_image_to_token
    heads = attention.num_heads
    image_q = _heads(attention.q_proj(keys + key_pe), heads)  # [B, M, heads, HW, d]
    token_k = _heads(attention.k_proj(queries + query_pe), heads)  # [B, P, heads, T, d]
    scores = image_q @ token_k.transpose(-1, -2) / math.sqrt(image_q.shape[-1])
    weights = torch.softmax(scores, dim=-1).transpose(-3, -2).flatten(-2)  # [B, P, HW, 8T]
    keys = block.norm4(keys + _image_to_token_output(attention, weights, queries))
    return queries, keys


def first_layer_per_prompt(
    block: TwoWayAttentionBlock,
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_pe: torch.Tensor,
    key_pe: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`first_layer` with both cross attentions folded into the prompt tokens, as in
    `later_layer`: nothing is projected per image, and each prompt pays two more folded
    products (`export.branching.FOLD_FIRST_LAYER_UP_TO_PROMPTS` says when that pays)."""
    queries = _first_self_attention(block, queries)
    return _folded_cross_attentions(block, queries, keys, query_pe, key_pe)


def later_layer(
    block: TwoWayAttentionBlock,
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_pe: torch.Tensor,
    key_pe: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream `TwoWayAttentionBlock.forward` for per-prompt image tokens [N, HW, C], with both
    cross attentions in their folded forms (`token_to_image`, `image_to_token`)."""
    q = queries + query_pe
    queries = block.norm1(queries + block.self_attn(q=q, k=q, v=queries))
    return _folded_cross_attentions(block, queries, keys, query_pe, key_pe)


def _first_self_attention(block: TwoWayAttentionBlock, queries: torch.Tensor) -> torch.Tensor:
    """The first layer's self attention (`skip_first_layer_pe`: no pe, no residual) on
    queries [B, P, T, C]."""
    flat = queries.flatten(0, 1)
    queries = block.self_attn(q=flat, k=flat, v=flat).reshape(queries.shape)
    return block.norm1(queries)


def _folded_cross_attentions(
    block: TwoWayAttentionBlock,
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_pe: torch.Tensor,
    key_pe: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer after its self attention: token->image attention, MLP, image->token attention,
    both attentions folded (`token_to_image`, `image_to_token`). Keys broadcast over prompts
    ([B, 1, HW, C] against queries [B, P, T, C]) or are per prompt already."""
    keys_with_pe = keys + key_pe
    attn_out = token_to_image(
        block.cross_attn_token_to_image, queries + query_pe, keys_with_pe, keys
    )
    queries = block.norm2(queries + attn_out)
    queries = block.norm3(queries + block.mlp(queries))
    attn_out = image_to_token(
        block.cross_attn_image_to_token, keys_with_pe, queries + query_pe, queries
    )
    return queries, block.norm4(keys + attn_out)


def two_way_transformer(
    transformer: TwoWayTransformer,
    keys: torch.Tensor,
    image_pe: torch.Tensor,
    point_embedding: torch.Tensor,
    share_first_layer: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream `TwoWayTransformer.forward`: the first layer shared per image (or folded, for
    calls with few prompts per image: `share_first_layer=False`), the rest folded.

    keys [B, M, HW, C] (image tokens plus dense prompt embedding), image_pe [1, HW, C],
    point_embedding [B, P, T, C] -> queries [B * P, T, C], keys [B * P, HW, C].

    After the first layer every prompt has its own image tokens, yet each attention there
    pairs 4096 image tokens with only T = 5 + N prompt tokens (7 for one click and its padding
    point). Folding the image-side projections into the prompt side (exact algebra, different
    rounding) turns each 4096 x 256 x 128 projection into a 4096 x 256 x (8 heads x T)
    product, 2.3x fewer operations for one click: with the first layer shared, a prompt of a
    segment-everything call costs 1.7 GFLOP instead of upstream's 3.6
    (`benchmarks/analysis.py`, `decoder_gflop`).
    """
    first, *rest = transformer.layers
    if not first.skip_first_layer_pe:
        raise ValueError("expected upstream's two-way transformer (first layer without pe)")
    layer_one = first_layer if share_first_layer else first_layer_per_prompt
    queries, keys = layer_one(first, point_embedding, keys, point_embedding, image_pe)
    queries, keys = queries.flatten(0, 1), keys.flatten(0, 1)
    point_embedding = point_embedding.flatten(0, 1)
    for layer in rest:
        queries, keys = later_layer(layer, queries, keys, point_embedding, image_pe)
    attn_out = token_to_image(
        transformer.final_attn_token_to_image, queries + point_embedding, keys + image_pe, keys
    )
    queries = transformer.norm_final_attn(queries + attn_out)
    return queries, keys


def _transposed_conv_as_matrix(conv: nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor]:
    """A stride-2, 2x2 transposed convolution as one per-pixel matrix [in, 2 * 2 * out] and its
    bias: its output windows do not overlap, so each input pixel's 2x2 outputs are a linear map
    of that pixel alone, ordered (row offset, column offset, channel)."""
    if tuple(conv.kernel_size) != tuple(conv.stride) or conv.padding != (0, 0):
        raise ValueError("expected upstream's non-overlapping transposed convolutions")
    weight = conv.weight.permute(0, 2, 3, 1).flatten(1)  # [in, kh, kw, out] -> [in, kh*kw*out]
    bias = conv.bias.repeat(conv.kernel_size[0] * conv.kernel_size[1])
    return weight, bias


def upscaled_masks(
    upscaling: nn.Sequential,
    keys: torch.Tensor,
    hyper_in: torch.Tensor,
    height: int,
    width: int,
) -> torch.Tensor:
    """Upstream `output_upscaling` followed by `hyper_in @ upscaled`, channels last.

    keys [N, HW, C] and hyper_in [N, tokens, C / 8] -> masks [N, tokens, 4H, 4W]. Upstream
    transposes the keys to NCHW, runs two transposed convolutions and a channel LayerNorm over
    strided memory; here each transposed convolution is one matrix product on the
    channels-last keys, the LayerNorm a fused one over the last axis, and the pixels are put
    in image order only at the end, on the few mask channels.
    """
    first, norm, first_act, second, second_act = upscaling
    if not isinstance(norm, LayerNorm2d):
        raise ValueError("expected upstream's output upscaling (LayerNorm2d after the first)")
    weight, bias = _transposed_conv_as_matrix(first)
    pixels = keys.shape[0] * keys.shape[1]
    # Two-dimensional products with the bias added in place (one Gemm each, not a MatMul and
    # an Add with an extra buffer per prompt).
    x = torch.addmm(bias, keys.reshape(pixels, keys.shape[2]), weight)  # [N*HW, 2*2*C/4]
    x = x.reshape(pixels * 4, first.out_channels)
    x = first_act(
        nn.functional.layer_norm(x, (norm.weight.shape[0],), norm.weight, norm.bias, norm.eps)
    )
    weight, bias = _transposed_conv_as_matrix(second)
    x = second_act(torch.addmm(bias, x, weight))  # [N*HW*4, 2*2*C/8]
    x = x.reshape(keys.shape[0], -1, second.out_channels)  # [N, HW * 16, C/8]
    masks = hyper_in @ x.transpose(1, 2)  # [N, tokens, HW * 16]
    # Pixels are ordered (h, w, a, b, a2, b2): row 4h + 2a + a2, column 4w + 2b + b2. Two
    # permutations, each moving contiguous runs, cost half of ONNX Runtime's one 7-D transpose.
    planes = masks.shape[0] * masks.shape[1]
    masks = masks.reshape(planes, height, width, 2, 8).transpose(2, 3)  # (h, a, w, b, a2, b2)
    masks = masks.reshape(planes, 2 * height, width, 2, 2, 2).permute(0, 1, 4, 2, 3, 5)
    return masks.reshape(hyper_in.shape[0], hyper_in.shape[1], 4 * height, 4 * width)


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
    `repeat_interleave`d, so that B > 1 is possible; the transformer's first layer computes
    its image-side projections once per image and mask input (`first_layer`; with
    `share_first_layer=False` it folds them into the prompt tokens instead, the cheaper side
    for a single prompt), the later attentions fold them into the prompt tokens
    (`token_to_image`, `image_to_token`), and the upscaling runs channels last
    (`upscaled_masks`). The same arithmetic, reassociated: the export's verification holds
    it to upstream's outputs.
    """

    def __init__(self, sam: Sam, share_first_layer: bool = True) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        self.image_size = sam.image_encoder.img_size
        self.share_first_layer = share_first_layer

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

        hs, src = two_way_transformer(
            decoder.transformer, keys, image_pe, tokens, self.share_first_layer
        )
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : (1 + decoder.num_mask_tokens), :]

        hyper_in = torch.stack(
            [
                decoder.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :])
                for i in range(decoder.num_mask_tokens)
            ],
            dim=1,
        )  # [B * P, tokens, C / 8]
        masks = upscaled_masks(decoder.output_upscaling, src, hyper_in, height, width)
        masks = masks.reshape(batch, prompts, *masks.shape[1:])
        iou = decoder.iou_prediction_head(iou_token_out).reshape(batch, prompts, -1)
        return masks, iou
