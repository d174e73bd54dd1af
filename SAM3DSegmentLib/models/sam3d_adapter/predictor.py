"""Predictor API of the 3DSAM-adapter for the inference engine: encode a crop once, decode every click.

Axis conventions (exactly):

* ``crop``: a float tensor (1, 1, S, S, S), S = ``config.image_size`` (128 for the published model), the
  128³ crop at 1 mm already clipped to the dataset's HU window and z-normalised, indexed [0, 0, d, h, w]
  — D is the slice axis, the same (D, H, W) order as the engine's crop arrays.
* ``points_dhw``: (N, 3) (or (1, N, 3)) continuous voxel coordinates of the crop in (d, h, w) order; the
  centre of voxel crop[..., d, h, w] is (d, h, w). Every point is a foreground point: this model family has
  no exclude (background) clicks and no previous-mask input, so each decode uses all the points given.
* ``decode`` returns (S, S, S) foreground logits indexed [d, h, w] on the crop: the two-class output's
  ``logit[1] - logit[0]``, so ``sigmoid`` of it is the softmax foreground probability and ``> 0`` is the
  mask.

``encode`` runs the 3D encoder and the click-independent part of the decoder (levels 0-2 and the image
branch of its fusion conv) once; ``decode`` then runs only the prompt encoder, decoder level 3 and the
rest. The result equals the model's full forward pass up to float rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from .model import Sam3DAdapter


@dataclass
class Sam3DAdapterFeatures:
    """What ``encode`` computes for one crop (the caller caches it): the 4 encoder features (1, 256, g, g, g)
    (depth last), the crop itself and the click-independent pre-norm fusion term (1, 128, S/2, S/2, S/2)."""
    features: List[torch.Tensor]
    crop: torch.Tensor
    static: torch.Tensor

    @property
    def nbytes(self) -> int:
        tensors = list(self.features) + [self.crop, self.static]
        return sum(t.numel() * t.element_size() for t in tensors)


class Sam3DAdapterPredictor:
    def __init__(self, model: Sam3DAdapter, device: Optional[torch.device] = None) -> None:
        self.model = model.eval()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)
        self.size = model.config.image_size

    def _check_crop(self, crop: torch.Tensor) -> torch.Tensor:
        s = self.size
        if not torch.is_tensor(crop) or tuple(crop.shape) != (1, 1, s, s, s):
            shape = tuple(crop.shape) if torch.is_tensor(crop) else type(crop).__name__
            raise ValueError(f"the 3DSAM-adapter encodes one (1, 1, {s}, {s}, {s}) crop at 1 mm; got {shape}")
        if not crop.is_floating_point():
            raise ValueError(f"the crop must be a normalised float tensor, got {crop.dtype}")
        return crop.to(self.device, torch.float32)

    def _check_points(self, points_dhw) -> torch.Tensor:
        p = torch.as_tensor(points_dhw, dtype=torch.float32, device=self.device)
        if p.dim() == 2:
            p = p[None]
        if p.dim() != 3 or p.shape[0] != 1 or p.shape[-1] != 3 or p.shape[1] == 0:
            raise ValueError(f"points_dhw must be (N, 3) crop voxel coordinates (d, h, w) with N >= 1; got shape "
                             f"{tuple(p.shape)}")
        lo, hi = -0.5, self.size - 0.5
        if not torch.isfinite(p).all() or (p < lo).any() or (p > hi).any():
            raise ValueError(f"points_dhw must lie inside the {self.size}³ crop ({lo} .. {hi} in voxels); got "
                             f"{p[0].tolist()}")
        return p

    @torch.inference_mode()
    def encode(self, crop: torch.Tensor) -> Sam3DAdapterFeatures:
        crop = self._check_crop(crop)
        features = self.model.image_encoder(crop)
        static = self.model.mask_decoder.static_part(features, crop)
        return Sam3DAdapterFeatures(features=features, crop=crop, static=static)

    @torch.inference_mode()
    def decode(self, features: Sam3DAdapterFeatures, points_dhw) -> torch.Tensor:
        p = self._check_points(points_dhw)
        logits = self.model.decode(features.features, features.crop, p, static=features.static)
        return (logits[0, 1] - logits[0, 0]).float()
