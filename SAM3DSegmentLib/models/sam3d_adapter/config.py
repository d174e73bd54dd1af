"""Architecture description of a 3DSAM-adapter model (Gong et al., MedIA 2024, arXiv 2306.13465); no torch import.

``Sam3DAdapterConfig.vit_b()`` is the published architecture: the 2D SAM ViT-B made 3D. ``tiny()`` is a
miniature of the same family for tests (same code paths, every dimension shrunk).

Layout conventions used throughout the family (see ``predictor.py`` for the user-facing ones):

* the model input crop is (B, 1, D, H, W), ``D`` the slice axis;
* the token grid and every 3D feature map inside the encoder, prompt encoder and decoder is laid out
  (H, W, D) — tokens (B, H, W, D, C), feature maps (B, C, H, W, D) — i.e. depth LAST. An "in-plane"
  (axial) kernel is therefore (3, 3, 1), an in-plane pool (2, 2, 1).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Tuple

ADAPTER_KINDS = ("original", "dualpath")


@dataclass
class Sam3DAdapterConfig:
    # input: crop side at 1 mm, upsampled by ``upsample`` before the 2D patch embedding
    image_size: int = 128
    upsample: int = 4
    patch_size: int = 16
    # ViT-B encoder
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 8            # 3D attention windows of window_size³ tokens
    shift_size: int = 4             # Swin-style shift on the shifted blocks
    shifted_blocks: Tuple[int, ...] = (0, 2, 4, 6, 8, 10)
    # the 2D SAM the encoder starts from: its token grid side (pos_embed), its window side and global blocks
    # (the latter two only decide the lengths of the reused rel-pos tables: 2*14-1 = 27 and 2*64-1 = 127)
    sam_grid_size: int = 64
    sam_window_size: int = 14
    sam_global_blocks: Tuple[int, ...] = (2, 5, 8, 11)
    # the blocks whose outputs feed the 4 neck heads (blocks 3, 6, 9, 12 counted from 1)
    neck_blocks: Tuple[int, ...] = (2, 5, 8, 11)
    neck_dim: int = 256
    # per-block adapter: "original" (Linear-ReLU-DWConv3d-ReLU-Linear-ReLU) or "dualpath"
    adapter: str = "original"
    adapter_dim: int = 384
    # prompt encoder (points, no labels): random-Fourier PE, global queries, two-way transformer
    prompt_dim: int = 256
    num_global_queries: int = 10
    prompt_depth: int = 2
    prompt_heads: int = 8
    prompt_mlp_dim: int = 2048
    prompt_attention_downsample: int = 2
    # multi-level decoder
    decoder_dim: int = 128
    num_classes: int = 2
    name: str = "3dsam_adapter_vit_b"

    def __post_init__(self) -> None:
        for key in ("shifted_blocks", "sam_global_blocks", "neck_blocks"):
            setattr(self, key, tuple(int(i) for i in getattr(self, key)))
        problems = []
        g = self.grid_size
        if (self.image_size * self.upsample) % self.patch_size:
            problems.append(f"image_size*upsample ({self.image_size * self.upsample}) is not a multiple of "
                            f"patch_size {self.patch_size}")
        if g % self.window_size:
            problems.append(f"the token grid side {g} is not a multiple of window_size {self.window_size}")
        if not 0 <= self.shift_size < self.window_size:
            problems.append(f"shift_size must be in [0, window_size), got {self.shift_size}")
        if self.embed_dim % self.num_heads:
            problems.append("embed_dim must be divisible by num_heads")
        if self.sam_grid_size % g:
            problems.append(f"sam_grid_size {self.sam_grid_size} must be a multiple of the token grid side {g} "
                            "(the 2D pos_embed is average-pooled to it)")
        if (len(self.neck_blocks) != 4 or any(not 0 <= i < self.depth for i in self.neck_blocks)
                or list(self.neck_blocks) != sorted(set(self.neck_blocks))):
            problems.append(f"neck_blocks must name 4 increasing blocks in [0, {self.depth}), got {self.neck_blocks}")
        if any(not 0 <= i < self.depth for i in self.shifted_blocks + self.sam_global_blocks):
            problems.append("shifted_blocks and sam_global_blocks must be block indexes")
        if self.adapter not in ADAPTER_KINDS:
            problems.append(f"adapter must be one of {ADAPTER_KINDS}, got {self.adapter!r}")
        if self.adapter == "dualpath" and g % 2:
            problems.append("the DualPath adapter pools the token grid 2x in-plane: the grid side must be even")
        if self.prompt_dim % 2:
            problems.append("prompt_dim must be even (random Fourier PE is sin|cos)")
        internal = self.prompt_dim // self.prompt_attention_downsample
        if self.prompt_dim % self.prompt_heads or internal % self.prompt_heads:
            problems.append("prompt_heads must divide prompt_dim and its downsampled width")
        if self.image_size % 2:
            problems.append("image_size must be even (the decoder works at half resolution)")
        if problems:
            raise ValueError("invalid 3DSAM-adapter config: " + "; ".join(problems))

    # ------------------------------------------------------------------ derived sizes
    @property
    def grid_size(self) -> int:
        """Token grid side: 128*4/16 = 32 for the published model."""
        return self.image_size * self.upsample // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def rel_pos_length(self) -> int:
        """Entries every rel-pos table is resized to at run time: 2*window-1 = 15."""
        return 2 * self.window_size - 1

    def sam_rel_pos_length(self, block: int) -> int:
        """Stored length of block ``block``'s rel-pos tables (as in the 2D SAM): 127 on its global blocks, else 27."""
        side = self.sam_grid_size if block in self.sam_global_blocks else self.sam_window_size
        return 2 * side - 1

    # ------------------------------------------------------------------ presets
    @classmethod
    def vit_b(cls, **overrides: Any) -> "Sam3DAdapterConfig":
        """The published 3DSAM-adapter (2D SAM ViT-B start point, 128³ crops)."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> "Sam3DAdapterConfig":
        """A miniature for tests: 32³ crop -> 128³ upsampled -> 8³ tokens, 4 blocks, 4³ windows shifted by 2."""
        base = dict(image_size=32, upsample=4, patch_size=16, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.0,
                    window_size=4, shift_size=2, shifted_blocks=(0, 2), sam_grid_size=16, sam_window_size=4,
                    sam_global_blocks=(1, 3), neck_blocks=(0, 1, 2, 3), neck_dim=16, adapter_dim=8,
                    prompt_dim=16, num_global_queries=3, prompt_depth=2, prompt_heads=2, prompt_mlp_dim=32,
                    prompt_attention_downsample=2, decoder_dim=8, name="3dsam_adapter_tiny")
        base.update(overrides)
        return cls(**base)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        for key in ("shifted_blocks", "sam_global_blocks", "neck_blocks"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Sam3DAdapterConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown 3DSAM-adapter config keys {unknown}; known: {sorted(known)}")
        return cls(**data)
