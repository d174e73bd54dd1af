"""The 3DSAM-adapter family behind the engine's backend interface (numpy in, numpy out).

:class:`Sam3DAdapterBackend` wraps :class:`~SAM3DSegmentLib.models.sam3d_adapter.predictor.Sam3DAdapterPredictor`:
``encode`` runs the 3D encoder and the click-independent part of the decoder once per region (the session
caches the result, sized by its ``nbytes``); every ``decode`` re-runs the prompt encoder and the rest of the
decoder on all the include points inside the region.

What the session reads from it (instead of SAM-Med3D's 1.5 mm / 32³):

* ``image_size`` 128 and ``spacing_mm`` 1.0: the region is a 128³ grid at 1 mm in physical space, placed and
  pasted back by the engine exactly as for SAM-Med3D;
* ``low_res_size`` = ``image_size``: the model returns logits on the full region grid;
* ``intensity``: the HU window and dataset statistics of the input normalisation
  (:class:`~SAM3DSegmentLib.core.intensity.WindowZNorm`);
* ``supports_exclude`` False: the model's points carry no include/exclude label (the session refuses exclude
  clicks); ``supports_mask_prompt`` False: no previous-mask input (every decode sees all the object's points in
  the region).

Axes: the engine's region arrays are ``[a, b, c]`` (a towards R, b towards A, c towards S; see
:mod:`~SAM3DSegmentLib.inference.regions`). The model's crop is ``[d, h, w]`` with ``d`` its slice axis, and its
2D patch embedding runs on the ``d``-slices; this backend gives it ``[d, h, w] = [c, b, a]``, so the 2D SAM
sees axial slices (rows anterior-wards, columns right-wards). Points are reordered the same way and the logits
transposed back.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["Sam3DAdapterBackend", "NO_EXCLUDE_MESSAGE", "LIMITS_NOTICE"]

#: Shown (once) to the user when a model of this family is loaded.
LIMITS_NOTICE = ("3DSAM-adapter model: include clicks only (the model has no exclude clicks) and no "
                 "refinement from the previous mask (each click re-runs the model on all the include clicks "
                 "of the region).")
#: The error for an exclude click.
NO_EXCLUDE_MESSAGE = ("this model (3DSAM-adapter family) has no exclude clicks: its points carry no "
                      "include/exclude label. Use include clicks only, or a SAM-Med3D model for exclude clicks.")


class Sam3DAdapterBackend:
    """Runs a :class:`~SAM3DSegmentLib.models.sam3d_adapter.model.Sam3DAdapter` in this process."""

    family = "3dsam_adapter"
    supports_exclude = False
    supports_mask_prompt = False
    limits_notice = LIMITS_NOTICE

    def __init__(self, model, device: str = "cpu", dtype: str = "float32", name: Optional[str] = None,
                 intensity=None):
        import torch

        from ..core.intensity import WindowZNorm
        from ..models.device import resolve_dtype, tune_cpu_allocator
        from ..models.sam3d_adapter.predictor import Sam3DAdapterPredictor

        self.device = torch.device(device)
        if self.device.type == "cpu":
            tune_cpu_allocator()
        self.dtype = resolve_dtype(dtype, self.device)
        self.predictor = Sam3DAdapterPredictor(model, device=self.device)
        self.model = self.predictor.model
        self.image_size = int(model.config.image_size)
        self.low_res_size = self.image_size
        self.spacing_mm = 1.0
        self.intensity = intensity if intensity is not None else WindowZNorm()
        label = name or getattr(model, "description", "3DSAM-adapter model")
        self.name = f"{label} on {self.device.type} ({str(self.dtype).replace('torch.', '')})"

    def _autocast(self):
        from ..models.device import autocast_for

        return autocast_for(self.device, self.dtype)

    def encode(self, image: np.ndarray):
        """``image`` float32 (S, S, S) ``[a, b, c]``, normalised -> the predictor's features (``.nbytes``)."""
        import torch

        arr = np.asarray(image, dtype=np.float32)
        s = self.image_size
        if arr.shape != (s, s, s):
            raise ValueError(f"the 3DSAM-adapter takes a {s}³ region, got an array of shape {arr.shape}")
        crop = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 1, 0)))[None, None]   # [d, h, w] = [c, b, a]
        with self._autocast():
            return self.predictor.encode(crop)

    def decode(self, embedding, points, labels, mask_logits=None) -> np.ndarray:
        """All include points (``labels == 1``; (N, 3) ``[a, b, c]`` region indices) -> float32 (S, S, S)
        foreground logits ``[a, b, c]``. ``mask_logits`` is ignored (the family has no previous-mask input)."""
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        lab = np.asarray(labels).reshape(-1)
        if lab.shape[0] != pts.shape[0]:
            raise ValueError(f"{pts.shape[0]} points but {lab.shape[0]} labels")
        if (lab == 0).any():
            raise ValueError(NO_EXCLUDE_MESSAGE)
        if pts.shape[0] == 0:
            raise ValueError("the 3DSAM-adapter needs at least one include point inside the region")
        with self._autocast():
            fg = self.predictor.decode(embedding, pts[:, ::-1].copy())       # (d, h, w) = (c, b, a)
        return np.ascontiguousarray(fg.float().cpu().numpy().transpose(2, 1, 0), dtype=np.float32)
