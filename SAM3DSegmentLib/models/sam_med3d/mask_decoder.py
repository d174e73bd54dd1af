"""Mask decoder: a two-way transformer between prompt tokens and the image embedding, then upscaling
to (B, 1, S/4, S/4, S/4) low-res logits. Only mask token 0 was trained by the released recipe."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..common import MLP, LayerNorm3d, MLPBlock, interleave_blocks, patchwise_conv_transpose
from .config import SamMed3DConfig


class DownscaleAttention(nn.Module):
    """Multi-head attention whose q/k/v projections may shrink the width by ``downsample_rate``."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.internal_dim = embedding_dim // downsample_rate
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(self._heads(self.q_proj(q)), self._heads(self.k_proj(k)),
                                             self._heads(self.v_proj(v)))
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


class TwoWayAttentionBlock3D(nn.Module):
    """SAM's two-way attention block. ``token_to_image=False`` skips the tokens' cross-attention to the image
    (its weights stay, unused: the 3DSAM-adapter's prompt encoder)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, downsample: int, skip_first_layer_pe: bool,
                 token_to_image: bool = True):
        super().__init__()
        self.token_to_image = token_to_image
        self.self_attn = DownscaleAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = DownscaleAttention(dim, num_heads, downsample)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = DownscaleAttention(dim, num_heads, downsample)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries, keys, query_pe, key_pe):
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        k = keys + key_pe
        if self.token_to_image:
            queries = queries + self.cross_attn_token_to_image(queries + query_pe, k, keys)
        queries = self.norm2(queries)
        queries = self.norm3(queries + self.mlp(queries))
        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer3D(nn.Module):
    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int, downsample: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock3D(dim, num_heads, mlp_dim, downsample, skip_first_layer_pe=(i == 0))
            for i in range(depth))
        self.final_attn_token_to_image = DownscaleAttention(dim, num_heads, downsample)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image_embedding, image_pe, point_embedding):
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        attn = self.final_attn_token_to_image(queries + point_embedding, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn), keys


class MaskDecoder3D(nn.Module):
    def __init__(self, config: SamMed3DConfig) -> None:
        super().__init__()
        c = config
        dim = c.prompt_embed_dim
        self.transformer = TwoWayTransformer3D(c.decoder_depth, dim, c.decoder_num_heads, c.decoder_mlp_dim,
                                               c.decoder_attention_downsample)
        self.num_mask_tokens = c.num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm3d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose3d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(dim, c.iou_head_hidden_dim, self.num_mask_tokens, c.iou_head_depth)

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor, sparse_prompt_embeddings: torch.Tensor,
                dense_prompt_embeddings: torch.Tensor, num_masks: int = 1,
                multimask_output: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns low-res logits (B, num_masks, s, s, s) of the first ``num_masks`` mask tokens and the IoU
        predictions (B, num_masks). ``num_masks=1`` is the released models' single-mask output.

        ``multimask_output`` is the reference's switch (for its keyword call): False gives the first mask,
        True the other mask tokens' masks (the reference's ``slice(1, None)``)."""
        if multimask_output is not None:
            if not multimask_output:
                num_masks = 1
            else:
                masks, iou_pred = self.forward(image_embeddings, image_pe, sparse_prompt_embeddings,
                                               dense_prompt_embeddings, num_masks=self.num_mask_tokens)
                return masks[:, 1:], iou_pred[:, 1:]
        tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        b = sparse_prompt_embeddings.shape[0]
        tokens = torch.cat([tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings], dim=1)
        src = image_embeddings
        if src.shape[0] != b:
            src = torch.repeat_interleave(src, b // src.shape[0], dim=0)
        src = src + dense_prompt_embeddings
        pos = image_pe.expand(b, -1, -1, -1, -1) if image_pe.shape[0] != b else image_pe
        _, c, x, y, z = src.shape
        hs, keys = self.transformer(src, pos, tokens)
        mask_tokens_out = hs[:, 1:1 + num_masks, :]
        hyper_in = torch.stack([self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :])
                                for i in range(num_masks)], dim=1)               # (B, M, C/8)
        masks = self._upscale_and_project(keys.reshape(b, x, y, z, c), hyper_in)
        iou_pred = self.iou_prediction_head(hs[:, 0, :])[:, :num_masks]
        return masks, iou_pred

    def _upscale_and_project(self, keys_cl: torch.Tensor, hyper_in: torch.Tensor) -> torch.Tensor:
        """``hyper_in · output_upscaling(keys)`` computed channels-last.

        Both transposed convolutions have kernel == stride, so each is one matmul per voxel; the
        hypernetwork projection is applied before the 2x2x2 blocks of the last layer are interleaved, so
        only the (B, M, 4X, 4Y, 4Z) result is ever rearranged. Same maths as the nn.Sequential.
        """
        up1, ln, act1, up2, act2 = self.output_upscaling
        h = interleave_blocks(patchwise_conv_transpose(keys_cl, up1))          # (B, 2X, 2Y, 2Z, C/4)
        h = act1(F.layer_norm(h, (h.shape[-1],), ln.weight, ln.bias, ln.eps))
        blocks = act2(patchwise_conv_transpose(h, up2))                          # (B, 2X, 2Y, 2Z, C/8, 2, 2, 2)
        b, x2, y2, z2, c8 = blocks.shape[:5]
        proj = torch.einsum("bxyzcpqr,bmc->bmxyzpqr", blocks, hyper_in)
        return proj.permute(0, 1, 2, 5, 3, 6, 4, 7).reshape(b, hyper_in.shape[1], 2 * x2, 2 * y2, 2 * z2)
