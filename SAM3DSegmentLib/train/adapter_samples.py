"""Training samples of the 3DSAM-adapter recipes (``model.family: 3dsam_adapter``) and the input normalisation.

The cases come from the same preprocessing cache as SAM-Med3D training (:mod:`.data`), at 1 mm: arrays in
(a, b, c) = RAS-canonical order. A sample is a crop in the MODEL's order ``[d, h, w] = [c, b, a]`` (slices along
S, exactly what :class:`~SAM3DSegmentLib.inference.backends_sam3d_adapter.Sam3DAdapterBackend` feeds the model
at inference), its binary label, and its points in that order (continuous voxel indices, centres at integers).

Per sample (every random choice keyed by ``(seed, epoch, index)``): target ``index % n``; with probability
``positive_fraction`` the crop is centred on one of its foreground voxels, else on any voxel of the volume
(positive : negative = 2 : 1); zoom (probability ``zoom_p``, factor in ``zoom``: a crop of side S / factor
resized to S, linear for the image, nearest for the label), rot90 in the axial plane, flips, an intensity shift
in +-``hu_shift`` HU, then the window clip and z-normalisation (:class:`~SAM3DSegmentLib.core.intensity.
WindowZNorm`; outside the volume: the window's low end, as at inference). Points: ``fg_points`` drawn from the
crop's foreground (with replacement when it is smaller; from anywhere when it is empty) and ``any_points``
from anywhere in the crop. Validation samples: the crop centred on the target's box, no augmentation, the
points drawn with a fixed seed per target.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import numpy as np

from ..core.intensity import WindowZNorm
from ..core.interp import resize
from ..eval.reference_pipeline import reference_crop_or_pad
from .adapter_config import Sam3DAdapterTrainConfig
from .data import CachedCase, Target
from .samples import _CaseStore

__all__ = ["dataset_intensity", "AdapterSamples", "FOREGROUND_PERCENTILES"]

#: The HU window computed from the training foreground: these percentiles of its voxels.
FOREGROUND_PERCENTILES = (0.5, 99.5)
_MAX_VOXELS_PER_CASE = 200_000


def dataset_intensity(cases: Sequence[CachedCase], targets: Sequence[Target], s: Sam3DAdapterTrainConfig,
                      start: Optional[WindowZNorm] = None, seed: int = 0) -> WindowZNorm:
    """The normalisation of a run: the config's ``window``/``mean``/``std`` where given, else the start file's
    (``start``), else computed from the training targets' foreground voxels (at most 200 000 per case, drawn
    with a fixed seed): window = their 0.5 / 99.5 percentiles, mean/std after clipping to it."""
    if (s.mean is None) != (s.std is None):
        from .config import ConfigError

        raise ConfigError("sam3d_adapter.mean and sam3d_adapter.std go together: give both or neither")
    window = tuple(s.window) if s.window else None
    stats = (s.mean, s.std) if s.mean is not None else None
    if start is not None:
        window = window or start.window
        stats = stats or ((start.mean, start.std) if start.has_statistics else None)
    if window is not None and stats is not None:
        return WindowZNorm(window, *stats)
    rng = np.random.default_rng(seed)
    store = _CaseStore(cases, max_items=1)
    values = []
    by_case: Dict[int, list] = {}
    for t in targets:
        by_case.setdefault(t.case_index, []).append(t.value)
    for ci, vals in sorted(by_case.items()):
        image, label = store.get(ci)
        fg = image[np.isin(label, vals)].astype(np.float32)
        if fg.size > _MAX_VOXELS_PER_CASE:
            fg = fg[rng.choice(fg.size, _MAX_VOXELS_PER_CASE, replace=False)]
        values.append(fg)
    fg = np.concatenate(values) if values else np.zeros(0, np.float32)
    if fg.size < 2:
        from .config import ConfigError

        raise ConfigError("the training targets hold too few voxels to compute the input normalisation; set "
                          "sam3d_adapter.window, mean and std")
    if window is None:
        lo, hi = np.percentile(fg, FOREGROUND_PERCENTILES)
        window = (float(lo), float(hi) if hi > lo else float(lo) + 1.0)
    if stats is None:
        clipped = np.clip(fg, *window)
        stats = (float(clipped.mean()), max(float(clipped.std()), 1e-3))
    return WindowZNorm(window, *stats)


def _draw(rng: np.random.Generator, voxels: np.ndarray, n: int, size: int) -> np.ndarray:
    """``n`` voxel indices from ``voxels`` (K, 3) (with replacement when K < n; anywhere when K == 0)."""
    if n == 0:
        return np.zeros((0, 3), np.float32)
    if len(voxels) == 0:
        return rng.integers(0, size, size=(n, 3)).astype(np.float32)
    pick = rng.choice(len(voxels), size=n, replace=len(voxels) < n)
    return voxels[pick].astype(np.float32)


class AdapterSamples:
    """Map-style dataset of 3DSAM-adapter samples, indexed by ``(epoch, index)`` (training) or ``index``
    (validation, ``train=False``). Items: ``image`` (1, S, S, S) float32 ``[d, h, w]``, ``label`` same shape
    (0/1), ``points`` (P, 3) float32 ``(d, h, w)``."""

    def __init__(self, cases: Sequence[CachedCase], targets: Sequence[Target], size: int,
                 s: Sam3DAdapterTrainConfig, intensity: WindowZNorm, seed: int = 0, train: bool = True,
                 samples_per_epoch: int = 0, max_targets: int = 0):
        from .data import DataError

        if not targets:
            raise DataError("the training split has no targets; add cases or lower data.val_fraction" if train
                            else "no validation targets")
        self.store = _CaseStore(cases)
        self.targets = list(targets)[: (max_targets or None)]
        self.size, self.s, self.intensity, self.seed, self.train = int(size), s, intensity, int(seed), bool(train)
        self.n = int(samples_per_epoch) or len(self.targets) if train else len(self.targets)

    def __len__(self) -> int:
        return self.n

    def _centre(self, t: Target, label: np.ndarray, rng: np.random.Generator):
        if not self.train:
            return [(lo + hi - 1) // 2 for lo, hi in t.bbox]
        if rng.random() < self.s.positive_fraction:
            box = tuple(slice(lo, hi) for lo, hi in t.bbox)
            fg = np.argwhere(label[box] == t.value)
            return (fg[rng.integers(len(fg))] + [lo for lo, _ in t.bbox]).tolist()
        return [int(rng.integers(n)) for n in label.shape]

    def __getitem__(self, key) -> Dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        rng = np.random.default_rng([self.seed, int(epoch), int(index), 0 if self.train else 1])
        t = self.targets[int(index) % len(self.targets)]
        image, label = self.store.get(t.case_index)
        s, size, lo = self.s, self.size, self.intensity.window[0]
        centre = self._centre(t, label, rng)
        zoom = 1.0
        if self.train and rng.random() < s.zoom_p:
            zoom = float(rng.uniform(*s.zoom))
        side = max(2, int(round(size / zoom)))
        img = reference_crop_or_pad(image, centre, side, pad_value=lo)[0].astype(np.float32)
        lab = (reference_crop_or_pad(label, centre, side)[0] == t.value).astype(np.float32)
        if side != size:
            img = resize(img, size)
            lab = resize(lab, size)
        lab = (lab > 0.5).astype(np.float32)
        if self.train:
            if s.rot90:
                k = int(rng.integers(4))       # axial plane = (a, b)
                img, lab = np.rot90(img, k, axes=(0, 1)), np.rot90(lab, k, axes=(0, 1))
            if s.flip:
                for ax in range(3):
                    if rng.random() < 0.5:
                        img, lab = np.flip(img, ax), np.flip(lab, ax)
            if s.hu_shift:
                img = img + np.float32(rng.uniform(-s.hu_shift, s.hu_shift))
        x = self.intensity.apply(np.clip(img, *self.intensity.window))
        x = np.ascontiguousarray(x.transpose(2, 1, 0))                    # [a, b, c] -> [d, h, w] = [c, b, a]
        y = np.ascontiguousarray(lab.transpose(2, 1, 0))
        pts = np.concatenate([_draw(rng, np.argwhere(y > 0), s.fg_points, size),
                              _draw(rng, np.zeros((0, 3)), s.any_points, size)])
        return {"image": x[None].astype(np.float32), "label": y[None].astype(np.float32),
                "points": pts.astype(np.float32), "index": int(index), "epoch": int(epoch)}
