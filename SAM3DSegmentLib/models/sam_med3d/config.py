"""Architecture description of a SAM-Med3D-family model (no torch import).

``SamMed3DConfig.vit_b_ori()`` is the published architecture (``sam_med3d.pth``, ``sam_med3d_turbo.pth``);
smaller configs of the same family are used for tests, the embedded demo model and experiments.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Optional, Tuple

ATTENTION_IMPLS = ("fast", "reference")


@dataclass
class SamMed3DConfig:
    # image encoder (ViT-B/16 3D)
    image_size: int = 128
    patch_size: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_mlp_ratio: float = 4.0
    encoder_global_attn_indexes: Tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    # prompt encoder / mask decoder
    prompt_embed_dim: int = 384
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    decoder_mlp_dim: int = 2048
    decoder_attention_downsample: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    # how the window attention is computed (same maths): "fast" (padding-free) or "reference" (padded)
    attention_impl: str = "fast"
    # optional parameter-efficient adapters (see models/adapters.py); None = plain model
    adapter: Optional[Dict[str, Any]] = None
    name: str = "vit_b_ori"

    def __post_init__(self) -> None:
        self.encoder_global_attn_indexes = tuple(int(i) for i in self.encoder_global_attn_indexes)
        problems = []
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.encoder_embed_dim % self.encoder_num_heads:
            problems.append("encoder_embed_dim must be divisible by encoder_num_heads")
        if self.prompt_embed_dim % 3:
            problems.append("prompt_embed_dim must be divisible by 3 (random Fourier PE is sin|cos|sin)")
        if self.image_size % 4:
            problems.append("image_size must be divisible by 4 (low-res logits are image_size/4)")
        internal = self.prompt_embed_dim // self.decoder_attention_downsample
        if internal % self.decoder_num_heads or self.prompt_embed_dim % self.decoder_num_heads:
            problems.append("decoder_num_heads must divide prompt_embed_dim and its downsampled width")
        if self.prompt_embed_dim % 8:
            problems.append("prompt_embed_dim must be divisible by 8 (upscaling to dim/8 channels)")
        if self.mask_in_chans % 4:
            problems.append("mask_in_chans must be divisible by 4")
        if self.attention_impl not in ATTENTION_IMPLS:
            problems.append(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if problems:
            raise ValueError("invalid SAM-Med3D config: " + "; ".join(problems))

    @property
    def grid_size(self) -> int:
        """Token grid side (8 for the published model)."""
        return self.image_size // self.patch_size

    @property
    def low_res_size(self) -> int:
        return self.image_size // 4

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["encoder_global_attn_indexes"] = list(self.encoder_global_attn_indexes)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "SamMed3DConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SAM-Med3D config keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    # ----------------------------------------------------------------- presets
    @classmethod
    def vit_b_ori(cls, **overrides) -> "SamMed3DConfig":
        """The published SAM-Med3D architecture (100.5 M parameters)."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> "SamMed3DConfig":
        """A few-hundred-kB model of the same family for tests (same 128³ input, 8³ tokens, 32³ logits)."""
        base = dict(encoder_embed_dim=48, encoder_depth=4, encoder_num_heads=4,
                    encoder_global_attn_indexes=(1, 3), prompt_embed_dim=48, decoder_num_heads=4,
                    decoder_mlp_dim=96, iou_head_hidden_dim=32, name="tiny")
        base.update(overrides)
        return cls(**base)

    @classmethod
    def small(cls, **overrides) -> "SamMed3DConfig":
        """A few-MB model (demo model size class)."""
        base = dict(encoder_embed_dim=192, encoder_depth=6, encoder_num_heads=6,
                    encoder_global_attn_indexes=(2, 5), prompt_embed_dim=96, decoder_num_heads=4,
                    decoder_mlp_dim=384, iou_head_hidden_dim=64, name="small")
        base.update(overrides)
        return cls(**base)
