"""The assembled promptable model (SAM-Med3D family)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .config import SamMed3DConfig
from .image_encoder import ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PromptEncoder3D


class SamMed3D(nn.Module):
    """``image_encoder``, ``prompt_encoder`` and ``mask_decoder`` with the published state-dict names.

    Typical use is ``embedding = model.image_encoder(image)`` once per region, then
    ``model.predict_low_res(embedding, points, labels, previous_logits)`` per click.
    """

    def __init__(self, config: SamMed3DConfig) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoderViT3D(config)
        self.prompt_encoder = PromptEncoder3D(config)
        self.mask_decoder = MaskDecoder3D(config)
        self.description = f"SAM-Med3D-family model ({config.name})"

    def predict_low_res(self, image_embedding: torch.Tensor, points: Optional[torch.Tensor],
                        labels: Optional[torch.Tensor], mask_logits: Optional[torch.Tensor]) -> torch.Tensor:
        """Low-res logits (B, 1, S/4, S/4, S/4) for one prompt step.

        points (B, N, 3) voxel coordinates in the input's (a, b, c) order, labels (B, N) with 1 include,
        0 exclude, -1 padding; points None = a mask-only step. mask_logits: previous low-res logits
        (zeros at the first step, as the reference does).
        """
        return self.predict_low_res_with_iou(image_embedding, points, labels, mask_logits)[0]

    def predict_low_res_with_iou(self, image_embedding: torch.Tensor, points: Optional[torch.Tensor],
                                 labels: Optional[torch.Tensor], mask_logits: Optional[torch.Tensor]):
        """``(logits (B, 1, S/4, S/4, S/4), predicted IoU (B, 1))`` for one prompt step, as
        :meth:`predict_low_res`. ``B`` prompts may share one image embedding (batch 1): the decoder repeats
        it. The IoU head of the released SAM-Med3D checkpoints was never trained (docs/automatic.md)."""
        sparse, dense = self.prompt_encoder(points, labels, mask_logits, batch_size=image_embedding.shape[0])
        return self.mask_decoder(image_embedding, self.prompt_encoder.get_dense_pe(), sparse, dense)

    def forward(self, image: torch.Tensor, points: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                mask_logits: Optional[torch.Tensor]) -> torch.Tensor:
        return self.predict_low_res(self.image_encoder(image), points, labels, mask_logits)


def build_sam_med3d(config: Optional[SamMed3DConfig] = None) -> SamMed3D:
    """Build a randomly initialised model (``SamMed3DConfig.vit_b_ori()`` by default).

    When ``config.adapter`` is set the adapters are inserted (models/adapters.py), so that merged
    fine-tuned checkpoints rebuild the exact architecture they were saved from.
    """
    config = config or SamMed3DConfig.vit_b_ori()
    model = SamMed3D(config)
    if config.adapter:
        from ..adapters import apply_adapters

        apply_adapters(model, config.adapter)
    return model
